"""The message-passing network (MPN) of Intra-Batch Connections (DESIGN §2).

Every sample of the mini-batch is a node of a fully connected graph (self-loops included); each
layer is a post-norm Transformer encoder layer over the batch as a set, whose attention
normalisation has one extra virtual logit of 0, so a node may attend to "nothing".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def softmax_with_zero_logit(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(s_j) / (1 + sum_j exp(s_j))`` along ``dim``, computed stably.

    Equal to a softmax over the scores with one more logit of 0 appended, that extra entry then
    dropped: the weights sum to a little under 1.
    """
    lse = torch.logsumexp(scores, dim=dim, keepdim=True)
    lse = torch.logaddexp(lse, torch.zeros((), dtype=scores.dtype, device=scores.device))
    return torch.exp(scores - lse)


def multi_head_attention_weights(
    q: torch.Tensor, k: torch.Tensor, num_heads: int, zero_logit: bool = True
) -> torch.Tensor:
    """Attention weights (H, B, B) of the batch for (B, D) queries and keys split into H heads."""
    b, d = q.shape
    hd = d // num_heads
    qh = q.view(b, num_heads, hd).transpose(0, 1)  # (H, B, hd)
    kh = k.view(b, num_heads, hd).transpose(0, 1)
    scores = qh @ kh.transpose(1, 2) / math.sqrt(hd)
    return softmax_with_zero_logit(scores) if zero_logit else torch.softmax(scores, dim=-1)


class BatchAttention(nn.Module):
    """Multi-head scaled dot-product attention of every node to every node of the batch."""

    def __init__(self, dim: int = 512, num_heads: int = 2, dropout: float = 0.1, zero_logit: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.zero_logit = zero_logit
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)
        for lin in (self.q, self.k, self.v, self.out):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, d = h.shape
        a = multi_head_attention_weights(self.q(h), self.k(h), self.num_heads, self.zero_logit)
        a = self.attn_dropout(a)
        vh = self.v(h).view(b, self.num_heads, d // self.num_heads).transpose(0, 1)  # (H, B, hd)
        msg = (a @ vh).transpose(0, 1).reshape(b, d)  # messages summed over all nodes
        return self.out(msg)


class MessagePassingLayer(nn.Module):
    """Post-norm encoder layer: h = LN(h + drop(attn(h))); h = LN(h + drop(ffn(h)))."""

    def __init__(self, dim: int = 512, num_heads: int = 2, dropout: float = 0.1, zero_logit: bool = True,
                 ffn_mult: int = 4):
        super().__init__()
        self.attn = BatchAttention(dim, num_heads, dropout, zero_logit)
        self.drop1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_mult * dim, dim)
        )
        self.drop2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm1(h + self.drop1(self.attn(h)))
        return self.norm2(h + self.drop2(self.ffn(h)))


class MessagePassingNetwork(nn.Module):
    """Refines each embedding of a (B, dim) batch from all others.

    The input is L2-normalised (the graph's nodes), projected by ``Linear(dim, dim)``, then passed
    through ``num_layers`` message-passing layers. Returns (B, dim), or (B, num_layers·dim) with
    ``cat=True`` (all layers' outputs concatenated, as the released Cars config).
    """

    def __init__(self, dim: int = 512, num_layers: int = 1, num_heads: int = 2, cat: bool = False,
                 dropout: float = 0.1, zero_logit: bool = True, normalize_input: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        self.dim = dim
        self.cat = cat
        self.normalize_input = normalize_input
        self.input_proj = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(
            MessagePassingLayer(dim, num_heads, dropout, zero_logit) for _ in range(num_layers)
        )

    @property
    def out_dim(self) -> int:
        return self.dim * len(self.layers) if self.cat else self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MPN expects (B, {self.dim}) embeddings, got {tuple(x.shape)}")
        h = F.normalize(x, dim=1) if self.normalize_input else x
        h = self.input_proj(h)
        outs = []
        for layer in self.layers:
            h = layer(h)
            outs.append(h)
        return torch.cat(outs, dim=1) if self.cat else h


class BNNeckClassifier(nn.Module):
    """BatchNorm1d with its bias frozen at 0, then a bias-free Linear initialised N(0, 0.001²)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)
        self.fc = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.fc.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))
