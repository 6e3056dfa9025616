"""The catalogue: an index of L2-normalised embeddings, plus user ids, metadata, a lock and a folder.

Why a wrapper: faiss knows int64 ids and float vectors only. Users have string or integer ids and
JSON metadata, want removals on every index type, concurrent searches while one writer adds, and
a saved catalogue that cannot be silently reused with another model. :class:`Catalog` composes
the parts that do each (an :class:`~sdk.catalog.index.Index`, the id map, the lock, the folder)
and owns the one policy that spans index types, ``"auto"``; it knows nothing about images or
models (the :class:`~sdk.retriever.Retriever` does).

* **Concurrency.** A writer-preferring readers-writer lock: any number of searches run at once
  (faiss releases the GIL), ``add``/``remove`` take it exclusively for the index update only (the
  validation happens before), so a search sees the catalogue entirely before or entirely after a
  write. Per-query search parameters are built per call, never by mutating shared index fields.
* **Index choice.** ``"auto"`` follows autofaiss's reasoning: exact search while it is cheap,
  HNSW when the vectors plus graph fit the memory budget, IVF-PQ (compressed codes) when they do
  not. It is re-evaluated as the catalogue grows and the index migrated once a threshold is
  crossed (one rebuild, logged).
* **Saving.** See :mod:`sdk.catalog.persistence`: atomic for other processes, serialised by a
  lock file, every file (and ``catalog.json`` itself) hashed, the model recorded and checked.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from dataclasses import asdict
from typing import IO, Any, Sequence

import numpy as np

from sdk.catalog import persistence
from sdk.catalog.errors import CatalogError, CatalogFormatError
from sdk.catalog.flat import FlatIndex
from sdk.catalog.hnsw import HNSWIndex
from sdk.catalog.ids import (
    EntryMap,
    Hit,
    as_id_list,
    check_new_ids,
    metadata_json,
    normalize_id,
)
from sdk.catalog.index import Index
from sdk.catalog.ivfpq import IVFPQIndex
from sdk.catalog.lock import RWLock
from sdk.catalog.model import check_same_model
from sdk.catalog.persistence import CATALOG_FILE, CATALOG_FORMAT, CATALOG_SCHEMA_VERSION
from sdk.catalog.spec import INDEX_KINDS, IndexSpec, SearchParams, parse_memory
from sdk.catalog.vectors import as_vectors, positive_int

log = logging.getLogger(__name__)

INDEX_TYPES: dict[str, type] = {cls.kind: cls for cls in (FlatIndex, HNSWIndex, IVFPQIndex)}
ENTRIES_FILE = "entries.jsonl"
_KIND_ORDER = {kind: i for i, kind in enumerate(INDEX_KINDS)}

# "auto" thresholds (autofaiss-like): exact search below this size, it is fast and perfect there.
AUTO_FLAT_MAX = 50_000
# IVF-PQ needs this many points to train 256 centroids per sub-quantizer (faiss warns below 39 * 256).
MIN_PQ_TRAIN = 39 * 256


def estimate_bytes(kind: str, n: int, dim: int, spec: IndexSpec | None = None) -> int:
    """Rough resident size of an index of ``n`` vectors (plus our id maps), for ``"auto"``."""
    if kind not in INDEX_TYPES:
        raise CatalogError(f"unknown index kind {kind!r}")
    return INDEX_TYPES[kind].estimate_bytes(n, dim, spec or IndexSpec())


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


class Catalog:
    """Vectors + ids + metadata in an index; thread-safe; saves and loads atomically.

    ``model`` is an optional dict describing the model the vectors came from (the Retriever
    stores the bundle's manifest digest, dimension and preprocessing there); it is saved and
    checked on load.
    """

    def __init__(self, dim: int, index: str = "auto", *, model: dict | None = None, **index_options: Any):
        self.dim = positive_int(dim, "dim")
        self.spec = IndexSpec(kind=index, **index_options)
        if self.spec.hnsw_dims is not None and self.spec.hnsw_dims > self.dim:
            raise CatalogError(f"hnsw_dims={self.spec.hnsw_dims} is more than the vectors' dimension {self.dim}")
        self.model = dict(model) if model else None
        self._lock = RWLock()
        self._index: Index | None = None  # built on first add (IVF-PQ trains on it)
        self._kind: str | None = None if self.spec.kind == "auto" else self.spec.kind
        self._entries = EntryMap()

    # ------------------------------------------------------------------------------- properties
    @property
    def kind(self) -> str:
        """The index actually in use (``"auto"`` resolves to flat until the catalogue grows)."""
        return self._kind or ("flat" if self.spec.kind == "auto" else self.spec.kind)

    @property
    def index(self) -> Index | None:
        """The index in use (None before the first add)."""
        return self._index

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, uid: Any) -> bool:
        try:
            return normalize_id(uid) in self._entries
        except CatalogError:
            return False

    def ids(self) -> list:
        """User ids in insertion order."""
        with self._lock.read():
            return self._entries.ids()

    def metadata(self, uid: Any) -> dict | None:
        with self._lock.read():
            return self._entries.metadata(normalize_id(uid))

    def vectors(self) -> tuple[list, np.ndarray]:
        """(user ids, fp32 unit vectors) of every entry, in insertion order; IVF-PQ keeps no vectors."""
        with self._lock.read():
            if self._index is None:
                return [], np.zeros((0, self.dim), np.float32)
            internal, vecs = self._index.vectors()
            order = np.argsort(internal, kind="stable")
            return [self._entries.uid[i] for i in internal[order].tolist()], vecs[order]

    def info(self) -> dict:
        with self._lock.read():
            extra = self._index.describe() if self._index is not None else {}
            return {
                "exact_scan": extra.get("exact_scan"),
                "entries": len(self._entries),
                "dim": self.dim,
                "index": self.kind,
                "requested_index": self.spec.kind,
                "tombstones": self._index.tombstones if self._index is not None else 0,
                "id_kind": self._entries.id_kind,
                "spec": asdict(self.spec),
                "model": self.model,
            }

    # ---------------------------------------------------------------------------------- building
    def _rebuild(self, kind: str) -> None:
        """Rebuild the index as ``kind`` from the live vectors (the ``"auto"`` migration)."""
        t0 = time.perf_counter()
        ids, vecs = self._index.vectors()
        index = INDEX_TYPES[kind].build(self.dim, self.spec, vecs)
        if len(ids):
            index.add(vecs, ids)
        old = self.kind
        self._index, self._kind = index, kind
        log.info("rebuilt the catalogue index %s -> %s over %d vectors in %.1fs", old, kind, len(ids),
                 time.perf_counter() - t0)

    def _maybe_migrate(self) -> None:
        if self.spec.kind != "auto" or self._index is None:
            return
        target = choose_index(len(self._entries), self.dim, self.spec.max_memory, self.spec)
        if _KIND_ORDER[target] > _KIND_ORDER[self.kind]:
            log.info("catalogue reached %d entries: switching index %s -> %s (index='auto')",
                     len(self._entries), self.kind, target)
            try:
                self._rebuild(target)
            except (CatalogError, RuntimeError, MemoryError) as e:  # the add itself already succeeded
                log.warning("could not switch the index to %s (%s); keeping %s", target, e, self.kind)

    # ------------------------------------------------------------------------------------ writes
    def check_new_ids(self, ids: Any, n: int) -> list:
        """Check ids for ``n`` new items without adding anything: valid, one kind, no repeats, none taken.

        Lets a caller (the Retriever) refuse bad ids before spending time embedding.
        """
        uids = check_new_ids(as_id_list(ids), n)
        if uids:
            with self._lock.read():
                self._entries.resolve_new(uids, n)
        return uids

    def add(self, vectors: Any, ids: Sequence | None = None, metadata: Sequence[dict | None] | dict | None = None,
            progress: bool = False) -> list:
        """Add vectors (normalised here) with optional ids and metadata; all or nothing.

        Without ids, integer ids continue from the largest integer id so far. Returns the ids.
        (``progress`` is for stores that insert in batches; here an add is one step.)
        """
        x = as_vectors(vectors, self.dim)
        n = len(x)
        metas = metadata_json(metadata, n)
        uids = None if ids is None else check_new_ids(as_id_list(ids), n)
        if n == 0:
            return []
        with self._lock.write():
            uids = self._entries.resolve_new(uids, n)
            if self._index is None:
                self._index = INDEX_TYPES[self.kind].build(self.dim, self.spec, x)
            internal = np.arange(self._entries.next_internal, self._entries.next_internal + n, dtype=np.int64)
            self._index.add(x, internal)
            self._entries.assign(uids, metas)  # cannot fail: the state changes together
            self._maybe_migrate()
        return uids

    def remove(self, ids: Any, missing: str = "raise") -> int:
        """Remove entries by user id; unknown ids raise (nothing removed) or, with ``missing="ignore"``, are skipped."""
        if missing not in ("raise", "ignore"):
            raise CatalogError(f"missing must be 'raise' or 'ignore', got {missing!r}")
        uids = [normalize_id(u, "id to remove") for u in as_id_list(ids, "ids to remove")]
        with self._lock.write():
            internal = self._entries.internal_of(uids, missing)
            if not internal:
                return 0
            self._index.remove(np.asarray(internal, dtype=np.int64))
            self._entries.drop(internal)
            return len(internal)

    def compact(self) -> None:
        """Drop tombstones now (flat, HNSW); a no-op where removal is native (IVF-PQ)."""
        with self._lock.write():
            if self._index is not None and self._index.tombstones:
                self._index.compact()

    # ------------------------------------------------------------------------------------ search
    def _search(self, vectors: Any, k: int, ef_search: int | None, nprobe: int | None,
                with_meta: bool) -> tuple[np.ndarray, list, list | None]:
        """Validate, search and translate ids under one read lock.

        Returns (scores (nq, kk), user ids (nq*kk list, None where empty), metadata texts or None).
        """
        k = positive_int(k, "k")
        params = SearchParams.checked(ef_search, nprobe)
        q = as_vectors(vectors, self.dim, what="query vectors")
        with self._lock.read():
            live = len(self._entries)
            if len(q) == 0 or live == 0:
                return np.zeros((len(q), 0), np.float32), [], [] if with_meta else None
            kk = min(k, live)
            D, I = self._index.search(q, kk, params)
            flat = I.ravel().tolist()
            uid_get = self._entries.uid.get
            uids = [uid_get(i) if i >= 0 else None for i in flat]  # a removed entry is never returned
            metas = [self._entries.meta.get(i) for i in flat] if with_meta else None
        D = np.array(D, dtype=np.float32).reshape(len(q), kk)
        D.ravel()[[j for j, u in enumerate(uids) if u is None]] = -np.inf
        return D, uids, metas

    def search(self, vectors: Any, k: int = 10, threshold: float | None = None, *,
               ef_search: int | None = None, nprobe: int | None = None, filter: str | None = None) -> list[list[Hit]]:
        """Top-k hits per query as ``Hit(id, score, metadata)``, best first; score = cosine similarity.

        Fewer than k hits come back when the catalogue holds fewer entries (none when it is
        empty) or when ``threshold`` (minimum score) cuts them. ``ef_search`` (HNSW) and
        ``nprobe`` (IVF-PQ) override the defaults for this call only.
        """
        check_threshold(threshold)
        no_filter(filter)
        D, uids, metas = self._search(vectors, k, ef_search, nprobe, with_meta=True)
        return hits_of(D, uids, metas, threshold)

    def search_raw(self, vectors: Any, k: int = 10, *, ef_search: int | None = None,
                   nprobe: int | None = None, filter: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` arrays of shape (nq, k), as faiss returns them.

        Missing slots (k larger than the catalogue) hold score ``-inf`` and id ``-1`` for integer
        ids (an int64 array) or ``None`` for string ids (an object array).
        """
        no_filter(filter)
        D, uids, _ = self._search(vectors, k, ef_search, nprobe, with_meta=False)
        return raw_of(D, uids, int(k), self._entries.id_kind)

    # ------------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike, overwrite: bool = True) -> str:
        """Write the catalogue atomically (see :mod:`sdk.catalog.persistence`). Searches may continue meanwhile."""
        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory):
            if not overwrite:
                raise FileExistsError(f"{directory} already exists")
            if not os.path.isdir(directory) or (os.listdir(directory) and not
                                                os.path.isfile(os.path.join(directory, CATALOG_FILE))):
                raise CatalogError(f"{directory} exists and is not a catalogue; refusing to replace it")

        def write_files(tmp: str) -> list[str]:
            names = self._index.save(tmp) if self._index is not None else []
            with open(os.path.join(tmp, ENTRIES_FILE), "w", encoding="utf-8") as f:
                self._entries.write(f)
            return names + [ENTRIES_FILE]

        with self._lock.read():
            e = self._entries
            header = {
                "format": CATALOG_FORMAT,
                "schema_version": CATALOG_SCHEMA_VERSION,
                "dim": self.dim,
                "index": self.kind if self._index is not None else None,
                "spec": asdict(self.spec),
                "entries": len(e),
                "tombstones": self._index.tombstones if self._index is not None else 0,
                "id_kind": e.id_kind,
                "next_internal": e.next_internal,
                "next_auto": e.next_auto,
                "model": self.model,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            persistence.write_catalogue(directory, write_files, header)
        log.info("saved catalogue of %d entries (%s) to %s", len(self), self.kind, directory)
        return directory

    read_header = staticmethod(persistence.read_header)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: dict | None = None) -> "Catalog":
        """Open a saved catalogue, checking every file; with ``model``, refuse one built by another model."""
        directory = os.fspath(directory)

        def parse(header: dict, files: dict[str, IO[bytes]]) -> "Catalog":
            if model is not None:
                check_same_model(header.get("model"), model, directory)
            try:
                return cls._from_files(header, files, directory)
            except CatalogError:
                raise
            except (KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
                raise CatalogFormatError(f"{directory}: malformed catalogue ({type(e).__name__}: {e})") from None

        cat = persistence.read_catalogue(directory, parse)
        log.info("loaded catalogue of %d entries (%s) from %s", len(cat), cat.kind, directory)
        return cat

    @classmethod
    def _from_files(cls, header: dict, files: dict[str, IO[bytes]], directory: str) -> "Catalog":
        spec = IndexSpec.from_dict(header["spec"])
        cat = cls(header["dim"], index=spec.kind, model=header.get("model"),
                  **{k: v for k, v in asdict(spec).items() if k != "kind"})
        cat._kind = header["index"] or cat._kind
        if cat._kind not in INDEX_TYPES:
            raise CatalogFormatError(f"{directory}: unknown index kind {cat._kind!r} in {CATALOG_FILE}")
        if ENTRIES_FILE not in files:
            raise CatalogFormatError(f"{directory}: {CATALOG_FILE} lists no {ENTRIES_FILE}")
        cat._entries = EntryMap.read(io.TextIOWrapper(files[ENTRIES_FILE], encoding="utf-8"), header, directory)
        n = len(cat._entries)
        if "index.faiss" in files:
            index = cat._index = INDEX_TYPES[cat._kind].load(files, cat.dim, cat.spec)
            if len(index) != n:
                raise CatalogFormatError(f"{directory}: index holds {len(index)} live vectors, "
                                         f"{CATALOG_FILE} says {n}")
            if index.dead and max(index.dead) >= cat._entries.next_internal:
                raise CatalogFormatError(f"{directory}: tombstone ids beyond next_internal in {CATALOG_FILE}")
        elif n:
            raise CatalogFormatError(f"{directory}: entries without an index file")
        return cat


def no_filter(filter: Any) -> None:
    if filter is not None:
        raise CatalogError("metadata filters are Milvus expressions: they need a Milvus store (store=...), "
                           "not a local catalogue")


def check_threshold(threshold: Any) -> None:
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise CatalogError(f"threshold must be a finite number, got {threshold!r}")


def hits_of(D: np.ndarray, uids: list, metas: list, threshold: float | None) -> list[list[Hit]]:
    """Rows of ``Hit`` from (nq, kk) scores and the flat lists of user ids and metadata texts."""
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


def raw_of(D: np.ndarray, uids: list, k: int, id_kind: str | None) -> tuple[np.ndarray, np.ndarray]:
    """``search_raw``'s (nq, k) arrays, padded with -inf and -1 (int ids) or None (str ids)."""
    nq, kk = D.shape
    scores = np.full((nq, k), -np.inf, np.float32)
    scores[:, :kk] = D
    if id_kind == "str":
        ids = np.full((nq, k), None, dtype=object)
        if kk:
            ids[:, :kk] = np.array(uids, dtype=object).reshape(nq, kk)
    else:
        ids = np.full((nq, k), -1, dtype=np.int64)
        if kk:
            ids[:, :kk] = np.array([-1 if u is None else u for u in uids], dtype=np.int64).reshape(nq, kk)
    return scores, ids
