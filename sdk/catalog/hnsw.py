"""Approximate search on an HNSW graph, optionally walked on a learned low-dimensional projection.

HNSW graphs cannot drop nodes: removed entries are tombstones, filtered inside the graph walk;
past ``compact_fraction`` the graph is rebuilt from the live vectors.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from sdk.catalog.errors import CatalogError
from sdk.catalog.index import PER_ENTRY_PYTHON, FaissIndex
from sdk.catalog.spec import IndexSpec, SearchParams
from sdk.catalog.vectors import faiss_module

log = logging.getLogger(__name__)

PROJECTION_SAMPLE = 100_000


def projection_matrix(vectors: np.ndarray, dims: int, seed: int = 0) -> np.ndarray:
    """(dims, dim) orthonormal rows spanning the subspace that holds most of the vectors' energy.

    Why uncentred (second-moment) PCA: an orthogonal projection P keeps inner products up to
    what lies outside the subspace, q.x ~ Pq.Px, which is what an inner-product graph needs;
    centring would add a per-vector offset to every score. Trained embeddings concentrate in
    far fewer dimensions than they have, so a graph walked in ``dims`` dimensions finds the
    same neighbourhoods for a fraction of the memory traffic, and the exact re-rank fixes the
    order.
    """
    n = len(vectors)
    if n < dims:
        raise CatalogError(f"a projection to {dims} dims needs at least {dims} vectors to learn it from (got {n})")
    sample = vectors
    if n > PROJECTION_SAMPLE:
        pick = np.sort(np.random.default_rng(seed).choice(n, PROJECTION_SAMPLE, replace=False))
        sample = vectors[pick]
    gram = sample.T.astype(np.float64) @ sample.astype(np.float64)
    _, eigvec = np.linalg.eigh(gram)  # eigenvalues ascending
    return np.ascontiguousarray(eigvec[:, ::-1][:, :dims].T, dtype=np.float32)


class HNSWIndex(FaissIndex):
    kind = "hnsw"

    @property
    def projected(self) -> int | None:
        """Dims of the graph's projection, or None when the graph walks the full vectors."""
        return self.spec.projected_dims(self.dim)

    @classmethod
    def build(cls, dim: int, spec: IndexSpec, first: np.ndarray) -> "HNSWIndex":
        faiss = faiss_module()
        dims = spec.projected_dims(dim)
        h = faiss.IndexHNSWFlat(dims or dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        h.hnsw.efConstruction = spec.ef_construction
        h.hnsw.efSearch = spec.ef_search
        if not dims:
            return cls(dim, spec, faiss.IndexIDMap2(h))
        t0 = time.perf_counter()
        proj = faiss.LinearTransform(dim, dims, False)
        faiss.copy_array_to_vector(projection_matrix(first, dims, spec.seed).ravel(), proj.A)
        proj.is_trained = True
        log.info("learned a %d -> %d projection for the HNSW graph on %d vectors in %.1fs", dim, dims,
                 min(len(first), PROJECTION_SAMPLE), time.perf_counter() - t0)
        # exact re-rank on the fp32 vectors kept beside the graph (IndexRefineFlat)
        return cls(dim, spec, faiss.IndexIDMap2(faiss.IndexRefineFlat(faiss.IndexPreTransform(proj, h))))

    @staticmethod
    def estimate_bytes(n: int, dim: int, spec: IndexSpec) -> int:
        per = 4 * dim + 8 + int(spec.hnsw_m * 2 * 4 * 1.1) + 16  # level-0 links dominate
        per += 4 * (spec.projected_dims(dim) or 0)  # the projected copy the graph walks on
        return n * (per + PER_ENTRY_PYTHON)

    def storage(self):
        faiss = faiss_module()
        inner = faiss.downcast_index(self.faiss_index.index)
        if isinstance(inner, faiss.IndexRefine):  # projected: the fp32 vectors are the refine store
            return faiss.downcast_index(inner.refine_index)
        return faiss.downcast_index(inner.storage)

    def compact(self) -> None:
        t0 = time.perf_counter()
        ids, vecs = self.vectors()
        fresh = self.build(self.dim, self.spec, vecs)
        if len(ids):
            fresh.add(vecs, ids)
        self.faiss_index = fresh.faiss_index
        self.dead.clear()
        self._selector = None
        log.info("rebuilt the HNSW graph over %d live vectors in %.1fs", len(ids), time.perf_counter() - t0)

    def live_selector(self):
        sel = super().live_selector()
        if sel is None or not self.projected:
            return sel
        # the graph sits below IndexRefineFlat, which does not pass IndexIDMap2's translated
        # selector down: translate graph positions -> internal ids ourselves
        return (faiss_module().IDSelectorTranslated(self.faiss_index.id_map, sel[0]),) + sel

    def search(self, q: np.ndarray, k: int, params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
        faiss = faiss_module()
        p = faiss.SearchParametersHNSW()
        width = k * self.spec.refine_factor if self.projected else k
        p.efSearch = max(params.ef_search or self.spec.ef_search, width)
        selector = self._selector  # one read: a concurrent writer cannot hold the write lock meanwhile
        if selector is not None:
            p.sel = selector[0]
        if not self.projected:
            return self.search_faiss(q, k, p)
        rp = faiss.IndexRefineSearchParameters(k_factor=float(self.spec.refine_factor), base_index_params=p)
        rp.base_params_ref = p  # SWIG keeps a pointer only: hold the Python object with it
        return self.search_faiss(q, k, rp)
