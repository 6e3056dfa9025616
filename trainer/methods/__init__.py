"""Training methods as plugins: a registry in the style of timm's model registry.

    from trainer.methods import get_method, list_methods
    list_methods()                 # ['ce', 'divide_conquer', 'group_loss', 'ibc', 'pml']
    cls = get_method("group_loss") # a Method subclass; cls.config_class is its config dataclass

A method file registers its class with ``@register_method``; the config's ``method: {name: ...}``
section picks one (DESIGN §2-3 describe them).
"""

from __future__ import annotations

from trainer.methods.base import Method, MethodConfig, MethodContext

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method.name = cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a training method named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown training method {name!r}; known: {', '.join(list_methods())}") from None


# the built-in methods register themselves on import
from trainer.methods import ce, divide_conquer, group_loss, ibc, pml  # noqa: E402,F401

__all__ = ["Method", "MethodConfig", "MethodContext", "register_method", "get_method", "list_methods"]
