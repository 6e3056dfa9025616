"""The checkpoint format shared by the trainer (writes, resumes) and the exporter (reads).

A checkpoint is one ``torch.save`` file holding only plain containers and tensors, so it loads
with ``weights_only=True`` (no pickled code runs on load)::

    {"format": "ibc-checkpoint", "version": 1,
     "model_config": ModelConfig.to_dict(),   # rebuilds the architecture
     "model": state_dict,
     "config": {...},                          # the resolved training config (data, preprocessing, ...)
     "epoch": int, "step": int, "metrics": {...}, "versions": {...},
     ... trainer state (optimizer, scheduler, sampler, rng) ...}

Writes are atomic: a temp file in the same directory, fsync, then ``os.replace``; a failure
(disk full, kill) leaves the previous file intact.
"""

from __future__ import annotations

from sdk.errors import IbcError

import hashlib
import os
import platform
import tempfile
import warnings
from typing import Any

import torch

from models.ibc import IBCModel, ModelConfig

FORMAT = "ibc-checkpoint"
VERSION = 1


class CheckpointError(IbcError, ValueError):
    """A checkpoint is missing, unreadable, of another format/version, or of another model."""


def library_versions() -> dict[str, str]:
    import numpy

    from models._torchvision import torchvision

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # TorchVersion is not weights_only-loadable
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
    }


def save_checkpoint(path: str, payload: dict[str, Any]) -> str:
    """Atomically write ``payload`` (format/version added) to ``path``."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    if "model_config" not in payload or "model" not in payload:
        raise ValueError("a checkpoint needs 'model_config' and 'model'")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) and check its format and version."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pickle-protocol notes on foreign files
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle with code, random bytes: one user error
        raise CheckpointError(f"{path}: not a readable ibc checkpoint (truncated or another file type?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an ibc checkpoint (no '{FORMAT}' format tag)")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is newer than this ibc "
                              f"(reads up to {VERSION}); upgrade ibc")
    for key in ("model_config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return ckpt


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_architecture(ckpt: dict, model_config: ModelConfig, where: str = "checkpoint") -> None:
    """Refuse a checkpoint whose architecture differs from ``model_config``, saying what differs."""
    theirs = ModelConfig.from_dict(ckpt["model_config"]).architecture()
    ours = model_config.architecture()
    if theirs != ours:
        diff = {k: (theirs.get(k), ours.get(k)) for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)}
        raise CheckpointError(f"{where}: made for another model; differs in "
                              + ", ".join(f"{k}: checkpoint {a!r} vs expected {b!r}" for k, (a, b) in diff.items()))


def load_model_state(model: torch.nn.Module, state: dict, where: str = "checkpoint") -> None:
    """``load_state_dict`` that reports missing / unexpected / mis-shaped keys in one clear error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
        if shapes:
            parts.append("shape mismatch in " + ", ".join(
                f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:3]))
        raise CheckpointError(f"{where}: weights do not fit this model: " + "; ".join(parts))
    model.load_state_dict(state)


def model_from_checkpoint(ckpt: dict, where: str = "checkpoint") -> IBCModel:
    """Rebuild the training model from a loaded checkpoint (no pretrained weights are read)."""
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad model_config ({e})") from None
    config.pretrained = False
    model = IBCModel(config)
    load_model_state(model, ckpt["model"], where)
    return model.eval()
