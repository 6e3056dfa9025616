"""The catalogue in a Milvus collection (``pymilvus.MilvusClient``), for catalogues that outgrow one machine.

Same surface as :class:`~sdk.catalog.Catalog` (``add / remove / search / search_raw / len / ids /
metadata / info``, str or int ids, JSON metadata), so a :class:`~sdk.retriever.Retriever` uses
either. Addresses:

* ``milvus:///abs/path/catalog.db`` (or ``milvus://rel/catalog.db``): Milvus Lite's embedded
  local store (``pip install 'ibc[milvus]'``), served in this process;
* ``http://host:19530`` / ``https://...``: a Milvus server or cluster (optional ``token``).

``?collection=NAME`` picks the collection (default ``ibc_catalog``). The collection records the
model (manifest digest, embedding dim, preprocessing) in its properties and a store opened
for another model or dimension is refused in one line. Vectors are L2-normalised and searched
by inner product; ``ef_search`` / ``nprobe`` go to Milvus's ``ef`` / ``nprobe``; ``filter`` is a
Milvus boolean expression over metadata keys (``'label == "rose"'``), which are stored as the
collection's dynamic fields. Ids are the VARCHAR primary key (int ids as their decimal text).

Milvus does not refuse a repeated primary key, so ids are checked before each insert, and this
process lets one writer at a time in (as the local catalogue does); Milvus Lite serialises
writers to a collection anyway and has no authentication.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from sdk.catalog.catalog import check_threshold, hits_of, raw_of
from sdk.catalog.errors import CatalogError, CatalogMismatchError, DuplicateIdError, StoreError, UnknownIdError
from sdk.catalog.ids import Hit, as_id_list, check_new_ids, id_kind, listed, metadata_json, normalize_id
from sdk.catalog.model import check_same_model, describe_model
from sdk.catalog.spec import SearchParams
from sdk.catalog.vectors import as_vectors, positive_int

log = logging.getLogger(__name__)

DEFAULT_COLLECTION = "ibc_catalog"
ID_FIELD, VECTOR_FIELD, NO_META_FIELD = "id", "vector", "ibc_no_metadata"
RESERVED_KEYS = {ID_FIELD, VECTOR_FIELD, NO_META_FIELD, "$meta", "distance"}
MODEL_PROP, ID_KIND_PROP, NEXT_AUTO_PROP = "ibc.model", "ibc.id_kind", "ibc.next_auto"
MAX_ID_LENGTH = 1024
MAX_LIMIT = 16384  # Milvus's largest topk
INDEX_TYPES = {"auto": "HNSW", "flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT", "ivfpq": "IVF_PQ"}
INSTALL_HINT = "pip install 'ibc[milvus]' (pymilvus, and milvus-lite for local .db files)"


def is_store_uri(text: Any) -> bool:
    return isinstance(text, str) and text.split("://", 1)[0] in ("milvus", "http", "https") and "://" in text


@dataclass(frozen=True)
class StoreAddress:
    uri: str  # what pymilvus connects to (a .db path or an http(s) address)
    display: str  # what error messages name
    collection: str
    local: bool


def parse_store_uri(text: str, collection: str | None = None) -> StoreAddress:
    """``milvus:///path/x.db`` | ``http(s)://host:port``, with an optional ``?collection=NAME``."""
    if not is_store_uri(text):
        raise StoreError(f"{text!r} is not a store address; use milvus:///path/catalog.db or http://host:19530")
    parts = urllib.parse.urlsplit(text)
    query = urllib.parse.parse_qs(parts.query)
    name = collection or (query.get("collection") or [DEFAULT_COLLECTION])[0]
    if not name.replace("_", "a").isalnum() or not name[0].isalpha():
        raise StoreError(f"{text}: collection name {name!r} must start with a letter and hold letters, digits, _")
    if parts.scheme == "milvus":
        path = urllib.parse.unquote(parts.netloc + parts.path)
        if not path:
            raise StoreError(f"{text}: no file path (milvus:///abs/path/catalog.db)")
        return StoreAddress(path, text, name, True)
    if not parts.hostname:
        raise StoreError(f"{text}: no host")
    return StoreAddress(f"{parts.scheme}://{parts.netloc}", text, name, False)


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise StoreError(f"the Milvus store needs pymilvus: {INSTALL_HINT}") from None
    return pymilvus


