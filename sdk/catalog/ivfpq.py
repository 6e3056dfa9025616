"""Compressed approximate search: IVF lists over product-quantised codes, for catalogues beyond RAM.

It keeps codes only (the fp32 vectors cannot be recovered, so it is the last index ``"auto"``
migrates to); removal is native.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from sdk.catalog.errors import CatalogError
from sdk.catalog.index import PER_ENTRY_PYTHON, FaissIndex
from sdk.catalog.spec import IndexSpec, SearchParams, parse_memory
from sdk.catalog.vectors import faiss_module

log = logging.getLogger(__name__)


def _largest_divisor_at_most(d: int, cap: int) -> int:
    for m in range(max(1, min(cap, d)), 0, -1):
        if d % m == 0:
            return m
    return 1


def ivfpq_params(n: int, dim: int, spec: IndexSpec, budget: int | None = None) -> tuple[int, int]:
    """(nlist, pq_m) for ``n`` training vectors: nlist ~ 4 sqrt(n) (power of two, <= n/39)."""
    if spec.nlist:
        nlist = spec.nlist
    else:
        nlist = 2 ** int(round(math.log2(max(4 * math.sqrt(max(n, 1)), 1))))
        nlist = int(min(max(nlist, 1), 65536, max(n // 39, 1)))
    if spec.pq_m:
        m = spec.pq_m
        if dim % m:
            raise CatalogError(f"pq_m={m} must divide the dimension {dim}")
    else:
        m = _largest_divisor_at_most(dim, max(dim // 8, 1))
        if budget is not None:  # shrink codes until they fit
            while m > 1 and n * (m * spec.pq_nbits // 8 + 8) > budget:
                m = _largest_divisor_at_most(dim, m // 2)
    return nlist, m


class IVFPQIndex(FaissIndex):
    kind = "ivfpq"
    native_remove = True

    @classmethod
    def build(cls, dim: int, spec: IndexSpec, first: np.ndarray) -> "IVFPQIndex":
        faiss = faiss_module()
        n = len(first)
        need = max(256, 2 ** spec.pq_nbits)
        if n < need:
            raise CatalogError(
                f"an IVF-PQ catalogue trains on its first add and needs at least {need} "
                f"vectors there (got {n}); add more at once, or use index='flat' or 'auto'"
            )
        budget = parse_memory(spec.max_memory) if spec.kind == "auto" else None
        nlist, m = ivfpq_params(n, dim, spec, budget)
        if nlist > n:
            raise CatalogError(f"nlist={nlist} is more than the {n} training vectors")
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, m, spec.pq_nbits, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = spec.nprobe
        size = min(n, spec.train_size or max(40 * nlist, 10_000))
        sample = first
        if size < n:
            sample = first[np.sort(np.random.default_rng(spec.seed).choice(n, size, replace=False))]
        t0 = time.perf_counter()
        ivf.cp.seed = spec.seed
        # we checked the sample size ourselves; spare the user faiss's per-sub-quantizer warnings
        ivf.cp.min_points_per_centroid = 1
        ivf.pq.cp.min_points_per_centroid = 1
        ivf.train(sample)
        log.info("trained IVF%d,PQ%dx%d on %d vectors in %.1fs", nlist, m, spec.pq_nbits, size,
                 time.perf_counter() - t0)
        return cls(dim, spec, ivf)

    @staticmethod
    def estimate_bytes(n: int, dim: int, spec: IndexSpec) -> int:
        per = (spec.pq_m or max(dim // 8, 1)) * spec.pq_nbits // 8 + 8
        return n * (per + PER_ENTRY_PYTHON)

    def search(self, q: np.ndarray, k: int, params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
        p = faiss_module().SearchParametersIVF()
        p.nprobe = params.nprobe or self.spec.nprobe
        return self.search_faiss(q, k, p)

    def describe(self) -> dict:
        return {"params": f"nlist={self.faiss_index.nlist}, PQ{self.faiss_index.pq.M}x{self.faiss_index.pq.nbits}"}
