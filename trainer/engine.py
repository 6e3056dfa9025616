"""The step engine: one optimiser step of a training method, whatever the method.

It owns the device placement, AMP, the DDP / ``torch.compile`` wrapping (done once), the learning
rates of the parameter groups (schedule, fine-tuning warm-up), the NaN guard (every rank stops
together) and the optimiser / grad-scaler step. The method decides the loss (trainer/methods/).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from models.ibc import IBCModel
from sdk.errors import IbcError
from trainer import distributed as D


class TrainingError(IbcError, RuntimeError):
    """The run stopped on purpose (NaN loss, unreadable image with on_bad_image=stop); the message says why."""


class TrainStep(nn.Module):
    """images, labels -> {"loss", and the method's parts}. Wrapped by DDP as a whole so gradients are synchronised."""

    def __init__(self, model: IBCModel, method: nn.Module):
        super().__init__()
        self.model = model
        self.method = method
        self.backbone_frozen = False  # set by the loop during the fine-tuning warm-up

    @property
    def last_mpn_batch(self) -> int | None:
        """Nodes the MPN saw in the last step (IBC only; the global batch under DDP)."""
        return getattr(self.method, "last_mpn_batch", None)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.backbone_frozen:  # no graph through the trunk: the warm-up costs a forward pass only
            with torch.no_grad():
                feats = self.model.backbone(images)
            f = self.model.head(feats)
        else:
            f = self.model.embed(images)
        total, parts = self.method.loss(f, labels)
        return {**parts, "loss": total}


# --------------------------------------------------------------------------- small pure helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"runtime.device={name} but CUDA is not available here; use runtime.device=cpu")
    return dev


def use_channels_last(setting: bool | str, device: torch.device) -> bool:
    """``runtime.channels_last``: true / false, or "auto" (on CUDA only)."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def lr_factor(optim, epoch: int, batch: int, n_batches: int) -> float:
    """Learning-rate multiplier at ``batch`` of ``epoch`` (a pure function: resumes need no scheduler object)."""
    t = epoch + batch / max(1, n_batches)
    factor = 1.0
    if optim.warmup_epochs > 0 and t < optim.warmup_epochs:
        factor = min(1.0, (epoch + (batch + 1) / max(1, n_batches)) / optim.warmup_epochs)
    if optim.schedule == "step":
        factor *= optim.gamma ** sum(1 for m in optim.milestones if epoch >= m)
    else:  # cosine over the whole run (after warm-up)
        w = optim.warmup_epochs
        frac = 0.0 if t < w else (t - w) / max(1e-9, optim.epochs - w)
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return factor


def parameter_groups(model: IBCModel, backbone_lr_mult: float, classifier_lr_mult: float = 1.0) -> list[dict]:
    """Optimiser groups: the backbone at ``lr * backbone_lr_mult``, the head and MPN at ``lr``, the
    classifiers at ``lr * classifier_lr_mult`` (their own group only when that is not 1).

    Why a classifier multiplier: with many classes and few images each, a class's weight row is
    updated only when the class is in the batch (about 5 times per epoch for 771 Omniglot characters
    in batches of 8 classes), so it learns far slower than the head every batch trains; Proxy-Anchor
    gives its proxies 100x the lr for the same reason."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    classifiers = [p for m in (model.classifier, model.mpn_classifier) if m is not None
                   for p in m.parameters() if p.requires_grad] if classifier_lr_mult != 1.0 else []
    ids = {id(p) for p in backbone + classifiers}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": backbone, "lr_mult": backbone_lr_mult, "name": "backbone"},
              {"params": rest, "lr_mult": 1.0, "name": "head"}]
    if classifiers:
        groups.append({"params": classifiers, "lr_mult": classifier_lr_mult, "name": "classifiers"})
    return groups


def method_parameter_group(method: nn.Module) -> list[dict]:
    """The method's own parameters (proxies, ...) as a third group at ``lr * method.lr_mult()``; none if it has none."""
    params = [p for p in method.parameters() if p.requires_grad]
    return [{"params": params, "lr_mult": method.lr_mult(), "name": "method"}] if params else []


def backbone_frozen_at(ft, epoch: int, batch: int, n_batches: int) -> bool:
    """Whether the fine-tuning warm-up (backbone frozen) still runs at this batch."""
    return epoch + batch / max(1, n_batches) < ft.freeze_backbone_epochs


def set_backbone_mode(backbone: nn.Module, *, frozen: bool, bn_mode: str) -> None:
    """Train mode for the trunk, except BatchNorm when frozen (warm-up) or ``bn_mode='frozen'``."""
    backbone.train(not frozen)
    if not frozen and bn_mode == "frozen":
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def init_head(model: IBCModel, mode: str) -> None:
    if mode == "orthogonal":
        nn.init.orthogonal_(model.head.fc.weight)
        nn.init.zeros_(model.head.fc.bias)


# --------------------------------------------------------------------------- the engine


class StepEngine:
    """Runs optimiser steps of a :class:`TrainStep` (wrapped for DDP / compile once, here)."""

    def __init__(self, step: TrainStep, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 dist_info: D.DistInfo, amp: torch.dtype | None, channels_last: bool, grad_clip: float | None,
                 compile: bool, find_unused_parameters: bool):
        self.inner = step
        self.optimizer = optimizer
        self.device, self.dist, self.amp = device, dist_info, amp
        self.channels_last, self.grad_clip = channels_last, grad_clip
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        module: nn.Module = step
        if dist_info.enabled:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=True,
                find_unused_parameters=find_unused_parameters)
        if compile:
            module = torch.compile(module)
        self.module = module

    def set_lr(self, lr: float, backbone_frozen: bool) -> None:
        """Each group at ``lr * lr_mult``; the backbone's at 0 while it is frozen."""
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0 if (backbone_frozen and g.get("name") == "backbone") else lr * g.get("lr_mult", 1.0)
        self.inner.backbone_frozen = backbone_frozen

    def step(self, images: torch.Tensor, labels: torch.Tensor, *, where: str) -> dict[str, torch.Tensor]:
        """Forward, NaN guard, backward, optimiser step; returns the losses. ``where`` names the step in errors."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            losses = self.module(images, labels)
        loss = losses["loss"]
        finite = torch.isfinite(loss.detach()).all()
        if self.dist.enabled:  # every rank stops together (no rank left waiting in a collective)
            flag = finite.to(torch.int32).reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = bool(flag.item())
        if not finite:
            raise TrainingError(f"loss became {loss.item()} at {where}; stopped. {self.nan_advice}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return losses

    nan_advice = "Try a lower optim.lr, optim.grad_clip, or a higher loss.temperature."


__all__ = ["TrainStep", "StepEngine", "TrainingError", "resolve_device", "amp_dtype", "lr_factor",
           "parameter_groups", "method_parameter_group", "backbone_frozen_at", "set_backbone_mode", "init_head"]
