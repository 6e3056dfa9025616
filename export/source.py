"""The model being exported: a checkpoint read safely, cut down to the deployable embedder.

Why separate: every backend starts from the same :class:`ExportSource` (weights, the evaluation
preprocessing and the training config that the manifest's provenance records), and a bad
checkpoint must fail here, before any file is written.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from models.checkpoint import CheckpointError, file_digest, load_checkpoint, model_from_checkpoint
from models.ibc import InferenceEmbedder, ModelConfig
from sdk.preprocess import PreprocessConfig

log = logging.getLogger(__name__)


@dataclass
class ExportSource:
    """A loaded checkpoint reduced to what export needs."""

    path: str
    sha256: str
    model_config: ModelConfig
    embedder: InferenceEmbedder  # backbone + head + L2-normalise, eval mode, no MPN / classifiers
    preprocess: PreprocessConfig
    config: dict[str, Any]  # the resolved training config stored in the checkpoint
    info: dict[str, Any] = field(default_factory=dict)  # epoch, step, metrics, versions of training

    @property
    def embedding_dim(self) -> int:
        return int(self.model_config.embed_dim)

    @property
    def image_size(self) -> int:
        return int(self.preprocess.crop)

    data_root: str | None = None  # the training data root, resolved (see :func:`resolve_data_root`)

    @property
    def data_config(self) -> dict[str, Any] | None:
        """The checkpoint's ``config["data"]`` with its root resolved; None if it names no usable dataset."""
        data = self.config.get("data")
        if not isinstance(data, dict) or not self.data_root:
            return None
        return {**data, "root": self.data_root}


def resolve_data_root(config: dict, checkpoint_path: str, override: str | None = None) -> str | None:
    """The dataset folder of ``config["data"]["root"]``; a relative root is tried against the working
    directory, then the checkpoint's folder and its parents (a run directory sits below the project)."""
    if override:
        return os.path.abspath(os.path.expanduser(override))
    data = config.get("data")
    root = data.get("root") if isinstance(data, dict) else None
    if not root:
        return None
    root = os.path.expanduser(str(root))
    if os.path.isabs(root):
        return root
    candidates = [os.path.abspath(root)]
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    for _ in range(4):
        candidates.append(os.path.normpath(os.path.join(folder, root)))
        folder = os.path.dirname(folder)
    for c in candidates:
        if os.path.isdir(c):
            return c
    log.warning("the checkpoint's dataset root %r was not found (tried %s); pass --data-root or image folders",
                root, ", ".join(candidates))
    return None


def _preprocess_of(ckpt: dict, where: str, override: PreprocessConfig | None) -> PreprocessConfig:
    if override is not None:
        return override
    raw = (ckpt.get("config") or {}).get("preprocess")
    if raw is None:
        log.warning("%s: the checkpoint's config has no 'preprocess' entry; using the default evaluation "
                    "preprocessing %s", where, PreprocessConfig())
        return PreprocessConfig()
    if isinstance(raw, PreprocessConfig):
        return raw
    try:
        return PreprocessConfig.from_dict(dict(raw))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad config['preprocess'] ({e})") from None


def load_source(path: str, preprocess: PreprocessConfig | None = None, data_root: str | None = None) -> ExportSource:
    """Read ``path`` (weights_only) and build its inference embedder; raise CheckpointError if unusable."""
    path = os.fspath(path)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, where=path)
    embedder = model.inference_embedder().eval()
    for p in embedder.parameters():
        p.requires_grad_(False)
    prep = _preprocess_of(ckpt, path, preprocess)
    config = ckpt.get("config") or {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: 'config' is a {type(config).__name__}, expected a dict")
    # a dry run: catches a trunk that cannot take this input size before anything is exported
    try:
        with torch.no_grad():
            out = embedder(torch.zeros(2, 3, prep.crop, prep.crop))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the model cannot embed {prep.crop}x{prep.crop} images: {e}") from None
    if tuple(out.shape) != (2, model.config.embed_dim):
        raise CheckpointError(f"{path}: embedder gives shape {tuple(out.shape)}, "
                              f"expected (2, {model.config.embed_dim})")
    info = {k: ckpt[k] for k in ("epoch", "step", "metrics", "versions") if k in ckpt}
    log.info("checkpoint %s: %s %d-d, input %dx%d", path, model.config.backbone, model.config.embed_dim,
             prep.crop, prep.crop)
    return ExportSource(path=path, sha256=file_digest(path), model_config=model.config, embedder=embedder,
                        preprocess=prep, config=config, info=info, data_root=resolve_data_root(config, path, data_root))
