"""Losses of Intra-Batch Connections (DESIGN §2): label-smoothed cross-entropy on logits / T,
on the backbone classifier and on the MPN classifier, weighted and summed."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.1,
                           temperature: float = 1.0) -> torch.Tensor:
    """Mean over the batch of ``(1-eps) * NLL + eps * mean_c(-log p_c)`` with ``p = softmax(logits / T)``.

    Equals ``F.cross_entropy(logits / T, targets, label_smoothing=eps)`` (computed in float32).
    """
    if logits.dim() != 2 or targets.dim() != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"expected (B, C) logits and (B,) targets, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    logp = F.log_softmax(logits.float() / temperature, dim=1)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    uniform = -logp.mean(dim=1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


def cosine_logits(f: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cos(f_i, w_c)``: the normalised-softmax classifier (Zhai & Wu, 2019) that the temperature then sharpens.

    Why: the exported embedding is compared by cosine; a plain Linear classifier also rewards feature
    norm and bias, a cosine one trains exactly the geometry that retrieval reads.
    """
    return F.normalize(f.float(), dim=1) @ F.normalize(weight.float(), dim=1).t()


def classifier_logits(classifier: torch.nn.Linear, f: torch.Tensor, kind: str) -> torch.Tensor:
    """Logits of the backbone classifier: ``"linear"`` (the paper's) or ``"cosine"`` (bias unused)."""
    if kind == "cosine":
        return cosine_logits(f, classifier.weight)
    return classifier(f)


def ibc_loss(logits: torch.Tensor, targets: torch.Tensor, mpn_logits: torch.Tensor | None, *,
             temperature: float, smoothing: float, backbone_weight: float = 1.0,
             mpn_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """{"loss", "loss_backbone", "loss_mpn"(if any)} for one batch (``mpn_logits=None``: the CE-only ablation)."""
    out = {"loss_backbone": smoothed_cross_entropy(logits, targets, smoothing, temperature)}
    total = backbone_weight * out["loss_backbone"]
    if mpn_logits is not None:
        out["loss_mpn"] = smoothed_cross_entropy(mpn_logits, targets, smoothing, temperature)
        total = total + mpn_weight * out["loss_mpn"]
    out["loss"] = total
    return out


__all__ = ["smoothed_cross_entropy", "cosine_logits", "classifier_logits", "ibc_loss"]
