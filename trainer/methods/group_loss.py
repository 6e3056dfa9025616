"""``group_loss``: The Group Loss (Elezi et al., ECCV 2020; DESIGN §3).

Per batch: W = Pearson correlation of the embeddings with negatives clipped to 0; priors X =
softmax(classifier logits / T) for unlabelled samples and one-hot for a few labelled "anchors" per
class; replicator dynamics ``X <- normalise_rows(X * (W @ X))`` for a few iterations; the loss is
the NLL of the propagated X plus a cross-entropy on the logits. Test time: the embedding only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.methods import register_method
from trainer.methods.base import Method, MethodConfig


@dataclass
class GroupLossConfig(MethodConfig):
    name: str = "group_loss"
    anchors_per_class: int = 2  # labelled samples per class per batch (one-hot priors)
    iterations: int = 1  # replicator-dynamics steps (1 in the released code)
    temperature: float = 12.0  # of the softmax priors
    nll_weight: float = 1.0  # weight of the propagated NLL beside the plain cross-entropy


def pearson_similarity(f: torch.Tensor) -> torch.Tensor:
    """(B, B) Pearson correlation between the rows of ``f`` (each centred over its features), negatives -> 0."""
    x = f.float() - f.float().mean(dim=1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (x @ x.t()).clamp_min(0.0)


def replicator_step(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One replicator-dynamics step: ``x_ic * (W x)_ic``, each row renormalised to sum 1."""
    x = x * (w @ x)
    return x / x.sum(dim=1, keepdim=True).clamp_min(1e-12)


def choose_anchors(labels: torch.Tensor, per_class: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (B,) bool mask: ``per_class`` random samples of every class present in the batch."""
    mask = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
    order = torch.randperm(labels.shape[0], generator=generator).to(labels.device)
    taken: dict[int, int] = {}
    for i in order.tolist():
        c = int(labels[i])
        if taken.get(c, 0) < per_class:
            taken[c] = taken.get(c, 0) + 1
            mask[i] = True
    return mask


def group_loss(f: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor, *,
               iterations: int, temperature: float, nll_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """{"loss_nll", "loss_ce"} and the weighted "loss" for one batch (anchors: bool mask of labelled rows)."""
    priors = F.softmax(logits.float() / temperature, dim=1)
    onehot = F.one_hot(labels, logits.shape[1]).to(priors.dtype)
    x = torch.where(anchors[:, None], onehot, priors)
    w = pearson_similarity(f)
    for _ in range(iterations):
        x = replicator_step(w, x)
    nll = F.nll_loss(torch.log(x + 1e-12), labels)
    ce = F.cross_entropy(logits.float(), labels)
    return {"loss": nll_weight * nll + ce, "loss_nll": nll, "loss_ce": ce}


@register_method
class GroupLoss(Method):
    name = "group_loss"
    config_class = GroupLossConfig
    parts = {"loss_nll": "propagated NLL", "loss_ce": "classifier CE"}
    uses_classifier = True

    @classmethod
    def check_config(cls, mcfg: GroupLossConfig, cfg) -> None:
        from trainer.config import ConfigError

        s = cfg.sampler
        k = min(s.images_per_class, s.min_images_per_class_split) if s.random_split else s.images_per_class
        if not 1 <= mcfg.anchors_per_class < k:
            raise ConfigError(f"method.anchors_per_class={mcfg.anchors_per_class} must be >= 1 and below the "
                              f"images per class of a batch ({k}, sampler.images_per_class), or no sample is left "
                              "to propagate to")
        if mcfg.iterations < 1 or mcfg.temperature <= 0:
            raise ConfigError("method.iterations must be >= 1 and method.temperature > 0")

    def loss(self, f, labels):
        c = self.config
        anchors = choose_anchors(labels, c.anchors_per_class)
        out = group_loss(f, self.model.classifier(f), labels, anchors, iterations=c.iterations,
                         temperature=c.temperature, nll_weight=c.nll_weight)
        return out.pop("loss"), out
