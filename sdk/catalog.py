"""The catalogue: a faiss index over L2-normalised embeddings, plus user ids, metadata and a lock.

Why a wrapper: faiss knows int64 ids and float vectors only. Users have string or integer ids and
JSON metadata, want removals on every index type, concurrent searches while one writer adds, and
a saved catalogue that cannot be silently reused with another model. This module owns all that;
it knows nothing about images or models (the :class:`~sdk.retriever.Retriever` does).

Design decisions:

* **Ids.** Every entry gets an internal int64 id from a counter that never goes back, so an id
  is never reused. Flat and HNSW indexes are wrapped in ``IndexIDMap2``; IVF-PQ stores the ids
  itself. Python dicts map user ids <-> internal ids; metadata is stored as its JSON text (it is
  validated on the way in, and every hit gets a fresh copy).
* **Removal.** Flat and IVF-PQ remove natively (``remove_ids``). HNSW graphs cannot drop nodes,
  so removed entries become tombstones, excluded at search time by an ``IDSelector`` (faiss
  filters inside the graph walk, so a search still returns k live hits); when tombstones exceed
  ``compact_fraction`` of the graph it is rebuilt from the live vectors.
* **Concurrency.** A writer-preferring readers-writer lock: any number of searches run at once
  (faiss releases the GIL), ``add``/``remove`` take it exclusively for the index update only (the
  validation happens before), so a search sees the catalogue entirely before or entirely after a
  write. Per-query search parameters go through faiss ``SearchParameters`` objects built per call,
  never by mutating shared index fields.
* **Exact search, faster.** A flat catalogue of >= ``INT8_MIN_ENTRIES`` vectors is searched by
  :class:`Int8ExactScan` when ONNX Runtime is present: an int8 GEMM (VNNI/AMX/NEON-dot) proposes
  candidates, fp32 re-ranks them, and a rigorous quantisation-error bound certifies that nothing
  outside the candidates can enter the top k; queries it cannot certify are answered by faiss's
  fp32 scan. The answer is the exact top-k either way.
* **Index choice.** ``"auto"`` follows autofaiss's reasoning: exact search while it is cheap,
  HNSW when the vectors plus graph fit the memory budget, IVF-PQ (compressed codes) when they do
  not. It is re-evaluated as the catalogue grows and the index migrated once a threshold is
  crossed (one rebuild, logged).
* **Saving.** Written into a temporary sibling directory and renamed into place
  (:func:`sdk.bundle.atomic_directory`); ``catalog.json`` records each file's size and SHA-256
  and the model the vectors came from, so a partial copy, a tampered file or another model's
  catalogue is refused on load with a message saying which.
"""

from __future__ import annotations

from sdk.errors import IbcError

import base64
import contextlib
import importlib.util
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from sdk.bundle import atomic_directory, sha256_file

log = logging.getLogger(__name__)

CATALOG_FORMAT = "ibc-catalog"
CATALOG_SCHEMA_VERSION = 1
CATALOG_FILE = "catalog.json"
INDEX_FILE = "index.faiss"
ENTRIES_FILE = "entries.jsonl"
DELETED_FILE = "deleted.npy"
INDEX_KINDS = ("flat", "hnsw", "ivfpq")
_KIND_ORDER = {"flat": 0, "hnsw": 1, "ivfpq": 2}

# "auto" thresholds (autofaiss-like): exact search below this size, it is fast and perfect there.
AUTO_FLAT_MAX = 50_000
# IVF-PQ needs this many points to train 256 centroids per sub-quantizer (faiss warns below 39 * 256).
MIN_PQ_TRAIN = 39 * 256


def _faiss():
    import faiss  # lazy: importing the SDK must stay cheap

    return faiss


