"""The record of the model a catalogue's vectors came from, and the check that refuses another model."""

from __future__ import annotations

from sdk.catalog.errors import CatalogMismatchError


def describe_model(model: dict | None) -> str:
    if not model:
        return "no recorded model"
    pre = model.get("preprocess") or {}
    return (f"model {str(model.get('manifest_digest', '?'))[:12]} (dim {model.get('embedding_dim', '?')}, "
            f"resize {pre.get('resize', '?')} crop {pre.get('crop', '?')})")


def same_model(recorded: dict, model: dict) -> bool:
    return (recorded.get("manifest_digest") == model.get("manifest_digest")
            and recorded.get("embedding_dim") == model.get("embedding_dim")
            and recorded.get("preprocess") == model.get("preprocess"))


def check_same_model(recorded: dict | None, model: dict, where: str) -> None:
    """Refuse a catalogue whose vectors came from another model than ``model``."""
    if recorded is None:
        raise CatalogMismatchError(
            f"catalogue {where} records no model (built from raw vectors); it cannot be checked against "
            f"{describe_model(model)}. Open it with sdk.catalog.Catalog.load instead"
        )
    if not same_model(recorded, model):
        raise CatalogMismatchError(
            f"catalogue {where} was built with {describe_model(recorded)}, but the bundle given is "
            f"{describe_model(model)}: embeddings of different models are not comparable. Open it with the "
            "bundle it was built with, or rebuild it (ibc-retrieve index)"
        )
