"""How a catalogue's index is built and searched (:class:`IndexSpec`, saved with it), and memory budgets."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from sdk.catalog.errors import CatalogError
from sdk.catalog.vectors import positive_int

INDEX_KINDS = ("flat", "hnsw", "ivfpq")

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40}


def parse_memory(value: int | str | None) -> int:
    """``"4G"``, ``"512MB"``, an int of bytes, or None (half the memory available now)."""
    if value is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 << 30
        return max(avail // 2, 256 << 20)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value <= 0:
            raise CatalogError(f"max_memory must be positive, got {value}")
        return int(value)
    text = str(value).strip().upper().replace("IB", "B")
    num = text.rstrip("KMGTB ")
    unit = text[len(num):].strip()
    try:
        return int(float(num) * _UNITS[unit])
    except (ValueError, KeyError):
        raise CatalogError(f"cannot read max_memory {value!r}; use bytes or e.g. '4G', '512M'") from None


@dataclass
class IndexSpec:
    """How the index is built and searched; saved with the catalogue."""

    kind: str = "auto"  # auto | flat | hnsw | ivfpq
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64  # default per-query HNSW beam width
    # HNSW graph over a learned projection to this many dims (None: the full vectors); the
    # graph's refine_factor * k candidates are then re-scored exactly on the fp32 vectors
    hnsw_dims: int | None = None
    refine_factor: int = 3
    nlist: int | None = None  # IVF lists; None: ~4*sqrt(n) rounded to a power of two
    pq_m: int | None = None  # PQ sub-quantizers; None: dim / 8 (or what the memory budget allows)
    pq_nbits: int = 8
    nprobe: int = 16  # default per-query IVF lists visited
    max_memory: int | str | None = None  # budget for "auto"; None: half the available RAM
    compact_fraction: float = 0.25  # flat / HNSW: rebuild when this share of the index is tombstones
    train_size: int | None = None  # IVF-PQ training sample; None: max(40 * nlist, 10k)
    seed: int = 1234
    exact_int8: bool = True  # flat: certified int8 scan (see Int8ExactScan) when onnxruntime is there

    def __post_init__(self):
        if self.kind not in ("auto",) + INDEX_KINDS:
            raise CatalogError(f"index must be one of auto, {', '.join(INDEX_KINDS)}; got {self.kind!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "pq_nbits", "nprobe", "refine_factor"):
            positive_int(getattr(self, name), name)
        for name in ("nlist", "pq_m", "train_size", "hnsw_dims"):
            if getattr(self, name) is not None:
                positive_int(getattr(self, name), name)
        if not 0 < self.compact_fraction <= 1:
            raise CatalogError(f"compact_fraction must be in (0, 1], got {self.compact_fraction}")
        parse_memory(self.max_memory)  # validate early

    def projected_dims(self, dim: int) -> int | None:
        """Dims of an HNSW graph's projection for ``dim``-d vectors, or None (the graph walks them whole)."""
        return self.hnsw_dims if self.hnsw_dims and self.hnsw_dims < dim else None

    @classmethod
    def from_dict(cls, d: dict) -> "IndexSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class SearchParams:
    """Per-call search settings; None takes the spec's default. Each index reads the one it knows."""

    ef_search: int | None = None  # HNSW beam width
    nprobe: int | None = None  # IVF lists visited

    @classmethod
    def checked(cls, ef_search: Any = None, nprobe: Any = None) -> "SearchParams":
        return cls(None if ef_search is None else positive_int(ef_search, "ef_search"),
                   None if nprobe is None else positive_int(nprobe, "nprobe"))
