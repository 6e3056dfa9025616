"""The certified int8 exact scan that a large flat catalogue is searched with (see :class:`Int8ExactScan`)."""

from __future__ import annotations

import base64
import importlib.util

import numpy as np

from sdk.cpu import int8_dot_exact

INT8_MIN_ENTRIES = 20_000  # below this the fp32 scan is fast enough and the int8 codes not worth keeping

# A 271-byte ONNX graph, shape-generic: values, indices = TopK(MatMulInteger(q:u8[n,d], xt:i8[d,N], zp=128), k),
# axis 1, largest, unsorted. Embedded so the SDK needs onnxruntime but not the onnx package;
# tests/test_sdk_catalog.py rebuilds it with onnx.helper and checks it is the same graph.
INT8_TOPK_ONNX = base64.b64decode(
    "CAgSB2liYy1zZGs6+wEKHQoBcQoCeHQKAnpwEgFzIg1NYXRNdWxJbnRlZ2VyCkkKAXMKAWsSBnZhbHVlcxIHaW5kaWNlcyIEVG9wSyoLCgRh"
    "eGlzGAGgAQIqDgoHbGFyZ2VzdBgBoAECKg0KBnNvcnRlZBgAoAECEglpbnQ4X3RvcGsqCRACQgJ6cEoBgFoVCgFxEhAKDggCEgoKAxIBbgoD"
    "EgFkWhYKAnh0EhAKDggDEgoKAxIBZAoDEgFOWg8KAWsSCgoICAcSBAoCCAFiGwoGdmFsdWVzEhEKDwgGEgsKAxIBbgoEEgJra2IcCgdpbmRp"
    "Y2VzEhEKDwgHEgsKAxIBbgoEEgJra0IECgAQEQ=="
)


def int8_scan_available() -> bool:
    try:
        return importlib.util.find_spec("onnxruntime") is not None
    except (ImportError, ValueError):
        return False


