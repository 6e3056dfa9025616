"""Exact search: a faiss flat inner-product index, searched by the certified int8 scan when it is large.

Removal is by tombstones, masked in both the int8 scan and faiss's fp32 scan, so the first
search after a ``remove`` costs what any search costs (rebuilding the scan's codes would take
seconds on a million vectors); past ``compact_fraction`` they are removed from faiss for good and
the scan is rebuilt once.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from sdk.catalog import int8_scan
from sdk.catalog.index import PER_ENTRY_PYTHON, FaissIndex
from sdk.catalog.int8_scan import Int8ExactScan, int8_scan_available
from sdk.catalog.spec import IndexSpec, SearchParams
from sdk.catalog.vectors import faiss_module

log = logging.getLogger(__name__)


class FlatIndex(FaissIndex):
    kind = "flat"

    def __init__(self, dim: int, spec: IndexSpec, index):
        super().__init__(dim, spec, index)
        self._scan: Int8ExactScan | None = None  # built on first search, kept in step by add / remove
        self._scan_lock = threading.Lock()

    @classmethod
    def build(cls, dim: int, spec: IndexSpec, first: np.ndarray) -> "FlatIndex":
        faiss = faiss_module()
        return cls(dim, spec, faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    @staticmethod
    def estimate_bytes(n: int, dim: int, spec: IndexSpec) -> int:
        per = 4 * dim + 8 + (dim if n >= int8_scan.INT8_MIN_ENTRIES else 0)  # + int8 codes of the exact scan
        return n * (per + PER_ENTRY_PYTHON)

    def storage(self):
        return faiss_module().downcast_index(self.faiss_index.index)

    def stored_vectors(self) -> np.ndarray:
        """Zero-copy (n, dim) view of the fp32 storage, tombstones included (valid while the catalogue is locked)."""
        faiss = faiss_module()
        inner = self.storage()
        return faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * self.dim).reshape(inner.ntotal, self.dim)

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        super().add(x, ids)
        if self._scan is not None:
            self._scan.append(x, ids)

    def tombstoned(self, ids: np.ndarray) -> None:
        if self._scan is not None:
            self._scan.mask(ids)

    def compact(self) -> None:
        t0 = time.perf_counter()
        dead = np.fromiter(self.dead, np.int64, len(self.dead))
        removed = self.faiss_index.remove_ids(faiss_module().IDSelectorBatch(dead))
        if removed != len(dead):
            raise RuntimeError(f"faiss removed {removed} of {len(dead)} entries; catalogue inconsistent")
        self.dead.clear()
        self._selector = None
        self._scan = None  # positions shifted: rebuilt on the next search
        log.info("compacted the flat index: %d tombstones removed in %.1fs", len(dead), time.perf_counter() - t0)

    def _exact_scan(self) -> Int8ExactScan | None:
        """The int8 scanner of a large flat catalogue, built on first use.

        Built under the catalogue's read lock (the data cannot change meanwhile) by one thread at a time.
        """
        if (not self.spec.exact_int8 or self.faiss_index.ntotal < int8_scan.INT8_MIN_ENTRIES
                or not int8_scan_available()):
            return None
        scan = self._scan
        if scan is None:
            with self._scan_lock:
                scan = self._scan
                if scan is None:
                    t0 = time.perf_counter()
                    ids = faiss_module().vector_to_array(self.faiss_index.id_map).astype(np.int64)
                    scan = Int8ExactScan.build(self.stored_vectors(), ids)
                    if self.dead:
                        scan.mask(np.fromiter(self.dead, np.int64, len(self.dead)))
                    self._scan = scan
                    log.info("built the int8 exact scan over %d vectors in %.1fs (%d outliers)", scan.n,
                             time.perf_counter() - t0, len(scan.outliers))
        return scan if scan.usable else None

    def _params(self):
        if self._selector is None:
            return None
        return faiss_module().SearchParameters(sel=self._selector[0])

    def search(self, q: np.ndarray, k: int, params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
        scan = self._exact_scan()
        if scan is None:
            return self.search_faiss(q, k, self._params())
        D, P, ok = scan.search(q, k, self.stored_vectors())
        I = np.where(P >= 0, scan.ids[np.maximum(P, 0)], -1)
        if not ok.all():  # not certified: faiss's fp32 scan answers these queries
            bad = np.flatnonzero(~ok)
            D[bad], I[bad] = self.search_faiss(np.ascontiguousarray(q[bad]), k, self._params())
        return D, I

    def describe(self) -> dict:
        scan = self._scan
        return {"exact_scan": None if scan is None else {
            "kind": "int8 certified", "queries": scan.queries, "uncertified_fallbacks": scan.uncertified,
            "outliers": len(scan.outliers)}}
