"""The one interface every index type implements, and what the faiss-backed ones share.

An index holds L2-normalised vectors under internal int64 ids (the catalogue's id map turns them
into user ids); it knows nothing about user ids, metadata or locking. Removal is either native
or by tombstones (a set of dead internal ids that searches exclude through a faiss
``IDSelector``, so a search still returns k live hits); past ``compact_fraction`` of the index the
tombstones are compacted away.
"""

from __future__ import annotations

import os
from typing import IO, ClassVar, Protocol

import numpy as np

from sdk.catalog.errors import CatalogError, CatalogFormatError
from sdk.catalog.spec import IndexSpec, SearchParams
from sdk.catalog.vectors import faiss_module, faiss_search

INDEX_FILE = "index.faiss"
DELETED_FILE = "deleted.npy"
PER_ENTRY_PYTHON = 200  # the id map's two dict slots and the ids themselves, per entry


class Index(Protocol):
    """What a :class:`~sdk.catalog.Catalog` needs from an index type."""

    kind: ClassVar[str]

    @classmethod
    def build(cls, dim: int, spec: IndexSpec, first: np.ndarray) -> "Index":
        """An empty index; ``first`` (the first batch) trains it where it needs training."""

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Add unit vectors under new internal ids (ascending, never seen before)."""

    def remove(self, ids: np.ndarray) -> None:
        """Remove live internal ids."""

    def search(self, q: np.ndarray, k: int, params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
        """(scores, internal ids) of shape (nq, k), best first; id -1 where fewer than k are found."""

    def __len__(self) -> int:
        """Live vectors."""

    @property
    def tombstones(self) -> int:
        """Removed entries still in the index (0 where removal is native)."""

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(internal ids, fp32 vectors) of the live entries; raises where they are not kept."""

    def save(self, directory: str) -> list[str]:
        """Write the index files into ``directory``; returns their names."""

    @classmethod
    def load(cls, files: dict[str, IO[bytes]], dim: int, spec: IndexSpec) -> "Index":
        """Read an index from its open files (by name)."""

    def memory_bytes(self) -> int:
        """Resident size now."""

    @staticmethod
    def estimate_bytes(n: int, dim: int, spec: IndexSpec) -> int:
        """Resident size of ``n`` vectors (plus the id map), for the ``"auto"`` policy."""

    def describe(self) -> dict:
        """Extra facts for ``Catalog.info()``."""


def read_faiss_index(f: IO[bytes]):
    """A faiss index from an open file (so a reader keeps the file it checked, whatever is renamed meanwhile)."""
    faiss = faiss_module()
    f.seek(0)
    return faiss.read_index(faiss.PyCallbackIOReader(f.read))


class FaissIndex:
    """Shared by the faiss-backed index types: the faiss object, tombstones, the index file."""

    kind: ClassVar[str] = ""
    native_remove: ClassVar[bool] = False  # True: faiss removes; False: tombstones

    def __init__(self, dim: int, spec: IndexSpec, index):
        self.dim, self.spec, self.faiss_index = dim, spec, index
        self.dead: set[int] = set()
        self._selector = None  # (IDSelector for searches, the objects it points to) while tombstones exist

    def __len__(self) -> int:
        return self.faiss_index.ntotal - len(self.dead)

    @property
    def tombstones(self) -> int:
        return len(self.dead)

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        self.faiss_index.add_with_ids(x, ids)

    def remove(self, ids: np.ndarray) -> None:
        if self.native_remove:
            removed = self.faiss_index.remove_ids(faiss_module().IDSelectorBatch(ids))
            if removed != len(ids):
                raise RuntimeError(f"faiss removed {removed} of {len(ids)} entries; catalogue inconsistent")
            return
        self.dead.update(ids.tolist())
        if len(self.dead) > self.spec.compact_fraction * max(self.faiss_index.ntotal, 1):
            self.compact()
        else:
            self.tombstoned(ids)
            self._selector = self.live_selector()

    def tombstoned(self, ids: np.ndarray) -> None:
        """Hook: ``ids`` just became tombstones."""

    def compact(self) -> None:
        """Drop the tombstones for good (an index type that keeps them says how)."""
        raise NotImplementedError

    def live_selector(self):
        """(selector excluding tombstones, its backing objects) or None; the objects must stay alive with it."""
        if not self.dead:
            return None
        faiss = faiss_module()
        batch = faiss.IDSelectorBatch(np.fromiter(self.dead, np.int64, len(self.dead)))
        live = faiss.IDSelectorNot(batch)
        return live, batch

    def search_faiss(self, q: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
        return faiss_search(self.faiss_index, q, k, params)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        if self.faiss_index.ntotal == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        storage = self.storage()
        ids = faiss_module().vector_to_array(self.faiss_index.id_map).astype(np.int64)
        vecs = storage.reconstruct_n(0, storage.ntotal)
        if self.dead:
            keep = ~np.isin(ids, np.fromiter(self.dead, np.int64, len(self.dead)))
            ids, vecs = ids[keep], vecs[keep]
        return ids, np.ascontiguousarray(vecs, dtype=np.float32)

    def storage(self):
        """The faiss index holding the fp32 vectors, in id-map order."""
        raise CatalogError(f"a {self.kind} index keeps no fp32 vectors; they cannot be recovered")

    def memory_bytes(self) -> int:
        return self.estimate_bytes(self.faiss_index.ntotal, self.dim, self.spec)

    def describe(self) -> dict:
        return {}

    # ------------------------------------------------------------------------------ persistence
    def save(self, directory: str) -> list[str]:
        faiss_module().write_index(self.faiss_index, os.path.join(directory, INDEX_FILE))
        if not self.dead:
            return [INDEX_FILE]
        np.save(os.path.join(directory, DELETED_FILE), np.array(sorted(self.dead), dtype=np.int64))
        return [INDEX_FILE, DELETED_FILE]

    @classmethod
    def load(cls, files: dict[str, IO[bytes]], dim: int, spec: IndexSpec) -> "FaissIndex":
        index = read_faiss_index(files[INDEX_FILE])
        if index.d != dim:
            raise CatalogFormatError(f"{INDEX_FILE} holds vectors of dim {index.d}, catalog.json says {dim}")
        self = cls(dim, spec, index)
        if DELETED_FILE in files:
            files[DELETED_FILE].seek(0)
            self.dead = set(np.load(files[DELETED_FILE]).tolist())
        if self.dead:
            self._selector = self.live_selector()  # after the index: a projected graph's selector reads its id map
        return self
