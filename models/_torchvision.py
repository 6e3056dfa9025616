"""The one place the project imports torchvision.

Why: the PyPI torchvision 0.28.0 wheel links its C++ ops (``_C.so``) against CUDA libraries. With
a CPU-only torch build that library cannot load, and ``import torchvision`` then fails in
``torchvision/_meta_registrations.py`` with ``RuntimeError: operator torchvision::nms does not
exist``, because it registers fake kernels for ops whose schemas were never defined. Models and
transforms do not need those ops, so on a CPU build we define the two missing schemas (``nms``
and ``qnms``) before the import. Detection ops such as ``torchvision.ops.nms`` stay unavailable
there (they raise a "no kernel" error), which this project never uses.

On a CUDA build (or wherever torchvision's own ops load) this does nothing.

Usage everywhere in the project::

    from models._torchvision import torchvision
    from models._torchvision import tv_models, tv_transforms
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

import torch

log = logging.getLogger(__name__)

_MISSING_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_schema_lib = None  # kept alive: a torch.library.Library unregisters its ops when collected


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _try_load_native_ops() -> bool:
    """Load torchvision's own _C library the way torchvision does; False if it cannot load."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = list(spec.submodule_search_locations)[0]
    for name in os.listdir(folder):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(folder, name))
            except (OSError, RuntimeError):
                return False
            return _has_op("nms")
    return False


def ensure_torchvision_ops() -> None:
    """Define the op schemas torchvision's import needs when its native library cannot load."""
    global _schema_lib
    if "torchvision" in sys.modules or _schema_lib is not None:
        return
    if torch.version.cuda is not None or getattr(torch.version, "hip", None):
        return  # GPU build: torchvision's own native ops register these schemas
    if _has_op("nms") or _try_load_native_ops():
        return
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_SCHEMAS.values():
        lib.define(schema)
    _schema_lib = lib
    log.debug("torchvision native ops unavailable on this CPU torch; defined nms/qnms schemas only")


ensure_torchvision_ops()

import torchvision  # noqa: E402
import torchvision.models as tv_models  # noqa: E402
import torchvision.transforms.v2 as tv_transforms  # noqa: E402

__all__ = ["torchvision", "tv_models", "tv_transforms", "ensure_torchvision_ops"]
