"""Copy a catalogue between a local folder and a Milvus store, with nothing lost: ids, fp32 vectors,
metadata and the model record (the target refuses to mix models like any other open would)."""

from __future__ import annotations

import logging
import os

import numpy as np

from sdk.catalog.catalog import Catalog
from sdk.catalog.errors import CatalogError
from sdk.catalog.milvus import MilvusStore, is_store_uri

log = logging.getLogger(__name__)

COPY_BATCH = 10_000


def copy_catalogue(source: str, target: str, *, token: str | None = None, index: str | None = None,
                   overwrite: bool = False, progress: bool = False) -> int:
    """Copy ``source`` into ``target`` (a folder and a store address, either way round); returns the entries copied."""
    if is_store_uri(source) == is_store_uri(target):
        raise CatalogError("copy goes from a catalogue folder to a Milvus store address or back; "
                           f"got {source!r} -> {target!r}")
    if is_store_uri(target):
        return _folder_to_store(source, target, token, index, progress)
    return _store_to_folder(source, target, token, index, overwrite)


def _folder_to_store(source: str, target: str, token: str | None, index: str | None, progress: bool) -> int:
    cat = Catalog.load(source)
    if cat.kind == "ivfpq":
        raise CatalogError(f"{source}: an IVF-PQ catalogue keeps compressed codes only; its vectors cannot be "
                           "copied without loss (rebuild it into the store with ibc-retrieve index --store)")
    ids, vecs = cat.vectors()
    store = MilvusStore(target, cat.dim, model=cat.model, token=token, index=index or "auto")
    try:
        if len(store):
            raise CatalogError(f"{target}: the store already holds {len(store)} entries; copy into an empty one")
        for s in range(0, len(ids), COPY_BATCH):
            chunk = ids[s:s + COPY_BATCH]
            store.add(vecs[s:s + COPY_BATCH], ids=chunk, metadata=[cat.metadata(u) for u in chunk], progress=progress)
        return len(store)
    finally:
        store.close()


def _store_to_folder(source: str, target: str, token: str | None, index: str | None, overwrite: bool) -> int:
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} already exists (use --overwrite to replace it)")
    store = MilvusStore(source, token=token, create=False)
    try:
        batches = list(store.entries())
    finally:
        store.close()
    rows = sorted(((u, v, m) for ids, vecs, metas in batches for u, v, m in zip(ids, vecs, metas)),
                  key=lambda row: row[0])  # Milvus keeps no insertion order: ids in order instead
    cat = Catalog(store.dim, index or "auto", model=store.model)
    for s in range(0, len(rows), COPY_BATCH):
        chunk = rows[s:s + COPY_BATCH]
        cat.add(np.stack([v for _, v, _ in chunk]), ids=[u for u, _, _ in chunk], metadata=[m for _, _, m in chunk])
    cat.save(target)
    return len(cat)