class MilvusStore:
    """A catalogue kept in one Milvus collection; thread-safe (searches run at once, one writer at a time)."""

    kind = "milvus"

    def __init__(self, uri: str, dim: int | None = None, *, model: dict | None = None, index: str = "auto",
                 token: str | None = None, collection: str | None = None, timeout: float = 30.0,
                 batch_size: int = 1000, hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 64,
                 nlist: int = 1024, nprobe: int = 16, create: bool = True, **ignored: Any):
        self.address = parse_store_uri(uri, collection)
        if index not in INDEX_TYPES:
            raise CatalogError(f"index for a Milvus store must be one of {', '.join(INDEX_TYPES)}; got {index!r}")
        self.timeout = float(timeout)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.ef_search, self.nprobe = positive_int(ef_search, "ef_search"), positive_int(nprobe, "nprobe")
        self._write_lock = threading.Lock()
        self._client = self._connect(token)
        name = self.address.collection
        if self._call("has_collection", name):
            self._open_existing(dim, model)
        elif not create or dim is None:
            raise StoreError(f"{self.address.display}: no catalogue collection {name!r} there")
        else:
            self.dim = positive_int(dim, "dim")
            self.model = dict(model) if model else None
            self.index_type = INDEX_TYPES[index]
            self._create(hnsw_m, ef_construction, nlist)
            self._id_kind, self._next_auto = None, 0
        self._call("load_collection", name)

    # ---------------------------------------------------------------------------------- plumbing
    def _connect(self, token: str | None):
        pymilvus = _pymilvus()
        if self.address.local:
            try:
                import milvus_lite  # noqa: F401  (pymilvus serves .db files through it)
            except ImportError:
                raise StoreError(f"{self.address.display}: a local .db store needs milvus-lite: {INSTALL_HINT}") from None
        try:
            client = pymilvus.MilvusClient(self.address.uri, token=token or "", timeout=self.timeout)
            client.list_collections(timeout=self.timeout)
        except Exception as e:  # pymilvus raises MilvusException, grpc errors, OSError...
            raise StoreError(f"{self.address.display}: cannot reach the Milvus store ({_short(e)})") from None
        return client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One pymilvus call with the store's timeout; any failure is one StoreError naming the address."""
        try:
            return getattr(self._client, method)(*args, timeout=self.timeout, **kwargs)
        except CatalogError:
            raise
        except Exception as e:
            raise StoreError(f"{self.address.display}: {method} failed ({_short(e)})") from None

    def _create(self, hnsw_m: int, ef_construction: int, nlist: int) -> None:
        pymilvus = _pymilvus()
        DataType = pymilvus.DataType
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True,
                                                      description="ibc catalogue")
        schema.add_field(ID_FIELD, DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field(NO_META_FIELD, DataType.BOOL)
        params = {"HNSW": {"M": hnsw_m, "efConstruction": ef_construction}, "IVF_FLAT": {"nlist": nlist},
                  "IVF_PQ": {"nlist": nlist, "m": max(self.dim // 8, 1), "nbits": 8}}.get(self.index_type, {})
        index_params = self._client.prepare_index_params()
        index_params.add_index(field_name=VECTOR_FIELD, index_type=self.index_type, metric_type="IP", params=params)
        props = {MODEL_PROP: json.dumps(self.model, sort_keys=True) if self.model else "null"}
        self._call("create_collection", self.address.collection, schema=schema, index_params=index_params,
                   properties=props, consistency_level="Strong")
        log.info("created Milvus collection %s at %s (%s, dim %d)", self.address.collection, self.address.display,
                 self.index_type, self.dim)

    def _open_existing(self, dim: int | None, model: dict | None) -> None:
        desc = self._call("describe_collection", self.address.collection)
        fields = {f["name"]: f for f in desc.get("fields", [])}
        if ID_FIELD not in fields or VECTOR_FIELD not in fields or NO_META_FIELD not in fields:
            raise StoreError(f"{self.address.display}: collection {self.address.collection!r} is not an ibc catalogue")
        props = desc.get("properties") or {}
        self.dim = int(fields[VECTOR_FIELD]["params"]["dim"])
        self.model = json.loads(props.get(MODEL_PROP, "null"))
        where = f"{self.address.display} (collection {self.address.collection})"
        if dim is not None and int(dim) != self.dim:
            raise CatalogMismatchError(f"store {where} holds {self.dim}-d vectors, the bundle gives {dim}-d: "
                                       "embeddings of different models are not comparable")
        if model is not None:
            check_same_model(self.model, model, where)
        self._id_kind = props.get(ID_KIND_PROP) or None
        self._next_auto = int(props.get(NEXT_AUTO_PROP, 0))
        indexes = self._call("list_indexes", self.address.collection)
        self.index_type = (self._call("describe_index", self.address.collection, indexes[0]).get("index_type", "?")
                           if indexes else "?")

    # ------------------------------------------------------------------------------- properties
    def __len__(self) -> int:
        rows = self._call("query", self.address.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def __contains__(self, uid: Any) -> bool:
        try:
            uid = normalize_id(uid)
        except CatalogError:
            return False
        return bool(self._existing([uid]))

    def _key(self, uid: Any) -> str:
        return str(uid)

    def _uid(self, key: str) -> Any:
        return int(key) if self._id_kind == "int" else key

    def _existing(self, uids: list) -> list:
        if not uids:
            return []
        found = set()
        for s in range(0, len(uids), self.batch_size):
            rows = self._call("get", self.address.collection, ids=[self._key(u) for u in uids[s:s + self.batch_size]],
                              output_fields=[ID_FIELD])
            found |= {r[ID_FIELD] for r in rows}
        return [u for u in uids if self._key(u) in found]

    def ids(self) -> list:
        """User ids (ints ascending, or strings in order); Milvus keeps no insertion order."""
        keys = [self._uid(r[ID_FIELD]) for batch in self._iterate([ID_FIELD]) for r in batch]
        return sorted(keys)

    def metadata(self, uid: Any) -> dict | None:
        uid = normalize_id(uid)
        rows = self._call("get", self.address.collection, ids=[self._key(uid)], output_fields=[NO_META_FIELD, "$meta"])
        if not rows:
            raise UnknownIdError(f"no entry with id {uid!r}")
        return _metadata_of(rows[0])

    def info(self) -> dict:
        return {"store": "milvus", "address": self.address.display, "collection": self.address.collection,
                "local": self.address.local, "entries": len(self), "dim": self.dim, "index": self.index_type,
                "id_kind": self._id_kind, "model": self.model, "tombstones": 0, "exact_scan": None}

    def describe(self) -> str:
        return (f"Milvus store {self.address.display} (collection {self.address.collection}): {len(self)} entries, "
                f"dim {self.dim}, index {self.index_type}, ids {self._id_kind or '-'}, {describe_model(self.model)}")

    def _iterate(self, fields: list[str], batch: int | None = None) -> Iterator[list[dict]]:
        try:
            it = self._client.query_iterator(self.address.collection, batch_size=batch or self.batch_size,
                                             output_fields=fields, timeout=self.timeout)
            while True:
                rows = it.next()
                if not rows:
                    break
                yield rows
            it.close()
        except Exception as e:
            raise StoreError(f"{self.address.display}: reading the collection failed ({_short(e)})") from None

    def entries(self) -> Iterator[tuple[list, np.ndarray, list]]:
        """Every entry in batches of (ids, fp32 vectors, metadata): what a copy out of the store reads."""
        for rows in self._iterate(["*"]):
            yield ([self._uid(r[ID_FIELD]) for r in rows], np.asarray([r[VECTOR_FIELD] for r in rows], np.float32),
                   [_metadata_of(r) for r in rows])

    # ------------------------------------------------------------------------------------ writes
    def check_new_ids(self, ids: Any, n: int) -> list:
        uids = check_new_ids(as_id_list(ids), n)
        if uids:
            self._check_kind(id_kind(uids[0]))
            taken = self._existing(uids)
            if taken:
                raise DuplicateIdError(f"ids already in the store: {listed(taken)} (remove them first to replace)")
        return uids

    def _check_kind(self, kind: str) -> None:
        if self._id_kind is not None and kind != self._id_kind:
            raise CatalogError(f"this store uses {self._id_kind} ids; got {kind} ids")

    def add(self, vectors: Any, ids: Sequence | None = None, metadata: Sequence[dict | None] | dict | None = None,
            progress: bool = False) -> list:
        """Insert in batches of ``batch_size``; ids are checked against the store first.

        If an insert fails part-way the completed batches stay (Milvus has no multi-batch
        transaction) and the StoreError says how many rows they hold.
        """
        x = as_vectors(vectors, self.dim)
        n = len(x)
        metas = metadata_json(metadata, n)
        rows_meta = [_check_keys(json.loads(m), i) if m is not None else None for i, m in enumerate(metas)]
        uids = None if ids is None else check_new_ids(as_id_list(ids), n)
        if n == 0:
            return []
        with self._write_lock:
            if uids is None:
                if self._id_kind == "str":
                    raise CatalogError("this store uses string ids: pass ids= for new entries")
                uids = list(range(self._next_auto, self._next_auto + n))
            kind = id_kind(uids[0])
            self._check_kind(kind)
            if kind == "str" and max(len(u.encode()) for u in uids) > MAX_ID_LENGTH:
                raise CatalogError(f"string ids in a Milvus store are at most {MAX_ID_LENGTH} bytes")
            taken = self._existing(uids)
            if taken:
                raise DuplicateIdError(f"ids already in the store: {listed(taken)} (remove them first to replace)")
            props = {}
            if self._id_kind is None:
                props[ID_KIND_PROP] = kind
            if kind == "int":  # reserved before inserting: an interrupted insert never hands its ids out again
                props[NEXT_AUTO_PROP] = str(max(self._next_auto, max(uids) + 1))
            if props:
                self._set_props(props)
                self._id_kind = kind
                self._next_auto = int(props.get(NEXT_AUTO_PROP, self._next_auto))
            bar = _progress_bar(n) if progress else None
            done = 0
            try:
                for s in range(0, n, self.batch_size):
                    e = min(s + self.batch_size, n)
                    rows = [{ID_FIELD: self._key(u), VECTOR_FIELD: v, NO_META_FIELD: m is None, **(m or {})}
                            for u, v, m in zip(uids[s:e], x[s:e].tolist(), rows_meta[s:e])]
                    self._call("insert", self.address.collection, data=rows)
                    done = e
                    if bar is not None:
                        bar.update(e - s)
            except (StoreError, KeyboardInterrupt) as err:
                flight = (f"; the batch in flight, rows {done}-{min(done + self.batch_size, n) - 1} of this call, "
                          f"may be stored too, whole, if the server committed it before its answer was lost: "
                          f"len(store) tells") if done < n else ""
                raise StoreError(f"{self.address.display}: insert stopped after {done} of {n} rows "
                                 f"({done // self.batch_size} confirmed batches of {self.batch_size}, kept in the "
                                 f"store{flight}): {err}") from None
            finally:
                if bar is not None:
                    bar.close()
        return uids

    def _set_props(self, props: dict) -> None:
        self._call("alter_collection_properties", self.address.collection, properties=props)

    def remove(self, ids: Any, missing: str = "raise") -> int:
        if missing not in ("raise", "ignore"):
            raise CatalogError(f"missing must be 'raise' or 'ignore', got {missing!r}")
        uids = [normalize_id(u, "id to remove") for u in as_id_list(ids, "ids to remove")]
        with self._write_lock:
            present = self._existing(list(dict.fromkeys(uids)))
            unknown = [u for u in uids if u not in set(present)]
            if unknown and missing == "raise":
                raise UnknownIdError(f"cannot remove ids not in the store: {listed(unknown)} (nothing was removed)")
            if present:
                self._call("delete", self.address.collection, ids=[self._key(u) for u in present])
            return len(present)

    def compact(self) -> None:
        """Milvus compacts deletions itself."""

    def save(self, directory: Any = None, overwrite: bool = True) -> str:
        """Nothing to write: every add and remove is already in the store. Returns its address."""
        return self.address.display

    # ------------------------------------------------------------------------------------ search
    def _search(self, vectors: Any, k: int, ef_search: int | None, nprobe: int | None, with_meta: bool,
                filter: str | None) -> tuple[np.ndarray, list, list | None]:
        k = positive_int(k, "k")
        params = SearchParams.checked(ef_search, nprobe)
        if filter is not None and not isinstance(filter, str):
            raise CatalogError(f"filter must be a Milvus expression string, got {type(filter).__name__}")
        q = as_vectors(vectors, self.dim, what="query vectors")
        kk = min(k, MAX_LIMIT)
        if len(q) == 0:
            return np.zeros((0, 0), np.float32), [], [] if with_meta else None
        search_params = {"metric_type": "IP", "params": {"ef": max(params.ef_search or self.ef_search, kk),
                                                         "nprobe": params.nprobe or self.nprobe}}
        res = self._call("search", self.address.collection, data=q.tolist(), limit=kk, filter=filter or "",
                         output_fields=[NO_META_FIELD, "$meta"] if with_meta else [ID_FIELD],
                         search_params=search_params)
        width = max((len(r) for r in res), default=0)
        D = np.full((len(q), width), -np.inf, np.float32)
        uids: list = [None] * (len(q) * width)
        metas: list | None = [None] * (len(q) * width) if with_meta else None
        for r, row in enumerate(res):
            for c, hit in enumerate(row):
                D[r, c] = hit["distance"]
                uids[r * width + c] = self._uid(hit["id"])
                if with_meta:
                    m = _metadata_of(hit.get("entity") or {})
                    metas[r * width + c] = None if m is None else json.dumps(m)
        return D, uids, metas

    def search(self, vectors: Any, k: int = 10, threshold: float | None = None, *, ef_search: int | None = None,
               nprobe: int | None = None, filter: str | None = None) -> list[list[Hit]]:
        check_threshold(threshold)
        D, uids, metas = self._search(vectors, k, ef_search, nprobe, True, filter)
        return hits_of(D, uids, metas, threshold)

    def search_raw(self, vectors: Any, k: int = 10, *, ef_search: int | None = None, nprobe: int | None = None,
                   filter: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        D, uids, _ = self._search(vectors, k, ef_search, nprobe, False, filter)
        return raw_of(D, uids, int(k), self._id_kind)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a dead connection is not worth an error
            pass


def _metadata_of(row: dict) -> dict | None:
    if row.get(NO_META_FIELD, False):
        return None
    return {k: v for k, v in row.items() if k not in RESERVED_KEYS}


def _check_keys(meta: dict, i: int) -> dict:
    bad = RESERVED_KEYS & set(meta)
    if bad:
        raise CatalogError(f"metadata of item {i} uses key(s) {sorted(bad)}, reserved by the Milvus store")
    return meta


def _short(e: BaseException) -> str:
    text = str(getattr(e, "message", "") or e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    import sys

    return tqdm(total=total, unit="vec", desc="insert", leave=False) if sys.stderr.isatty() else None


__all__ = ["MilvusStore", "StoreAddress", "parse_store_uri", "is_store_uri", "DEFAULT_COLLECTION"]
