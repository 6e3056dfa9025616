"""``pml``: the classic metric-learning losses, through pytorch-metric-learning (DESIGN §3: not rewritten).

``method: {name: pml, loss: multi_similarity, loss_args: {...}, miner: auto, miner_args: {...}}``.
``loss`` is one of :data:`LOSSES` (triplet + semi-hard miner, contrastive, multi-similarity + its
miner, proxy-anchor, normalized softmax, ArcFace); ``*_args`` are the PML class's own arguments.
``miner: auto`` takes the loss's usual miner (or none); ``null`` turns mining off. Under DDP the
tuple losses and their miners see the whole global batch through PML's distributed wrappers; the
proxy losses are per-sample and need none (DDP averages their proxies' gradients).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.methods import register_method
from trainer.methods.base import Method, MethodConfig

# name -> (PML loss class, its usual miner or None, default args, takes a miner, has class proxies)
LOSSES: dict[str, tuple[str, str | None, dict, bool, bool]] = {
    "triplet": ("TripletMarginLoss", "triplet_margin", {"margin": 0.2}, True, False),
    "contrastive": ("ContrastiveLoss", None, {}, True, False),
    "multi_similarity": ("MultiSimilarityLoss", "multi_similarity", {}, True, False),
    "proxy_anchor": ("ProxyAnchorLoss", None, {}, False, True),
    "normalized_softmax": ("NormalizedSoftmaxLoss", None, {}, False, True),
    "arcface": ("ArcFaceLoss", None, {}, False, True),
}
MINERS: dict[str, tuple[str, dict]] = {
    "triplet_margin": ("TripletMarginMiner", {"margin": 0.2, "type_of_triplets": "semihard"}),
    "multi_similarity": ("MultiSimilarityMiner", {}),
    "pair_margin": ("PairMarginMiner", {}),
    "batch_hard": ("BatchHardMiner", {}),
}
# the proxies learn faster than the network (Proxy-Anchor's recipe: x100)
DEFAULT_LOSS_LR_MULT = {"proxy_anchor": 100.0}


@dataclass
class PMLConfig(MethodConfig):
    name: str = "pml"
    loss: str = "multi_similarity"
    loss_args: dict = field(default_factory=dict)
    miner: str | None = "auto"  # "auto" (the loss's usual miner, if any), a MINERS name, or null (none)
    miner_args: dict = field(default_factory=dict)
    loss_lr_mult: float | None = None  # lr multiplier of the loss's own parameters (proxies); None = per loss


def miner_name(cfg: PMLConfig) -> str | None:
    return LOSSES[cfg.loss][1] if cfg.miner == "auto" else cfg.miner


def build_loss(cfg: PMLConfig, num_classes: int, embedding_size: int):
    """The PML loss object of ``cfg`` (defaults, then the config's arguments)."""
    from pytorch_metric_learning import losses

    cls_name, _, defaults, _, proxies = LOSSES[cfg.loss]
    args: dict[str, Any] = {**defaults, **cfg.loss_args}
    if proxies:
        args = {"num_classes": num_classes, "embedding_size": embedding_size, **args}
    return getattr(losses, cls_name)(**args)


def build_miner(cfg: PMLConfig):
    from pytorch_metric_learning import miners

    name = miner_name(cfg)
    if name is None:
        return None
    cls_name, defaults = MINERS[name]
    return getattr(miners, cls_name)(**{**defaults, **cfg.miner_args})


def _bad_argument(where: str, owner: str, e: Exception):
    from trainer.config import ConfigError

    m = re.search(r"argument '(\w+)'", str(e))
    if m:
        return ConfigError(f"{where}.{m.group(1)}: not an argument of pytorch-metric-learning's {owner}")
    return ConfigError(f"{where}: {owner} refused its arguments ({type(e).__name__}: {e})")


@register_method
class PML(Method):
    name = "pml"
    config_class = PMLConfig
    parts = {}

    @classmethod
    def check_config(cls, mcfg: PMLConfig, cfg) -> None:
        from trainer.config import ConfigError

        if mcfg.loss not in LOSSES:
            raise ConfigError(f"method.loss: unknown loss {mcfg.loss!r}; known: {', '.join(sorted(LOSSES))}")
        for key in ("loss_args", "miner_args"):
            if not isinstance(getattr(mcfg, key), dict):
                raise ConfigError(f"method.{key}: expected a mapping of argument names to values")
        if mcfg.miner not in (None, "auto") and mcfg.miner not in MINERS:
            raise ConfigError(f"method.miner: unknown miner {mcfg.miner!r}; known: auto, null, "
                              f"{', '.join(sorted(MINERS))}")
        if mcfg.miner not in (None, "auto") and not LOSSES[mcfg.loss][3]:
            raise ConfigError(f"method.miner: the {mcfg.loss} loss takes no miner (set method.miner=null)")
        if mcfg.miner_args and miner_name(mcfg) is None:
            raise ConfigError(f"method.miner_args: the {mcfg.loss} loss has no miner here to take them")
        if mcfg.loss_lr_mult is not None and mcfg.loss_lr_mult < 0:
            raise ConfigError("method.loss_lr_mult must be >= 0")
        try:  # PML checks its own arguments: build once with a placeholder class count
            build_loss(mcfg, 2, cfg.model.embed_dim)
        except (TypeError, ValueError, AssertionError) as e:
            raise _bad_argument("method.loss_args", LOSSES[mcfg.loss][0], e) from None
        try:
            build_miner(mcfg)
        except (TypeError, ValueError, AssertionError) as e:
            raise _bad_argument("method.miner_args", MINERS[miner_name(mcfg)][0], e) from None

    @classmethod
    def loss_parts(cls, mcfg: PMLConfig) -> dict[str, str]:
        return {f"loss_{mcfg.loss}": mcfg.loss.replace("_", " ")}

    def __init__(self, config: PMLConfig, model, ctx):
        super().__init__(config, model, ctx)
        loss = build_loss(config, ctx.config.model.num_classes, ctx.config.model.embed_dim)
        miner = build_miner(config)
        if ctx.dist.enabled and LOSSES[config.loss][3]:  # tuple losses: pairs across the global batch
            from pytorch_metric_learning.utils import distributed as pml_dist

            loss = pml_dist.DistributedLossWrapper(loss)
            miner = pml_dist.DistributedMinerWrapper(miner) if miner is not None else None
        self.loss_fn = loss
        self.miner = miner

    def lr_mult(self) -> float:
        c = self.config
        return c.loss_lr_mult if c.loss_lr_mult is not None else DEFAULT_LOSS_LR_MULT.get(c.loss, 1.0)

    def loss(self, f: torch.Tensor, labels: torch.Tensor):
        f = f.float()
        if self.miner is not None:
            value = self.loss_fn(f, labels, self.miner(f, labels))
        else:
            value = self.loss_fn(f, labels)
        return value, {f"loss_{self.config.loss}": value}