class Int8ExactScan:
    """Exact top-k over the vectors of a flat index, several times faster than an fp32 BLAS scan.

    Why: exact search is a GEMM, and CPUs run int8 GEMMs (VNNI, AMX, ARM dot-product) several
    times faster than fp32 ones. Exactness is kept by certification, not hoped for:

    * every vector x is stored as 7-bit codes with one catalogue-wide scale, and its quantisation
      error ``e_x = ||x - x_hat||`` is known; a query q (unit norm) is quantised per row with
      error ``e_q``. Then ``|q.x - q_hat.x_hat| <= e_x + e_q (1 + e_x)`` (Cauchy-Schwarz);
    * the int8 scan (ONNX Runtime ``MatMulInteger`` + ``TopK``, in blocks of 65,536 vectors)
      proposes the ``KPRIME`` best by approximate score; they are re-scored exactly in fp32
      (queries not certified with those get a second pass with ``KPRIME_WIDE`` candidates);
    * if the exact k-th best score t exceeds ``c + eps`` (c: the lowest approximate score among
      the candidates, so an upper bound for everything left out; eps: the bound above with the
      largest e_x), no excluded vector can reach the top k: the answer is exact. Otherwise the
      query is reported uncertified and the caller answers it with faiss's fp32 scan.

    Vectors that quantise badly (``e_x > OUTLIER``, e.g. one huge component) are not trusted to
    the bound; they are scored exactly for every query. Codes are 8-bit where the int8 GEMM
    accumulates exactly (VNNI, AMX, ARM), else 7-bit so that u8 x s8 pair sums cannot saturate
    (AVX2 without VNNI). Positions follow the flat index's order.
    Removed entries stay in place as tombstones (``mask``): they are never returned, and a query
    whose candidates they crowd out is simply not certified. Not thread-safe for writes: the
    catalogue calls ``append`` and ``mask`` under its write lock only.
    """

    BLOCK = 1 << 16
    OUTLIER = 0.06
    KPRIME = 64
    KPRIME_WIDE = 1024
    Q_CHUNK = 512
    MAX_OUTLIERS = 4096

    def __init__(self, dim: int, scale: float):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(INT8_TOPK_ONNX, so, providers=["CPUExecutionProvider"])
        self.dim, self.scale = dim, float(scale)
        self.code_max = self.code_max_here()
        self.blocks: list[np.ndarray] = []  # (dim, BLOCK) int8; column j of block b = position b*BLOCK + j
        self.n = 0
        self.emax = 0.0
        self.outliers = np.zeros(0, np.int64)  # positions
        self.ids = np.zeros(0, np.int64)  # internal id of each position (ascending)
        self.dead = np.zeros(0, bool)  # tombstone of each position
        self.queries = 0
        self.uncertified = 0

    @staticmethod
    def code_max_here() -> int:
        return 127 if int8_dot_exact() else 63

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray) -> "Int8ExactScan":
        sample = vectors[:: max(1, len(vectors) // 100_000)]
        top = float(np.quantile(np.abs(sample), 0.9999)) if len(sample) else 1.0
        scan = cls(vectors.shape[1], max(top, 1e-6) / cls.code_max_here())
        scan.append(vectors, ids)
        return scan

    @property
    def usable(self) -> bool:
        return len(self.outliers) <= self.MAX_OUTLIERS

    def append(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors (unit norm, float32) at the next positions."""
        for s in range(0, len(vectors), self.BLOCK):
            x = vectors[s:s + self.BLOCK]
            scaled = x * np.float32(1.0 / self.scale)
            np.rint(scaled, out=scaled)
            np.clip(scaled, -self.code_max, self.code_max, out=scaled)
            codes = scaled.astype(np.int8)
            scaled *= np.float32(self.scale)
            np.subtract(x, scaled, out=scaled)  # quantisation error per component
            err = np.sqrt(np.einsum("ij,ij->i", scaled, scaled, dtype=np.float64))
            bad = err > self.OUTLIER
            if (~bad).any():
                self.emax = max(self.emax, float(err[~bad].max()))
            if bad.any():
                self.outliers = np.concatenate([self.outliers, self.n + np.flatnonzero(bad)])
            done = 0
            while done < len(codes):
                fill = self.n % self.BLOCK
                if fill == 0:
                    self.blocks.append(np.zeros((self.dim, self.BLOCK), np.int8))
                take = min(self.BLOCK - fill, len(codes) - done)
                self.blocks[-1][:, fill:fill + take] = codes[done:done + take].T
                self.n += take
                done += take
        self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])
        self.dead = np.concatenate([self.dead, np.zeros(len(ids), bool)])

    def mask(self, ids: np.ndarray) -> None:
        """Tombstone the positions of these internal ids: they stay in the codes, never in a result."""
        ids = np.asarray(ids, np.int64)
        pos = np.searchsorted(self.ids, ids)
        inside = pos < self.n
        pos, ids = pos[inside], ids[inside]
        self.dead[pos[self.ids[pos] == ids]] = True

    def search(self, q: np.ndarray, k: int, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, positions, certified) for unit queries ``q``; ``xb`` is the fp32 (n, d) storage."""
        nq = len(q)
        k = min(k, self.n)
        scores = np.full((nq, k), -np.inf, np.float32)
        pos = np.full((nq, k), -1, np.int64)
        ok = np.zeros(nq, bool)
        todo = np.arange(nq)
        for kp in (max(self.KPRIME, 2 * k), max(self.KPRIME_WIDE, 16 * k)):
            kp = min(kp, self.n)
            for s in range(0, len(todo), self.Q_CHUNK):
                rows = todo[s:s + self.Q_CHUNK]
                scores[rows], pos[rows], ok[rows] = self._search_chunk(np.ascontiguousarray(q[rows]), k, kp, xb)
            todo = np.flatnonzero(~ok)
            if len(todo) == 0 or kp == self.n:
                break
        self.queries += nq
        self.uncertified += int((~ok).sum())
        return scores, pos, ok

    def _search_chunk(self, q: np.ndarray, k: int, kp: int, xb: np.ndarray):
        aq = np.abs(q).max(axis=1) / 127.0
        q8 = np.rint(q / aq[:, None])
        e_q = np.linalg.norm(q - q8 * aq[:, None], axis=1)
        qu = (q8 + 128).astype(np.uint8)
        vals, poss = [], []
        for b, block in enumerate(self.blocks):
            count = min(self.BLOCK, self.n - b * self.BLOCK)
            xt = block if count == self.BLOCK else np.ascontiguousarray(block[:, :count])
            v, i = self.session.run(None, {"q": qu, "xt": xt, "k": np.array([min(kp, count)], np.int64)})
            vals.append(v)
            poss.append(i + b * self.BLOCK)
        V, P = np.concatenate(vals, axis=1), np.concatenate(poss, axis=1)
        if V.shape[1] > kp:
            pick = np.argpartition(-V, kp - 1, axis=1)[:, :kp]
            V, P = np.take_along_axis(V, pick, 1), np.take_along_axis(P, pick, 1)
        # lowest approximate score among candidates: an upper bound for every excluded vector
        cut = (V.min(axis=1).astype(np.float64) * aq * self.scale) if kp < self.n else np.full(len(q), -np.inf)
        exact = np.matmul(xb[P], q[:, :, None])[:, :, 0]  # (nq, kp) fp32 re-rank
        if len(self.outliers):
            exact[np.isin(P, self.outliers)] = -np.inf  # scored below, exactly, once
            exact = np.concatenate([exact, q @ xb[self.outliers].T], axis=1)
            P = np.concatenate([P, np.broadcast_to(self.outliers, (len(q), len(self.outliers)))], axis=1)
        exact[self.dead[P]] = -np.inf  # tombstones: a query short of live candidates is not certified
        top = np.argpartition(-exact, k - 1, axis=1)[:, :k]
        top_s = np.take_along_axis(exact, top, 1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        top_s, top_p = np.take_along_axis(top_s, order, 1), np.take_along_axis(np.take_along_axis(P, top, 1), order, 1)
        eps = self.emax + e_q * (1.0 + self.emax) + 1e-5
        certified = top_s[:, -1] > cut + eps
        return top_s, top_p, certified


