"""The interface every training method implements (one file per method in this package).

A method owns the loss: it gets the shared model (backbone + embedding head + classifier, and the
MPN only when it asks for one), may add trainable modules of its own (proxies, ...), and turns a
batch of embeddings into ``(total_loss, parts)``. The loop around it does everything else (device,
AMP, DDP, optimiser, checkpoints, selection, plots), keyed by the parts the method reports.

Every method exports the same embedding, the L2-normalised head output (``IBCModel.inference_embedder``),
so the exporter and the SDK never see which method trained a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from trainer.sampler import PKBatchSampler


@dataclass
class MethodConfig:
    """Base of every method's config dataclass; ``name`` selects the method (``method.name``)."""

    name: str = ""


@dataclass
class MethodContext:
    """What a method may need beyond its own config: the run's config, processes, data and device."""

    config: Any  # trainer.config.Config
    dist: Any  # trainer.distributed.DistInfo
    train_items: list
    device: torch.device
    channels_last: bool = False
    amp_dtype: torch.dtype | None = None


class Method(nn.Module):
    """A training method: config, extra modules, per-batch loss, optional epoch hook and state.

    Subclasses set ``name``, ``config_class``, ``parts`` (loss part key -> label for logs and plots)
    and implement :meth:`loss`. ``uses_mpn`` builds the model's MPN; ``uses_classifier`` keeps the
    model's classifier trainable (it is frozen otherwise, so DDP sees no unused parameter).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    parts: ClassVar[dict[str, str]] = {}
    uses_mpn: ClassVar[bool] = False
    uses_classifier: ClassVar[bool] = False
    embedding: ClassVar[str] = "backbone -> head, L2-normalised"

    def __init__(self, config: MethodConfig, model: nn.Module, ctx: MethodContext):
        super().__init__()
        self.config = config
        self.ctx = ctx
        object.__setattr__(self, "model", model)  # shared, not a submodule: its weights stay in "model"

    # ---- config (class level: runs when the config loads, before any data is read)
    @classmethod
    def check_config(cls, mcfg: MethodConfig, cfg: Any) -> None:
        """Refuse combinations that cannot work; raise ``trainer.config.ConfigError`` naming the key."""

    @classmethod
    def loss_parts(cls, mcfg: MethodConfig) -> dict[str, str]:
        """The loss parts a run with this method section reports (logs, plots, the ibc-run report)."""
        return dict(cls.parts)

    # ---- training
    def loss(self, f: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, parts) for this rank's batch of unnormalised embeddings ``f`` (B, dim)."""
        raise NotImplementedError

    def make_sampler(self, labels: list[int], **kw) -> PKBatchSampler:
        """The batch sampler (P x K by default); ``kw`` are PKBatchSampler's arguments."""
        return PKBatchSampler(labels, **kw)

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch's batches are drawn (also when a run resumes mid-epoch)."""

    def on_batch_start(self, epoch: int, batch: int) -> None:
        """Called before each batch with its index in the epoch's global batch list."""

    def lr_mult(self) -> float:
        """Learning-rate multiplier of the method's own parameters (their optimiser group)."""
        return 1.0

    # ---- checkpoint state beyond the parameters (which ``state_dict`` already holds)
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


__all__ = ["Method", "MethodConfig", "MethodContext"]
