"""Backbones, the embedding head, the MPN and the training model of Intra-Batch Connections."""

from models.backbones import (
    POOLINGS,
    Backbone,
    EmbeddingHead,
    GlobalPool,
    PretrainedWeightsError,
    PretrainedWeightsNotFound,
    create_backbone,
    get_backbone_spec,
    list_backbones,
    pretrained_preprocess,
    register_backbone,
)
from models.ibc import IBCModel, InferenceEmbedder, ModelConfig, MPNConfig
from models.mpn import (
    BatchAttention,
    BNNeckClassifier,
    MessagePassingLayer,
    MessagePassingNetwork,
    multi_head_attention_weights,
    softmax_with_zero_logit,
)

__all__ = [
    "POOLINGS", "Backbone", "EmbeddingHead", "GlobalPool", "PretrainedWeightsNotFound", "PretrainedWeightsError", "create_backbone",
    "pretrained_preprocess",
    "get_backbone_spec", "list_backbones", "register_backbone", "IBCModel", "InferenceEmbedder", "ModelConfig",
    "MPNConfig", "BatchAttention", "BNNeckClassifier", "MessagePassingLayer", "MessagePassingNetwork",
    "multi_head_attention_weights", "softmax_with_zero_logit",
]
