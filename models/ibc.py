"""The full training model and the inference embedder cut from it.

Training: backbone -> head -> f (B, dim); a plain Linear classifier on f; the MPN refines the
batch of f and a BNNeck classifier reads its output. Test time and export: backbone -> head ->
L2-normalise, nothing else (the MPN is dropped, so the deployed model costs just the backbone).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import Backbone, EmbeddingHead
from models.mpn import BNNeckClassifier, MessagePassingNetwork


@dataclass
class MPNConfig:
    num_layers: int = 1
    num_heads: int = 2
    cat: bool = False
    dropout: float = 0.1
    zero_logit: bool = True


@dataclass
class ModelConfig:
    """Everything needed to rebuild the architecture (saved in every checkpoint)."""

    backbone: str = "resnet50"
    pooling: str = "max"
    embed_dim: int = 512
    num_classes: int = 100
    pretrained: bool | str = False
    use_mpn: bool = True
    mpn: MPNConfig = field(default_factory=MPNConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        mpn = d.pop("mpn", None) or {}
        mpn = mpn if isinstance(mpn, MPNConfig) else MPNConfig(**mpn)
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(mpn=mpn, **d)

    def to_dict(self) -> dict:
        return asdict(self)

    def architecture(self) -> dict:
        """The parts that decide parameter shapes (what a checkpoint must agree with)."""
        d = self.to_dict()
        d.pop("pretrained")
        d["mpn"].pop("dropout")
        return d


class InferenceEmbedder(nn.Module):
    """Backbone + head + L2-normalise: images (B, 3, H, W) -> unit embeddings (B, dim)."""

    def __init__(self, backbone: Backbone, head: EmbeddingHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)


class IBCModel(nn.Module):
    """Backbone, head, backbone classifier, MPN and MPN classifier (DESIGN §2)."""

    def __init__(self, config: ModelConfig | None = None, **overrides):
        super().__init__()
        config = config or ModelConfig()
        if overrides:
            config = ModelConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self.backbone = Backbone(config.backbone, pooling=config.pooling, pretrained=config.pretrained)
        self.head = EmbeddingHead(self.backbone.feature_dim, config.embed_dim)
        self.classifier = nn.Linear(config.embed_dim, config.num_classes)
        if config.use_mpn:
            m = config.mpn
            self.mpn = MessagePassingNetwork(config.embed_dim, m.num_layers, m.num_heads, m.cat, m.dropout, m.zero_logit)
            self.mpn_classifier = BNNeckClassifier(self.mpn.out_dim, config.num_classes)
        else:
            self.mpn = None
            self.mpn_classifier = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The unnormalised embedding f (B, dim)."""
        return self.head(self.backbone(images))

    def refine(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MPN features and MPN logits for a batch of embeddings (the whole global batch under DDP)."""
        if self.mpn is None:
            raise RuntimeError("this model was built with use_mpn=False")
        feats = self.mpn(f)
        return feats, self.mpn_classifier(feats)

    def forward(self, images: torch.Tensor, use_mpn: bool | None = None) -> dict[str, torch.Tensor]:
        f = self.embed(images)
        out = {"embedding": f, "logits": self.classifier(f)}
        if (self.mpn is not None) if use_mpn is None else use_mpn:
            out["mpn_features"], out["mpn_logits"] = self.refine(f)
        return out

    def inference_embedder(self) -> InferenceEmbedder:
        """The deployable part (shares parameters with this model): no MPN, no classifiers."""
        return InferenceEmbedder(self.backbone, self.head)
