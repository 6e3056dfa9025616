"""User ids and metadata beside the index: the map user id <-> internal int64 id, and the checks.

Why a map: faiss knows int64 ids only. Every entry gets an internal id from a counter that never
goes back (an id is never reused); metadata is kept as its JSON text, validated on the way in,
and every hit gets a fresh copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, IO, NamedTuple

import numpy as np

from sdk.catalog.errors import CatalogError, CatalogFormatError, DuplicateIdError, UnknownIdError

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MISSING_ID = -1  # what search_raw pads integer ids with; never a user id


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


def id_kind(uid: Any) -> str:
    return "str" if isinstance(uid, str) else "int"


def normalize_id(uid: Any, where: str = "id") -> int | str:
    """User ids are ``str`` or ``int`` (numpy integers accepted) in int64 range, not -1; anything else is refused."""
    if isinstance(uid, (bool, np.bool_)):
        raise CatalogError(f"{where}: ids must be str or int, got bool {uid!r}")
    if isinstance(uid, (int, np.integer)):
        uid = int(uid)
        if not INT64_MIN <= uid <= INT64_MAX:
            raise CatalogError(f"{where}: integer ids must fit in int64 (-2**63 .. 2**63-1), got {uid}")
        if uid == MISSING_ID:
            raise CatalogError(f"{where}: id -1 is reserved (search_raw pads missing hits with it)")
        return uid
    if isinstance(uid, str):
        if not uid:
            raise CatalogError(f"{where}: empty string is not a valid id")
        return uid
    raise CatalogError(f"{where}: ids must be str or int, got {type(uid).__name__} {uid!r}")


def as_id_list(ids: Any, what: str = "ids") -> list:
    if ids is None:
        raise CatalogError(f"{what}: got None; pass an id or a list of ids")
    if isinstance(ids, (str, int, np.integer)):
        return [ids]
    if isinstance(ids, np.ndarray):
        return ids.ravel().tolist()
    try:
        return list(ids)
    except TypeError:
        raise CatalogError(f"{what}: expected an id or a list of ids, got {type(ids).__name__}") from None


def check_new_ids(uids: list, n: int) -> list:
    """Normalise a batch of new ids: one per item, one kind, no repeats (the map is not consulted)."""
    if len(uids) != n:
        raise CatalogError(f"got {len(uids)} ids for {n} items")
    uids = [normalize_id(u, f"id of item {i}") for i, u in enumerate(uids)]
    if len({id_kind(u) for u in uids}) > 1:
        raise CatalogError("ids in one catalogue must be all str or all int; this batch mixes them")
    seen, dup = set(), []
    for u in uids:
        if u in seen:
            dup.append(u)
        seen.add(u)
    if dup:
        raise DuplicateIdError(f"ids repeated within the batch: {dup[:5]}{' ...' if len(dup) > 5 else ''}")
    return uids


def metadata_json(metadata: Any, n: int) -> list[str | None]:
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


def listed(items: list, limit: int = 5) -> str:
    return f"{items[:limit]}{' ...' if len(items) > limit else ''}"


class EntryMap:
    """User id <-> internal id, metadata texts and the two counters. Not locked: the Catalog locks."""

    def __init__(self):
        self.to_internal: dict[Any, int] = {}
        self.uid: dict[int, Any] = {}
        self.meta: dict[int, str] = {}
        self.id_kind: str | None = None
        self.next_internal = 0
        self.next_auto = 0

    def __len__(self) -> int:
        return len(self.uid)

    def __contains__(self, uid: Any) -> bool:
        return uid in self.to_internal

    def ids(self) -> list:
        return [self.uid[i] for i in sorted(self.uid)]

    def resolve_new(self, uids: list | None, n: int) -> list:
        """The user ids a batch of ``n`` will get (auto ids continue after the largest int id); checks clashes."""
        if uids is None:
            if self.id_kind == "str":
                raise CatalogError("this catalogue uses string ids: pass ids= for new entries")
            if self.next_auto + n - 1 > INT64_MAX:
                raise CatalogError("automatic ids would pass 2**63-1; pass ids= for new entries")
            uids = list(range(self.next_auto, self.next_auto + n))
        kind = id_kind(uids[0])
        if self.id_kind is not None and kind != self.id_kind:
            raise CatalogError(f"this catalogue uses {self.id_kind} ids; got {kind} ids")
        taken = [u for u in uids if u in self.to_internal]
        if taken:
            raise DuplicateIdError(f"ids already in the catalogue: {listed(taken)} (remove them first to replace)")
        return uids

    def assign(self, uids: list, metas: list[str | None]) -> np.ndarray:
        """Record a batch (cannot fail); returns the internal ids given to it."""
        n = len(uids)
        internal = np.arange(self.next_internal, self.next_internal + n, dtype=np.int64)
        self.next_internal += n
        self.id_kind = id_kind(uids[0])
        for i, u, m in zip(internal.tolist(), uids, metas):
            self.to_internal[u] = i
            self.uid[i] = u
            if m is not None:
                self.meta[i] = m
        if self.id_kind == "int":
            self.next_auto = max(self.next_auto, max(uids) + 1)
        return internal

    def internal_of(self, uids: list, missing: str) -> list[int]:
        """Sorted internal ids of ``uids``; unknown ones raise (``missing="raise"``) or are skipped."""
        unknown = [u for u in uids if u not in self.to_internal]
        if unknown and missing == "raise":
            raise UnknownIdError(f"cannot remove ids not in the catalogue: {listed(unknown)} (nothing was removed)")
        return sorted({self.to_internal[u] for u in uids if u in self.to_internal})

    def drop(self, internal: list[int]) -> None:
        for i in internal:
            del self.to_internal[self.uid.pop(i)]
            self.meta.pop(i, None)

    def metadata(self, uid: Any) -> dict | None:
        internal = self.to_internal.get(uid)
        if internal is None:
            raise UnknownIdError(f"no entry with id {uid!r}")
        text = self.meta.get(internal)
        return json.loads(text) if text is not None else None

    # ------------------------------------------------------------------------------ persistence
    def write(self, f: IO[str]) -> None:
        """``entries.jsonl``: one ``[internal, user id, metadata]`` line per entry, in insertion order."""
        for i in sorted(self.uid):
            m = self.meta.get(i)
            f.write(f"[{i},{json.dumps(self.uid[i], ensure_ascii=False)},{m if m is not None else 'null'}]\n")

    @classmethod
    def read(cls, f: IO[str], header: dict, where: str) -> "EntryMap":
        """Read ``entries.jsonl`` and check it against the counters of ``catalog.json``."""
        m = cls()
        m.id_kind = header["id_kind"]
        m.next_internal = int(header["next_internal"])
        m.next_auto = int(header["next_auto"])
        for line in f:
            i, uid, meta = json.loads(line)
            m.uid[i] = uid
            m.to_internal[uid] = i
            if meta is not None:
                m.meta[i] = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
        if len(m.uid) != header["entries"] or len(m.to_internal) != len(m.uid):
            raise CatalogFormatError(f"{where}: entry list does not match catalog.json")
        if m.uid and max(m.uid) >= m.next_internal:
            raise CatalogFormatError(f"{where}: catalog.json's next_internal {m.next_internal} is not above the "
                                     f"largest internal id {max(m.uid)} (edited?); new entries would overwrite old")
        if m.id_kind == "int" and m.uid and max(m.to_internal) >= m.next_auto:
            raise CatalogFormatError(f"{where}: catalog.json's next_auto {m.next_auto} is not above the largest id "
                                     f"{max(m.to_internal)} (edited?)")
        return m
