"""``ce``: the MPN-off ablation of IBC: the smoothed cross-entropy of the backbone classifier alone."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.methods import register_method
from trainer.methods.base import MethodConfig
from trainer.methods.ibc import IBC


@dataclass
class CEConfig(MethodConfig):
    name: str = "ce"


@register_method
class CE(IBC):
    """IBC without the MPN (``model.use_mpn`` false): ``loss_mpn`` stays empty in the metrics log."""

    name = "ce"
    config_class = CEConfig
    uses_mpn = False
