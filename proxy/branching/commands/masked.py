"""Writes and findAndModify on a masked branch (masking.py): writes run as on any branch,
unmasked, but none may read a masked field's stored value into something the client sees
(a filter's matches, a field it copies, the document findAndModify returns)."""

from __future__ import annotations

from typing import Any

from proxy.branching import masking
from proxy.branching.commands.base import Handler, Request, documents_stage
from proxy.branching.errors import CommandError

# Update operators whose effect depends on how the stored value compares with the given
# one: the modified count would answer a comparison (enough to bisect a value).
_COMPARING = frozenset({"$min", "$max", "$pull", "$pullAll", "$addToSet", "$bit"})


def _masker(req: Request) -> masking.Masker | None:
    return masking.for_branch(req.engine.config, req.branch)


def check_update(masker: masking.Masker, db: str, coll: str, query: Any, update: Any,
                 array_filters: Any, sort: Any) -> None:
    """A write statement that reads no masked field: its filter and sort name none, a
    pipeline update (which may copy any field) or a $rename moves none, and no array
    filter picks elements of an array holding one."""
    if not masker.fields(db, coll):
        return
    masker.check_filter(db, coll, query, "a write filter")
    masker.check_filter(db, coll, sort, "a write sort")
    ns = f"{db}.{coll}"
    if isinstance(update, list):
        raise masking.refusal(f"a pipeline update on masked collection {ns} (it can copy "
                              "a masked field's value)", masker.branch)
    if isinstance(update, dict):
        renamed = update.get("$rename")
        if isinstance(renamed, dict) and masker.touches(db, coll, list(renamed)):
            raise masking.refusal(f"$rename of a masked field of {ns}", masker.branch)
        comparing = [op for op, spec in update.items() if op in _COMPARING
                     and isinstance(spec, dict) and masker.touches(db, coll, list(spec))]
        sorting = [p for p, v in (update.get("$push") or {}).items()
                   if isinstance(v, dict) and "$sort" in v] \
            if isinstance(update.get("$push"), dict) else []
        if comparing or masker.touches(db, coll, sorting):
            raise masking.refusal(f"{(comparing or ['$push with $sort'])[0]} on a masked field "
                                  f"of {ns} (whether it changes the document tells how the "
                                  "stored value compares)", masker.branch)
        written = [p for op, spec in update.items() if op.startswith("$")
                   and isinstance(spec, dict) for p in spec]
        written += [str(p) for p in (renamed or {}).values()] if isinstance(renamed, dict) \
            else []
        if masker.inside(db, coll, written):
            raise masking.refusal(f"an update inside a masked field of {ns} (its errors "
                                  "quote the stored value)", masker.branch)
        if array_filters:
            paths = [p.split(".$[")[0] for op in update.values() if isinstance(op, dict)
                     for p in op if ".$[" in p]
            if masker.touches(db, coll, paths):
                raise masking.refusal(f"arrayFilters over a masked field of {ns}",
                                      masker.branch)


def _check(req: Request, masker: masking.Masker) -> None:
    cmd, name = req.cmd, req.name
    coll = cmd.get(name)
    if name == "update" and isinstance(coll, str):
        for stmt in cmd.get("updates") or []:
            if isinstance(stmt, dict):
                check_update(masker, req.db, coll, stmt.get("q"), stmt.get("u"),
                             stmt.get("arrayFilters"), stmt.get("sort"))
    elif name == "delete" and isinstance(coll, str):
        for stmt in cmd.get("deletes") or []:
            if isinstance(stmt, dict):
                masker.check_filter(req.db, coll, stmt.get("q"), "a write filter")
    elif name.lower() == "findandmodify" and isinstance(coll, str):
        check_update(masker, req.db, coll, cmd.get("query"), cmd.get("update"),
                     cmd.get("arrayFilters"), cmd.get("sort"))
    elif name == "createIndexes" and isinstance(coll, str) and masker.fields(req.db, coll):
        for index in cmd.get("indexes") or []:
            key = index.get("key") if isinstance(index, dict) else None
            partial = index.get("partialFilterExpression") if isinstance(index, dict) \
                else None
            if not isinstance(key, dict) or masker.touches(req.db, coll, list(key)):
                raise masking.refusal(f"an index on a masked field of {req.db}.{coll} (its "
                                      "build errors quote stored values)", masker.branch)
            masker.check_filter(req.db, coll, partial, "a partial index filter")
    elif name in ("collMod", "create") and isinstance(coll, str) \
            and masker.fields(req.db, coll) and any(
                k in cmd for k in ("validator", "validationLevel", "validationAction")):
        # Which writes a validator fails, and its error details, tell stored values.
        raise masking.refusal(f"a validator on masked collection {req.db}.{coll}",
                              masker.branch)
    elif name == "renameCollection" and isinstance(coll, str):
        target = cmd.get("to")
        if masker.rules.get(coll) and (not isinstance(target, str)
                                       or masker.rules.get(target) != masker.rules[coll]):
            # Under another name its documents would be read by other rules, or none.
            raise masking.refusal(f"renaming masked collection {coll} to a collection "
                                  "with other masking rules", masker.branch)
    elif name == "bulkWrite":
        given = cmd.get("nsInfo")
        infos: list[Any] = given if isinstance(given, list) else []
        for op in cmd.get("ops") or []:
            if not isinstance(op, dict):
                continue
            index = op.get("update", op.get("delete"))
            info = infos[index] if isinstance(index, int) and 0 <= index < len(infos) \
                else None
            ns = info.get("ns") if isinstance(info, dict) else None
            if not isinstance(ns, str) or "." not in ns:
                continue  # bulkWrite refuses it in mongod's words
            db, _, coll = ns.partition(".")
            check_update(masker, db, coll, op.get("filter"), op.get("updateMods"),
                         op.get("arrayFilters"), op.get("sort"))


def guarded(handler: Handler) -> Handler:
    """A write command, refused on a masked branch when a statement reads a masked field."""
    async def serve(req: Request) -> dict[str, Any] | None:
        masker = _masker(req)
        if masker is not None:
            _check(req, masker)
        return await handler(req)
    return serve


def find_and_modify(handler: Handler) -> Handler:
    """findAndModify on a masked collection: the document it returns is masked by the
    upstream (a $documents stage of it, the masking stage, then the client's `fields`
    projection, so the projection sees only masked values)."""
    async def serve(req: Request) -> dict[str, Any] | None:
        masker = _masker(req)
        coll = req.cmd.get(req.name)
        if masker is None or not isinstance(coll, str) or not masker.fields(req.db, coll):
            return await handler(req)
        _check(req, masker)
        fields = req.cmd.get("fields")
        sub = Request(req.engine, req.branch, req.ctx, req.run, req.db,
                      {k: v for k, v in req.cmd.items() if k != "fields"})
        reply = await handler(sub)
        value = reply.get("value") if isinstance(reply, dict) else None
        if not isinstance(value, dict):
            return reply
        assert reply is not None
        stage = masker.stage(req.db, coll)
        pipeline = [documents_stage([value]), stage]
        if fields:
            pipeline.append({"$project": fields})
        masked = await req.run.reply(req.db, {"aggregate": 1, "pipeline": pipeline,
                                              "cursor": {}})
        if not masked.get("ok"):
            raise CommandError(int(masked.get("code", 1)), str(masked.get("errmsg", "")),
                               code_name=str(masked.get("codeName", "")))
        batch = masked["cursor"]["firstBatch"]
        reply["value"] = batch[0] if batch else None
        return reply
    return serve