def faiss_search(index, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` that survives ``faiss.contrib.torch_utils``.

    Importing that module (pytorch-metric-learning does) replaces every ``Index.search`` with a
    torch-aware wrapper that drops the ``params`` argument; the original stays as
    ``search_numpy``. Call the original when it exists, so per-query efSearch / nprobe and
    ID selectors keep working in any process.
    """
    search = getattr(index, "search_numpy", None) or index.search
    return search(q, k, params=params) if params is not None else search(q, k)


# --------------------------------------------------------------------------------------- errors
class CatalogError(IbcError, ValueError):
    """Bad input to, or an unusable state of, a catalogue."""


class VectorError(CatalogError):
    """Vectors of the wrong shape, dtype or with NaN / inf / zero rows."""


class DuplicateIdError(CatalogError):
    """An id given to ``add`` is repeated in the batch or already in the catalogue."""


class UnknownIdError(CatalogError, KeyError):
    """``remove`` was asked for ids the catalogue does not hold."""

    __str__ = ValueError.__str__  # KeyError would quote the whole message


class CatalogFormatError(CatalogError):
    """A saved catalogue is missing files, partially written, tampered with or of an unknown schema."""


class CatalogMismatchError(CatalogError):
    """A saved catalogue was built with a different model than the one it is opened with."""


class Hit(NamedTuple):
    """One search result; unpacks as ``id, score, metadata``."""

    id: Any
    score: float
    metadata: dict | None


@dataclass
class AddReport:
    """What ``add`` did: ids added in input order, and items skipped as ``(position, item, reason)``."""

    ids: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------------------- lock
class RWLock:
    """Many readers or one writer. Writer-preferring, so a stream of searches cannot starve ``add``.

    Not re-entrant: a thread holding it must not ask again.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ----------------------------------------------------------------------------------- validation
def _rows(idx: np.ndarray, limit: int = 5) -> str:
    idx = [int(i) for i in idx[:limit]]
    return ", ".join(map(str, idx)) + (", ..." if len(idx) == limit else "")


def as_vectors(x: Any, dim: int, what: str = "vectors") -> np.ndarray:
    """Validate vectors and return an (n, dim) float32 C-contiguous, L2-normalised copy."""
    if isinstance(x, (list, tuple)) and len(x) == 0:
        return np.zeros((0, dim), np.float32)
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:
        raise VectorError(f"{what}: not an array of numbers ({e})") from None
    if arr.dtype.kind != "f":
        raise VectorError(f"{what} must be floating point (float16/32/64), got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise VectorError(f"{what} must be 1-D (one vector) or 2-D (n, {dim}), got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise VectorError(f"{what} have dimension {arr.shape[1]}, the catalogue holds {dim}-d vectors")
    with np.errstate(over="ignore"):
        out = np.array(arr, dtype=np.float32, order="C", copy=True)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        raise VectorError(f"{what} contain NaN or inf at row(s) {_rows(np.flatnonzero(~finite))}")
    norms = np.linalg.norm(out, axis=1)
    if (norms == 0).any():
        raise VectorError(f"{what} are all-zero at row(s) {_rows(np.flatnonzero(norms == 0))}; cannot L2-normalise")
    out /= norms[:, None]
    return out


def _id_kind(uid: Any) -> str:
    return "str" if isinstance(uid, str) else "int"


def normalize_id(uid: Any, where: str = "id") -> int | str:
    """User ids are ``str`` or ``int`` (numpy integers accepted); anything else is refused."""
    if isinstance(uid, (bool, np.bool_)):
        raise CatalogError(f"{where}: ids must be str or int, got bool {uid!r}")
    if isinstance(uid, (int, np.integer)):
        return int(uid)
    if isinstance(uid, str):
        if not uid:
            raise CatalogError(f"{where}: empty string is not a valid id")
        return uid
    raise CatalogError(f"{where}: ids must be str or int, got {type(uid).__name__} {uid!r}")


def _as_id_list(ids: Any) -> list:
    if isinstance(ids, (str, int, np.integer)):
        return [ids]
    if isinstance(ids, np.ndarray):
        return ids.ravel().tolist()
    return list(ids)


def _metadata_json(metadata: Any, n: int) -> list[str | None]:
    if metadata is None:
        return [None] * n
    if isinstance(metadata, dict):
        metadata = [metadata]
    metadata = list(metadata)
    if len(metadata) != n:
        raise CatalogError(f"got {len(metadata)} metadata entries for {n} items")
    out = []
    for i, m in enumerate(metadata):
        if m is None:
            out.append(None)
            continue
        if not isinstance(m, dict):
            raise CatalogError(f"metadata of item {i} must be a dict (or None), got {type(m).__name__}")
        try:
            out.append(json.dumps(m, separators=(",", ":"), ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise CatalogError(f"metadata of item {i} is not JSON-serialisable: {e}") from None
    return out


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise CatalogError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------- index settings
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
    compact_fraction: float = 0.25  # HNSW: rebuild when this share of the graph is tombstones
    train_size: int | None = None  # IVF-PQ training sample; None: max(40 * nlist, 10k)
    seed: int = 1234
    exact_int8: bool = True  # flat: certified int8 scan (see Int8ExactScan) when onnxruntime is there

    def __post_init__(self):
        if self.kind not in ("auto",) + INDEX_KINDS:
            raise CatalogError(f"index must be one of auto, {', '.join(INDEX_KINDS)}; got {self.kind!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "pq_nbits", "nprobe", "refine_factor"):
            _positive_int(getattr(self, name), name)
        for name in ("nlist", "pq_m", "train_size", "hnsw_dims"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), name)
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


def estimate_bytes(kind: str, n: int, dim: int, spec: IndexSpec | None = None) -> int:
    """Rough resident size of an index of ``n`` vectors (plus our id maps), for ``"auto"``."""
    spec = spec or IndexSpec()
    per_entry_python = 200  # two dict slots, the ids themselves
    if kind == "flat":
        per = 4 * dim + 8 + (dim if n >= INT8_MIN_ENTRIES else 0)  # + int8 codes of the exact scan
    elif kind == "hnsw":
        per = 4 * dim + 8 + int(spec.hnsw_m * 2 * 4 * 1.1) + 16  # level-0 links dominate
        per += 4 * (spec.projected_dims(dim) or 0)  # the projected copy the graph walks on
    elif kind == "ivfpq":
        per = (spec.pq_m or max(dim // 8, 1)) * spec.pq_nbits // 8 + 8
    else:
        raise CatalogError(f"unknown index kind {kind!r}")
    return n * (per + per_entry_python)


def choose_index(n: int, dim: int, max_memory: int | str | None = None, spec: IndexSpec | None = None) -> str:
    """The index kind ``"auto"`` uses for ``n`` vectors under a memory budget (autofaiss's reasoning).

    Exact search while the catalogue is small (it is fast there and perfect), HNSW while raw
    vectors plus graph fit the budget (best speed/recall), else IVF-PQ with compressed codes.
    Too few vectors to train IVF-PQ (< ``MIN_PQ_TRAIN``) always means flat.
    """
    budget = parse_memory(max_memory)
    if n < MIN_PQ_TRAIN:
        return "flat"
    if n < AUTO_FLAT_MAX and estimate_bytes("flat", n, dim, spec) <= budget:
        return "flat"
    if estimate_bytes("hnsw", n, dim, spec) <= budget:
        return "hnsw"
    return "ivfpq"


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


# ----------------------------------------------------------------------------- projected HNSW
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


# ------------------------------------------------------------------------------- int8 exact scan
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


def _int8_dot_cannot_saturate() -> bool:
    """True where ONNX Runtime's u8 x s8 GEMM accumulates exactly for full 8-bit codes.

    x86 CPUs with VNNI / AMX and ARM dot-product units accumulate in int32; plain AVX2 kernels
    add u8 x s8 pairs in saturating int16 first, so there (and when unsure) codes stay 7-bit.
    """
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


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
    Not thread-safe for writes: the catalogue calls ``append`` under its write lock only.
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
        self.ids = np.zeros(0, np.int64)  # internal id of each position
        self.queries = 0
        self.uncertified = 0

    @staticmethod
    def code_max_here() -> int:
        return 127 if _int8_dot_cannot_saturate() else 63

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
        top = np.argpartition(-exact, k - 1, axis=1)[:, :k]
        top_s = np.take_along_axis(exact, top, 1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        top_s, top_p = np.take_along_axis(top_s, order, 1), np.take_along_axis(np.take_along_axis(P, top, 1), order, 1)
        eps = self.emax + e_q * (1.0 + self.emax) + 1e-5
        certified = top_s[:, -1] > cut + eps
        return top_s, top_p, certified


# -------------------------------------------------------------------------------------- catalog
class Catalog:
    """Vectors + ids + metadata in a faiss index; thread-safe; saves and loads atomically.

    ``model`` is an optional dict describing the model the vectors came from (the Retriever
    stores the bundle's manifest digest, dimension and preprocessing there); it is saved and
    checked on load.
    """

    def __init__(self, dim: int, index: str = "auto", *, model: dict | None = None, **index_options: Any):
        self.dim = _positive_int(dim, "dim")
        self.spec = IndexSpec(kind=index, **index_options)
        if self.spec.hnsw_dims is not None and self.spec.hnsw_dims > self.dim:
            raise CatalogError(f"hnsw_dims={self.spec.hnsw_dims} is more than the vectors' dimension {self.dim}")
        self.model = dict(model) if model else None
        self._lock = RWLock()
        self._index = None  # built on first add (IVF-PQ trains on it)
        self._kind: str | None = None if self.spec.kind == "auto" else self.spec.kind
        self._to_internal: dict[Any, int] = {}
        self._uid: dict[int, Any] = {}
        self._meta: dict[int, str] = {}
        self._id_kind: str | None = None
        self._next_internal = 0
        self._next_auto = 0
        self._deleted: set[int] = set()  # HNSW tombstones (internal ids)
        self._deleted_sel = None  # (IDSelector, its backing objects) while tombstones exist
        self._scan: Int8ExactScan | None = None  # flat only: built on first search, kept in step by add
        self._scan_lock = threading.Lock()

    # ------------------------------------------------------------------------------- properties
    @property
    def kind(self) -> str:
        """The index actually in use (``"auto"`` resolves to flat until the catalogue grows)."""
        return self._kind or ("flat" if self.spec.kind == "auto" else self.spec.kind)

    @property
    def _hnsw_dims(self) -> int | None:
        """Dims of the HNSW graph's projection, or None when the graph walks the full vectors."""
        return self.spec.projected_dims(self.dim) if self.kind == "hnsw" else None

    def __len__(self) -> int:
        return len(self._uid)

    def __contains__(self, uid: Any) -> bool:
        try:
            return normalize_id(uid) in self._to_internal
        except CatalogError:
            return False

    def ids(self) -> list:
        """User ids in insertion order."""
        with self._lock.read():
            return [self._uid[i] for i in sorted(self._uid)]

    def metadata(self, uid: Any) -> dict | None:
        with self._lock.read():
            internal = self._to_internal.get(normalize_id(uid))
            if internal is None:
                raise UnknownIdError(f"no entry with id {uid!r}")
            text = self._meta.get(internal)
        return json.loads(text) if text is not None else None

    def info(self) -> dict:
        with self._lock.read():
            scan = self._scan
            return {
                "exact_scan": None if scan is None else {"kind": "int8 certified", "queries": scan.queries,
                                                          "uncertified_fallbacks": scan.uncertified,
                                                          "outliers": len(scan.outliers)},
                "entries": len(self._uid),
                "dim": self.dim,
                "index": self.kind,
                "requested_index": self.spec.kind,
                "tombstones": len(self._deleted),
                "id_kind": self._id_kind,
                "spec": asdict(self.spec),
                "model": self.model,
            }

    # ---------------------------------------------------------------------------------- building
    def _new_index(self, kind: str, train: np.ndarray | None = None):
        faiss = _faiss()
        d, spec = self.dim, self.spec
        if kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        if kind == "hnsw":
            dims = spec.projected_dims(d)
            h = faiss.IndexHNSWFlat(dims or d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            h.hnsw.efConstruction = spec.ef_construction
            h.hnsw.efSearch = spec.ef_search
            if not dims:
                return faiss.IndexIDMap2(h)
            if train is None:
                raise CatalogError("a projected HNSW catalogue learns its projection on its first add")
            t0 = time.perf_counter()
            proj = faiss.LinearTransform(d, dims, False)
            faiss.copy_array_to_vector(projection_matrix(train, dims, spec.seed).ravel(), proj.A)
            proj.is_trained = True
            log.info("learned a %d -> %d projection for the HNSW graph on %d vectors in %.1fs", d, dims,
                     min(len(train), PROJECTION_SAMPLE), time.perf_counter() - t0)
            # exact re-rank on the fp32 vectors kept beside the graph (IndexRefineFlat)
            return faiss.IndexIDMap2(faiss.IndexRefineFlat(faiss.IndexPreTransform(proj, h)))
        if kind == "ivfpq":
            n = 0 if train is None else len(train)
            if n < max(256, 2 ** spec.pq_nbits):
                raise CatalogError(
                    f"an IVF-PQ catalogue trains on its first add and needs at least {max(256, 2 ** spec.pq_nbits)} "
                    f"vectors there (got {n}); add more at once, or use index='flat' or 'auto'"
                )
            budget = parse_memory(spec.max_memory) if spec.kind == "auto" else None
            nlist, m = ivfpq_params(n, d, spec, budget)
            if nlist > n:
                raise CatalogError(f"nlist={nlist} is more than the {n} training vectors")
            quantizer = faiss.IndexFlatIP(d)
            ivf = faiss.IndexIVFPQ(quantizer, d, nlist, m, spec.pq_nbits, faiss.METRIC_INNER_PRODUCT)
            ivf.nprobe = spec.nprobe
            size = min(n, spec.train_size or max(40 * nlist, 10_000))
            sample = train
            if size < n:
                pick = np.random.default_rng(spec.seed).choice(n, size, replace=False)
                sample = train[np.sort(pick)]
            t0 = time.perf_counter()
            ivf.cp.seed = spec.seed
            # we checked the sample size ourselves; spare the user faiss's per-sub-quantizer warnings
            ivf.cp.min_points_per_centroid = 1
            ivf.pq.cp.min_points_per_centroid = 1
            ivf.train(sample)
            log.info("trained IVF%d,PQ%dx%d on %d vectors in %.1fs", nlist, m, spec.pq_nbits, size,
                     time.perf_counter() - t0)
            return ivf
        raise CatalogError(f"unknown index kind {kind!r}")

    def _live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(internal ids, vectors) of live entries, reconstructed from a flat or HNSW index."""
        faiss = _faiss()
        if self._index is None or self._index.ntotal == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        if self.kind not in ("flat", "hnsw"):
            raise CatalogError("IVF-PQ keeps compressed codes only; its vectors cannot be recovered for a rebuild")
        inner = faiss.downcast_index(self._index.index)
        if isinstance(inner, faiss.IndexRefine):  # projected HNSW: the fp32 vectors are the refine store
            storage = faiss.downcast_index(inner.refine_index)
        elif self.kind == "hnsw":
            storage = faiss.downcast_index(inner.storage)
        else:
            storage = inner
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vecs = storage.reconstruct_n(0, storage.ntotal)
        if self._deleted:
            keep = ~np.isin(ids, np.fromiter(self._deleted, np.int64, len(self._deleted)))
            ids, vecs = ids[keep], vecs[keep]
        return ids, np.ascontiguousarray(vecs, dtype=np.float32)

    def _rebuild(self, kind: str) -> None:
        """Rebuild the index as ``kind`` from the live vectors (migration or HNSW compaction)."""
        t0 = time.perf_counter()
        ids, vecs = self._live_vectors()
        index = self._new_index(kind, vecs)
        if len(ids):
            index.add_with_ids(vecs, ids)
        old = self.kind
        self._index, self._kind = index, kind
        self._scan = None
        self._deleted.clear()
        self._deleted_sel = None
        log.info("rebuilt the catalogue index %s -> %s over %d vectors in %.1fs", old, kind, len(ids),
                 time.perf_counter() - t0)

    def _maybe_migrate(self) -> None:
        if self.spec.kind != "auto" or self._index is None:
            return
        target = choose_index(len(self._uid), self.dim, self.spec.max_memory, self.spec)
        if _KIND_ORDER[target] > _KIND_ORDER[self.kind]:
            log.info("catalogue reached %d entries: switching index %s -> %s (index='auto')",
                     len(self._uid), self.kind, target)
            try:
                self._rebuild(target)
            except (CatalogError, RuntimeError, MemoryError) as e:  # the add itself already succeeded
                log.warning("could not switch the index to %s (%s); keeping %s", target, e, self.kind)

    def _set_tombstone_selector(self) -> None:
        faiss = _faiss()
        if not self._deleted:
            self._deleted_sel = None
            return
        dead = np.fromiter(self._deleted, np.int64, len(self._deleted))
        batch = faiss.IDSelectorBatch(dead)
        live = faiss.IDSelectorNot(batch)
        if self._hnsw_dims:
            # the graph sits below IndexRefineFlat, which does not pass IndexIDMap2's translated
            # selector down: translate graph positions -> internal ids ourselves
            self._deleted_sel = (faiss.IDSelectorTranslated(self._index.id_map, live), live, batch)
        else:
            self._deleted_sel = (live, batch)  # keep the inner selector alive

    # ------------------------------------------------------------------------------------ writes
    def _check_new_ids(self, uids: list, n: int) -> list:
        if len(uids) != n:
            raise CatalogError(f"got {len(uids)} ids for {n} items")
        uids = [normalize_id(u, f"id of item {i}") for i, u in enumerate(uids)]
        kinds = {_id_kind(u) for u in uids}
        if len(kinds) > 1:
            raise CatalogError("ids in one catalogue must be all str or all int; this batch mixes them")
        seen, dup = set(), []
        for u in uids:
            if u in seen:
                dup.append(u)
            seen.add(u)
        if dup:
            raise DuplicateIdError(f"ids repeated within the batch: {dup[:5]}{' ...' if len(dup) > 5 else ''}")
        return uids

    def add(self, vectors: Any, ids: Sequence | None = None, metadata: Sequence[dict | None] | dict | None = None) -> list:
        """Add vectors (normalised here) with optional ids and metadata; all or nothing.

        Without ids, integer ids continue from the largest integer id so far. Returns the ids.
        """
        x = as_vectors(vectors, self.dim)
        n = len(x)
        metas = _metadata_json(metadata, n)
        uids = None if ids is None else self._check_new_ids(_as_id_list(ids), n)
        if n == 0:
            return []
        with self._lock.write():
            if uids is None:
                if self._id_kind == "str":
                    raise CatalogError("this catalogue uses string ids: pass ids= for new entries")
                uids = list(range(self._next_auto, self._next_auto + n))
            kind = _id_kind(uids[0])
            if self._id_kind is not None and kind != self._id_kind:
                raise CatalogError(f"this catalogue uses {self._id_kind} ids; got {kind} ids")
            taken = [u for u in uids if u in self._to_internal]
            if taken:
                raise DuplicateIdError(
                    f"ids already in the catalogue: {taken[:5]}{' ...' if len(taken) > 5 else ''} "
                    "(remove them first to replace)"
                )
            internal = np.arange(self._next_internal, self._next_internal + n, dtype=np.int64)
            if self._index is None:
                self._index = self._new_index(self.kind, x)
            self._index.add_with_ids(x, internal)
            if self._scan is not None:
                self._scan.append(x, internal)
            # nothing below can fail: the state changes together
            self._next_internal += n
            self._id_kind = kind
            for i, u, m in zip(internal.tolist(), uids, metas):
                self._to_internal[u] = i
                self._uid[i] = u
                if m is not None:
                    self._meta[i] = m
            if kind == "int":
                self._next_auto = max(self._next_auto, max(uids) + 1)
            self._maybe_migrate()
        return uids

    def remove(self, ids: Any, missing: str = "raise") -> int:
        """Remove entries by user id; unknown ids raise (nothing removed) or, with ``missing="ignore"``, are skipped."""
        if missing not in ("raise", "ignore"):
            raise CatalogError(f"missing must be 'raise' or 'ignore', got {missing!r}")
        uids = [normalize_id(u, "id to remove") for u in _as_id_list(ids)]
        with self._lock.write():
            unknown = [u for u in uids if u not in self._to_internal]
            if unknown and missing == "raise":
                raise UnknownIdError(
                    f"cannot remove ids not in the catalogue: {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                    "(nothing was removed)"
                )
            internal = sorted({self._to_internal[u] for u in uids if u in self._to_internal})
            if not internal:
                return 0
            arr = np.asarray(internal, dtype=np.int64)
            if self.kind == "hnsw":
                self._deleted.update(internal)
            else:
                self._scan = None  # positions shift: rebuilt on the next search
                removed = self._index.remove_ids(_faiss().IDSelectorBatch(arr))
                if removed != len(arr):
                    raise RuntimeError(f"faiss removed {removed} of {len(arr)} entries; catalogue inconsistent")
            for i in internal:
                u = self._uid.pop(i)
                del self._to_internal[u]
                self._meta.pop(i, None)
            if self.kind == "hnsw":
                if len(self._deleted) > self.spec.compact_fraction * max(self._index.ntotal, 1):
                    self._rebuild("hnsw")
                else:
                    self._set_tombstone_selector()
            return len(internal)

    def compact(self) -> None:
        """Drop HNSW tombstones now by rebuilding the graph (no-op for flat / IVF-PQ)."""
        with self._lock.write():
            if self.kind == "hnsw" and self._deleted:
                self._rebuild("hnsw")

    # ------------------------------------------------------------------------------------ search
    def _params(self, ef_search: int | None, nprobe: int | None, k: int):
        faiss = _faiss()
        if self.kind == "hnsw":
            p = faiss.SearchParametersHNSW()
            width = k * self.spec.refine_factor if self._hnsw_dims else k
            p.efSearch = max(_positive_int(ef_search, "ef_search") if ef_search is not None else self.spec.ef_search,
                             width)
            if self._deleted_sel is not None:
                p.sel = self._deleted_sel[0]
            if not self._hnsw_dims:
                return p
            rp = faiss.IndexRefineSearchParameters(k_factor=float(self.spec.refine_factor), base_index_params=p)
            rp.base_params_ref = p  # SWIG keeps a pointer only: hold the Python object with it
            return rp
        if self.kind == "ivfpq":
            p = faiss.SearchParametersIVF()
            p.nprobe = _positive_int(nprobe, "nprobe") if nprobe is not None else self.spec.nprobe
            return p
        return None

    def _flat_vectors(self) -> np.ndarray:
        """Zero-copy (n, dim) view of a flat index's fp32 storage (valid while the lock is held)."""
        faiss = _faiss()
        inner = faiss.downcast_index(self._index.index)
        return faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * self.dim).reshape(inner.ntotal, self.dim)

    def _flat_scan(self) -> Int8ExactScan | None:
        """The int8 scanner of a large flat catalogue, built on first use.

        Built under the read lock (the data cannot change meanwhile) by one thread at a time.
        """
        if (self.kind != "flat" or not self.spec.exact_int8 or self._index is None
                or self._index.ntotal < INT8_MIN_ENTRIES or not int8_scan_available()):
            return None
        scan = self._scan
        if scan is None:
            with self._scan_lock:
                scan = self._scan
                if scan is None:
                    t0 = time.perf_counter()
                    ids = _faiss().vector_to_array(self._index.id_map).astype(np.int64)
                    scan = self._scan = Int8ExactScan.build(self._flat_vectors(), ids)
                    log.info("built the int8 exact scan over %d vectors in %.1fs (%d outliers)", scan.n,
                             time.perf_counter() - t0, len(scan.outliers))
        return scan if scan.usable else None

    def _search_index(self, q: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
        scan = self._flat_scan()
        if scan is None:
            return faiss_search(self._index, q, k, params)
        D, P, ok = scan.search(q, k, self._flat_vectors())
        I = np.where(P >= 0, scan.ids[np.maximum(P, 0)], -1)
        if not ok.all():  # not certified: faiss's fp32 scan answers these queries
            bad = np.flatnonzero(~ok)
            D[bad], I[bad] = faiss_search(self._index, np.ascontiguousarray(q[bad]), k)
        return D, I

    def _search(self, vectors: Any, k: int, ef_search: int | None, nprobe: int | None,
                with_meta: bool) -> tuple[np.ndarray, list, list | None]:
        """Validate, search and translate ids under one read lock.

        Returns (scores (nq, kk), user ids (nq*kk list, None where empty), metadata texts or None).
        """
        k = _positive_int(k, "k")
        if ef_search is not None:
            _positive_int(ef_search, "ef_search")
        if nprobe is not None:
            _positive_int(nprobe, "nprobe")
        q = as_vectors(vectors, self.dim, what="query vectors")
        with self._lock.read():
            live = len(self._uid)
            if len(q) == 0 or live == 0:
                return np.zeros((len(q), 0), np.float32), [], [] if with_meta else None
            kk = min(k, live)
            params = self._params(ef_search, nprobe, kk)
            sel = self._deleted_sel  # noqa: F841  (keeps the selector alive during the call)
            D, I = self._search_index(q, kk, params)
            flat = I.ravel().tolist()
            uid_get = self._uid.get
            uids = [uid_get(i) if i >= 0 else None for i in flat]  # a removed entry is never returned
            metas = [self._meta.get(i) for i in flat] if with_meta else None
        D = np.array(D, dtype=np.float32).reshape(len(q), kk)
        D.ravel()[[j for j, u in enumerate(uids) if u is None]] = -np.inf
        return D, uids, metas

    def search(self, vectors: Any, k: int = 10, threshold: float | None = None, *,
               ef_search: int | None = None, nprobe: int | None = None) -> list[list[Hit]]:
        """Top-k hits per query as ``Hit(id, score, metadata)``, best first; score = cosine similarity.

        Fewer than k hits come back when the catalogue holds fewer entries (none when it is
        empty) or when ``threshold`` (minimum score) cuts them. ``ef_search`` (HNSW) and
        ``nprobe`` (IVF-PQ) override the defaults for this call only.
        """
        if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise CatalogError(f"threshold must be a finite number, got {threshold!r}")
        D, uids, metas = self._search(vectors, k, ef_search, nprobe, with_meta=True)
        nq, kk = D.shape
        lo = -np.inf if threshold is None else threshold
        hits = []
        for r in range(nq):
            row = []
            for c, score in enumerate(D[r].tolist()):
                u = uids[r * kk + c]
                if u is not None and score >= lo:
                    text = metas[r * kk + c]
                    row.append(Hit(u, score, json.loads(text) if text is not None else None))
            hits.append(row)
        return hits

    def search_raw(self, vectors: Any, k: int = 10, *, ef_search: int | None = None,
                   nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` arrays of shape (nq, k), as faiss returns them.

        Missing slots (k larger than the catalogue) hold score ``-inf`` and id ``-1`` for integer
        ids (an int64 array) or ``None`` for string ids (an object array).
        """
        D, uids, _ = self._search(vectors, k, ef_search, nprobe, with_meta=False)
        nq, kk = D.shape
        k = int(k)
        scores = np.full((nq, k), -np.inf, np.float32)
        scores[:, :kk] = D
        if self._id_kind == "str":
            ids = np.full((nq, k), None, dtype=object)
            if kk:
                ids[:, :kk] = np.array(uids, dtype=object).reshape(nq, kk)
        else:
            ids = np.full((nq, k), -1, dtype=np.int64)
            if kk:
                ids[:, :kk] = np.array([-1 if u is None else u for u in uids], dtype=np.int64).reshape(nq, kk)
        return scores, ids

    # ------------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike, overwrite: bool = True) -> str:
        """Write the catalogue atomically (temp sibling + rename). Searches may continue meanwhile."""
        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory):
            if not overwrite:
                raise FileExistsError(f"{directory} already exists")
            if not os.path.isdir(directory) or (os.listdir(directory) and not
                                                os.path.isfile(os.path.join(directory, CATALOG_FILE))):
                raise CatalogError(f"{directory} exists and is not a catalogue; refusing to replace it")
        faiss = _faiss()
        with self._lock.read(), atomic_directory(directory, overwrite=True) as tmp:
            files = {}
            if self._index is not None:
                faiss.write_index(self._index, os.path.join(tmp, INDEX_FILE))
                files[INDEX_FILE] = None
            with open(os.path.join(tmp, ENTRIES_FILE), "w", encoding="utf-8") as f:
                for i in sorted(self._uid):
                    m = self._meta.get(i)
                    f.write(f"[{i},{json.dumps(self._uid[i], ensure_ascii=False)},{m if m is not None else 'null'}]\n")
            files[ENTRIES_FILE] = None
            if self._deleted:
                np.save(os.path.join(tmp, DELETED_FILE), np.array(sorted(self._deleted), dtype=np.int64))
                files[DELETED_FILE] = None
            for name in files:
                full = os.path.join(tmp, name)
                files[name] = {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
            header = {
                "format": CATALOG_FORMAT,
                "schema_version": CATALOG_SCHEMA_VERSION,
                "dim": self.dim,
                "index": self.kind if self._index is not None else None,
                "spec": asdict(self.spec),
                "entries": len(self._uid),
                "tombstones": len(self._deleted),
                "id_kind": self._id_kind,
                "next_internal": self._next_internal,
                "next_auto": self._next_auto,
                "model": self.model,
                "files": files,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            with open(os.path.join(tmp, CATALOG_FILE), "w", encoding="utf-8") as f:
                json.dump(header, f, indent=2)
                f.write("\n")
        log.info("saved catalogue of %d entries (%s) to %s", len(self), self.kind, directory)
        return directory

    @staticmethod
    def read_header(directory: str | os.PathLike) -> dict:
        """Read and check ``catalog.json`` (format, schema) without loading the index."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise CatalogFormatError(f"{directory}: no such catalogue directory")
        path = os.path.join(directory, CATALOG_FILE)
        if not os.path.isfile(path):
            raise CatalogFormatError(f"{directory}: no {CATALOG_FILE} (not a catalogue, or a partial write)")
        try:
            with open(path, encoding="utf-8") as f:
                header = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CatalogFormatError(f"{path}: unreadable ({e})") from None
        if not isinstance(header, dict) or header.get("format") != CATALOG_FORMAT:
            raise CatalogFormatError(f"{path}: not an ibc catalogue")
        if header.get("schema_version") != CATALOG_SCHEMA_VERSION:
            raise CatalogFormatError(
                f"{path}: unknown catalogue schema version {header.get('schema_version')!r}; "
                f"this SDK reads version {CATALOG_SCHEMA_VERSION}"
            )
        return header

    @classmethod
    def load(cls, directory: str | os.PathLike, model: dict | None = None) -> "Catalog":
        """Open a saved catalogue, checking every file; with ``model``, refuse one built by another model."""
        directory = os.fspath(directory)
        header = cls.read_header(directory)
        if model is not None:
            check_same_model(header.get("model"), model, directory)
        try:
            files = header["files"]
            for name, entry in files.items():
                full = os.path.join(directory, name)
                if os.sep in name or name.startswith("."):
                    raise CatalogFormatError(f"{directory}: bad file name {name!r} in {CATALOG_FILE}")
                if not os.path.isfile(full):
                    raise CatalogFormatError(f"{full}: missing (partial write or incomplete copy?)")
                if os.path.getsize(full) != entry["bytes"] or sha256_file(full) != entry["sha256"]:
                    raise CatalogFormatError(f"{full}: size or SHA-256 does not match {CATALOG_FILE} (corrupt or tampered)")
            spec = IndexSpec.from_dict(header["spec"])
            cat = cls(header["dim"], index=spec.kind, model=header.get("model"),
                      **{k: v for k, v in asdict(spec).items() if k != "kind"})
            cat._kind = header["index"] or cat._kind
            cat._id_kind = header["id_kind"]
            cat._next_internal = int(header["next_internal"])
            cat._next_auto = int(header["next_auto"])
            with open(os.path.join(directory, ENTRIES_FILE), encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    i, uid, meta = json.loads(line)
                    cat._uid[i] = uid
                    cat._to_internal[uid] = i
                    if meta is not None:
                        cat._meta[i] = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
            if len(cat._uid) != header["entries"] or len(cat._to_internal) != len(cat._uid):
                raise CatalogFormatError(f"{directory}: entry list does not match {CATALOG_FILE}")
            if DELETED_FILE in files:
                cat._deleted = set(np.load(os.path.join(directory, DELETED_FILE)).tolist())
            if INDEX_FILE in files:
                cat._index = _faiss().read_index(os.path.join(directory, INDEX_FILE))
                if cat._index.d != cat.dim or cat._index.ntotal != len(cat._uid) + len(cat._deleted):
                    raise CatalogFormatError(f"{directory}: index holds {cat._index.ntotal} vectors of dim "
                                             f"{cat._index.d}, {CATALOG_FILE} says {len(cat._uid)} of dim {cat.dim}")
            elif cat._uid:
                raise CatalogFormatError(f"{directory}: entries without an index file")
            if cat._deleted:
                cat._set_tombstone_selector()  # after the index: a projected graph's selector reads its id map
        except CatalogError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
            raise CatalogFormatError(f"{directory}: malformed catalogue ({type(e).__name__}: {e})") from None
        log.info("loaded catalogue of %d entries (%s) from %s", len(cat), cat.kind, directory)
        return cat


def describe_model(model: dict | None) -> str:
    if not model:
        return "no recorded model"
    pre = model.get("preprocess") or {}
    return (f"model {str(model.get('manifest_digest', '?'))[:12]} (dim {model.get('embedding_dim', '?')}, "
            f"resize {pre.get('resize', '?')} crop {pre.get('crop', '?')})")


def check_same_model(recorded: dict | None, model: dict, where: str) -> None:
    """Refuse a catalogue whose vectors came from another model than ``model``."""
    if recorded is None:
        raise CatalogMismatchError(
            f"catalogue {where} records no model (built from raw vectors); it cannot be checked against "
            f"{describe_model(model)}. Open it with sdk.catalog.Catalog.load instead"
        )
    same = (recorded.get("manifest_digest") == model.get("manifest_digest")
            and recorded.get("embedding_dim") == model.get("embedding_dim")
            and recorded.get("preprocess") == model.get("preprocess"))
    if not same:
        raise CatalogMismatchError(
            f"catalogue {where} was built with {describe_model(recorded)}, but the bundle given is "
            f"{describe_model(model)}: embeddings of different models are not comparable. Open it with the "
            "bundle it was built with, or rebuild it (ibc-retrieve index)"
        )


__all__ = [
    "Catalog", "Hit", "AddReport", "IndexSpec", "RWLock", "CatalogError", "VectorError", "DuplicateIdError",
    "UnknownIdError", "CatalogFormatError", "CatalogMismatchError", "as_vectors", "choose_index", "estimate_bytes",
    "ivfpq_params", "parse_memory", "check_same_model", "describe_model", "normalize_id",
]
