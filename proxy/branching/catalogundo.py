"""A collection's index list and options before changes main made (docs/ARCHITECTURE.md,
"Capture"), undone from what the change stream's `createIndexes`, `dropIndexes` and
`modify` events say of them: the specs they name, the state before a `modify`. A child
of main keeps them so when main changes them behind the proxy's back (snapshot.py), and
a branch of main at a past point gets them back (history/catalogat.py)."""

from __future__ import annotations

from typing import Any

from proxy.branching.errors import BranchError, Kind

# What collMod changes of an index in place.
IN_PLACE = ("expireAfterSeconds", "hidden")

# An index list and a collection's options.
Catalog = tuple[list[dict[str, Any]], dict[str, Any]]


def undo(ns: str, now: Catalog, entries: list[dict[str, Any]]) -> Catalog:
    """Main's index list and options before these changes (newest first), from what each
    logged event says: the specs it created or dropped, the options before a `modify`
    (mongod's `stateBeforeChange`)."""
    indexes = {ix["name"]: ix for ix in now[0]}
    options = dict(now[1])
    for entry in entries:
        desc = entry.get("desc") or {}
        before = entry.get("before") or {}
        if entry["op"] == "createIndexes":
            for spec in desc.get("indexes") or []:
                indexes.pop(spec.get("name"), None)
        elif entry["op"] == "dropIndexes":
            for spec in desc.get("indexes") or []:
                # Kept if listed: a list read after the drop and a later re-creation
                # (undone before it, newest first) has none of that name.
                indexes.setdefault(str(spec.get("name")), spec)
        elif isinstance(desc.get("index"), dict) and isinstance(before.get("indexOptions"),
                                                                 dict):
            changed = desc["index"]
            for name, spec in indexes.items():
                if name == changed.get("name") or spec.get("key") == changed.get("keyPattern"):
                    kept = {k: v for k, v in spec.items() if k not in IN_PLACE}
                    indexes[name] = {**kept, **{k: v for k, v in before["indexOptions"].items()
                                                if k in IN_PLACE}}
        elif desc and "index" not in desc and isinstance(before.get("collectionOptions"),
                                                         dict):
            options = {k: v for k, v in before["collectionOptions"].items() if k != "uuid"}
        else:
            # SecantusDB's event for an index's collMod says neither which index nor how
            # it was.
            raise BranchError(Kind.CONFLICT,
                              f"main changed {ns} with collMod after that point and the "
                              "upstream's change stream did not say what it was before; "
                              "a branch at that point is not supported")
    return list(indexes.values()), options
