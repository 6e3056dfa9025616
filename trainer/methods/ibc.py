"""``ibc``: Intra-Batch Connections (DESIGN §2): smoothed CE on the backbone classifier and on the
MPN's BNNeck classifier, the MPN run over the whole global batch under DDP by default."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer import distributed as D
from trainer.losses import classifier_logits, ibc_loss
from trainer.methods import register_method
from trainer.methods.base import Method, MethodConfig


@dataclass
class IBCConfig(MethodConfig):
    """The loss weights and temperature live in the config's ``loss`` section (shared with ``ce``)."""

    name: str = "ibc"


@register_method
class IBC(Method):
    name = "ibc"
    config_class = IBCConfig
    parts = {"loss_backbone": "backbone CE", "loss_mpn": "MPN CE"}
    uses_mpn = True
    uses_classifier = True

    def __init__(self, config, model, ctx):
        super().__init__(config, model, ctx)
        self.loss_cfg = ctx.config.loss
        self.global_mpn = bool(ctx.config.runtime.mpn_global_batch) and ctx.dist.enabled
        self.last_mpn_batch = 0  # nodes the MPN saw in the last step (the global batch under DDP)

    def loss(self, f: torch.Tensor, labels: torch.Tensor):
        model = self.model
        logits = classifier_logits(model.classifier, f, self.loss_cfg.classifier)
        mpn_logits = None
        if model.mpn is not None:
            if self.global_mpn:
                dist = self.ctx.dist
                f_all = D.all_gather_with_grad(f, dist.gather_group)
                _, all_logits = model.refine(f_all)
                n = f.shape[0]
                mpn_logits = all_logits[dist.rank * n:(dist.rank + 1) * n]
                self.last_mpn_batch = f_all.shape[0]
            else:
                _, mpn_logits = model.refine(f)
                self.last_mpn_batch = f.shape[0]
        c = self.loss_cfg
        out = ibc_loss(logits, labels, mpn_logits, temperature=c.temperature, smoothing=c.label_smoothing,
                       backbone_weight=c.backbone_weight, mpn_weight=c.mpn_weight)
        total = out.pop("loss")
        return total, out
