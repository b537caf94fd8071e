"""The engine's records: branches and the per-namespace state of each branch."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from bson.timestamp import Timestamp

from proxy.branching import naming
from proxy.branching.idkey import idkey
from proxy.branching.wal import UNVOIDED

# Hidden-id sets up to this size are kept in memory and excluded with $nin;
# larger ones are excluded server-side by an indexed anti-join.
HIDDEN_CACHE_LIMIT = 20_000
# The `_id` index every collection has, as mongod lists it (copy it before changing it).
ID_INDEX = {"v": 2, "key": {"_id": 1}, "name": "_id_"}


def overlay_index(spec: dict[str, Any]) -> dict[str, Any]:
    """An index spec fit for createIndexes on an overlay collection."""
    return {k: v for k, v in spec.items() if k not in ("v", "ns")}


# What a branch's snapshot holds against (docs/ARCHITECTURE.md, "Snapshots"): "snapshot"
# while the capture of the upstream's change stream preserves every write to main, however
# made; "proxy-writes-only" when only writes made through the proxy are preserved.
SNAPSHOT = "snapshot"
ISOLATION = "proxy-writes-only"


@dataclass
class Branch:
    name: str
    bid: str
    parent: str
    fork_lsn: int
    created_at: dt.datetime
    port: int
    mode: str = "wal"
    # LSN ranges (lo, hi] a reset made invisible: kept in the WAL for audit only.
    voids: list[list[int]] = field(default_factory=list)
    # The mode a migration is converting to; set while it runs (and if it was cut off).
    migrating: str | None = None
    # Set while a copy branch's data is being copied: one found at start-up was cut off
    # before its creation was acknowledged, and holds only part of its data.
    creating: bool = False
    # A child of main: the upstream's cluster time at its fork. Changes the capture sees
    # at or before it are part of what the child shows; later ones are preserved for it.
    fork_ct: Any = None
    # Why the branch is no longer an exact snapshot (changes behind the proxy's back that
    # could not be preserved): reported with its isolation.
    breaks: list[str] = field(default_factory=list)
    # Lifecycle (lifecycle.py): an absolute expiry, an idle expiry in seconds, protection
    # against drop/reset/merge without force, and when a drop made it restorable.
    expires_at: dt.datetime | None = None
    idle_ttl: int | None = None
    protected: bool = False
    deleted_at: dt.datetime | None = None
    # Last client request on its port as last written to the record (throttled), and as
    # the port saw it (Unix time, memory only: bumped on every request, so kept cheap).
    last_used: dt.datetime | None = None
    # A masked branch's port shows the configured fields masked (masking.py); the salt of
    # its hashes is never shown to clients.
    masked: bool = False
    mask_salt: str | None = field(default=None, repr=False)
    used: float = field(default=0.0, compare=False, repr=False)

    def to_doc(self) -> dict[str, Any]:
        return {"_id": self.name, "bid": self.bid, "parent": self.parent,
                "fork_lsn": self.fork_lsn, "created_at": self.created_at, "port": self.port,
                "mode": self.mode, "voids": self.voids, "migrating": self.migrating,
                "creating": self.creating, "fork_ct": self.fork_ct, "breaks": self.breaks,
                "expires_at": self.expires_at, "idle_ttl": self.idle_ttl,
                "protected": self.protected, "deleted_at": self.deleted_at,
                "last_used": self.last_used, "masked": self.masked,
                "mask_salt": self.mask_salt}

    def visible(self) -> dict[str, Any]:
        """A WAL filter leaving out the entries a reset voided. A reset never voids what
        the branch holds of its parent as the parent was (snapshot.py): an image kept for
        it (`keep`), or a collection it holds whole (`own`: copied whole before the
        parent changed the collection, or absent from the parent when the branch first
        wrote to it, or created on the parent after the fork). Each is what the branch
        showed before that entry too."""
        if not self.voids:
            return {}
        return {"$nor": [{"_id": {"$gt": lo, "$lte": hi}, "op": {"$nin": list(UNVOIDED)}}
                         for lo, hi in self.voids]}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Branch:
        return cls(name=doc["_id"], bid=doc["bid"], parent=doc["parent"],
                   fork_lsn=int(doc["fork_lsn"]), created_at=doc["created_at"],
                   port=int(doc["port"]), mode=doc.get("mode", "wal"),
                   voids=[list(v) for v in doc.get("voids", [])],
                   migrating=doc.get("migrating"), creating=bool(doc.get("creating")),
                   fork_ct=doc.get("fork_ct"), breaks=list(doc.get("breaks", [])),
                   expires_at=doc.get("expires_at"), idle_ttl=doc.get("idle_ttl"),
                   protected=bool(doc.get("protected")), deleted_at=doc.get("deleted_at"),
                   last_used=doc.get("last_used"), masked=bool(doc.get("masked")),
                   mask_salt=doc.get("mask_salt"))

    def public(self, host: str, isolation: str = ISOLATION) -> dict[str, Any]:
        return {"name": self.name, "parent": self.parent, "port": self.port,
                "uri": f"mongodb://{host}:{self.port}/", "mode": self.mode,
                "fork_lsn": self.fork_lsn,
                "created_at": self.created_at.replace(tzinfo=dt.UTC).isoformat(),
                "isolation": isolation,
                **({"isolationBreaks": self.breaks} if self.breaks else {}),
                "protected": self.protected, "expires_at": _iso(self.expires_at),
                "idle_ttl": self.idle_ttl, "last_used": _iso(self.last_use()),
                "masked": self.masked}

    def last_use(self) -> dt.datetime | None:
        """The last client request on its port: the later of memory and the record."""
        # In whole milliseconds, as BSON keeps it, so memory and record compare equal.
        seen = (dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=int(self.used * 1000))
                if self.used else None)
        if seen is None or (self.last_used is not None and self.last_used > seen):
            return self.last_used
        return seen


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=dt.UTC).isoformat()


@dataclass
class NsState:
    """What one branch changed in one collection."""

    bid: str
    db: str
    coll: str
    base_dropped: bool = False
    # True: the collection exists on this branch; False: dropped; None: as the parent.
    present: bool | None = None
    indexes: list[dict[str, Any]] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # idkey -> raw id; None once the set outgrew HIDDEN_CACHE_LIMIT.
    hidden_ids: dict[Any, Any] | None = field(default_factory=dict)
    # Set when the branch took its own copy of what it showed of this collection before
    # its parent changed the collection itself (snapshot.freeze): its view is the base,
    # its overlay and nothing of its ancestors.
    detached: bool = False
    # The parent's index list when the branch detached: what the branch's own index
    # changes are measured against (None: against the parent's list now).
    index_base: list[dict[str, Any]] | None = None
    # Likewise the collection options it showed when it detached: what its own collMod
    # changes are measured against.
    options_base: dict[str, Any] | None = None
    # The parent's presence when the branch took its copy of it while holding the
    # collection itself dropped or recreated (snapshot.freeze): what a reset to before
    # that drop shows.
    present_base: bool | None = None
    # An `own` entry was logged: the branch holds the collection whole whatever a reset
    # voids (its parent never shows through again), unlike one it dropped or created,
    # which a reset to before the drop gives back to the parent.
    owned: bool = False
    # Resets to before this LSN are refused: the parent changed the collection while the
    # branch's own drop stood and kept nothing of it (it was the branch's own merge).
    reset_floor: int | None = None
    # The branch's own catalog changes (indexes, options), each as it left them, at the
    # LSN it took: a reset gives back the last one in effect at its point
    # (Engine.rematerialize).
    catalog: list[dict[str, Any]] = field(default_factory=list)
    # When the branch keeps an index list main changed behind the proxy's back
    # (snapshot.keep_catalog): the upstream's time after that list was read. Main's index
    # changes until then are in it, and are undone from it as the capture reaches them.
    catalog_ct: Timestamp | None = None
    # Its options are main's as before a collMod main made behind the proxy's back
    # (snapshot._keep_options), not main's as read when the state was made.
    options_kept: bool = False
    # The view's unique indexes, learnt on the first write; None until then.
    unique: list[dict[str, Any]] | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return f"{self.bid}:{self.db}.{self.coll}"

    @property
    def live(self) -> str:
        return naming.live(self.bid, self.coll)

    @property
    def hidden(self) -> str:
        return naming.hidden(self.bid, self.coll)

    def to_doc(self) -> dict[str, Any]:
        return {"_id": self.key, "bid": self.bid, "db": self.db, "coll": self.coll,
                "base_dropped": self.base_dropped, "present": self.present,
                "indexes": self.indexes,
                "options": self.options, "detached": self.detached,
                "index_base": self.index_base, "options_base": self.options_base,
                "present_base": self.present_base, "owned": self.owned,
                "reset_floor": self.reset_floor, "catalog": self.catalog,
                "catalog_ct": self.catalog_ct, "options_kept": self.options_kept}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> NsState:
        return cls(bid=doc["bid"], db=doc["db"], coll=doc["coll"],
                   base_dropped=bool(doc.get("base_dropped")), present=doc.get("present"),
                   indexes=doc.get("indexes"),
                   options=doc.get("options") or {}, detached=bool(doc.get("detached")),
                   index_base=doc.get("index_base"), options_base=doc.get("options_base"),
                   present_base=doc.get("present_base"), owned=bool(doc.get("owned")),
                   reset_floor=doc.get("reset_floor"), catalog=list(doc.get("catalog") or []),
                   catalog_ct=doc.get("catalog_ct"),
                   options_kept=bool(doc.get("options_kept")))

    def hide(self, ids: list[Any]) -> None:
        if self.hidden_ids is None:
            return
        for value in ids:
            self.hidden_ids[idkey(value)] = value
        if len(self.hidden_ids) > HIDDEN_CACHE_LIMIT:
            self.hidden_ids = None

    def unhide(self, ids: list[Any]) -> None:
        if self.hidden_ids is not None:
            for value in ids:
                self.hidden_ids.pop(idkey(value), None)

    def hides(self, value: Any) -> bool | None:
        """Whether this layer hides the id; None when the set is not cached."""
        if self.hidden_ids is None:
            return None
        return idkey(value) in self.hidden_ids
