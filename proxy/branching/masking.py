"""Masked branches: the stages that show a masked branch's configured fields masked
(docs/ARCHITECTURE.md, "Masked branches").

The proxy never computes a masked value: every read of a masked collection on a masked
branch's port becomes an aggregation whose first stage, right after the collection is
read, replaces each masked field by an expression the upstream evaluates (`Masker.stage`);
`$lookup`/`$unionWith` sub-pipelines reading a masked collection get the same stage first
(`Masker.pipeline`). Filters, sorts, groups and joins of the client's then see only masked
values. The WAL's images, which change streams and diffs show, are masked in the upstream
by the same functions (`Masker.images`) before anything is made of them. What cannot be
put behind such a stage is refused here, with mongod's error shape and a message naming
masking (`refusal`).

Functions, all MQL: `redact` gives "REDACTED", `null` null, `hash` a decimal string of a
polynomial hash (base 131, modulo a 55-bit prime) of the branch's salt and the value's
string form (the salt's part folded into the starting value, `seed_of`), `fake:<list>`
the list's element at that hash modulo its length. A missing field stays missing. For
`hash` and `fake`, an array is masked element by element, and a document (or an array
inside an array) is hashed as one fixed marker; characters outside printable ASCII all
count as one. A dotted path is followed through documents and arrays of documents; an
array met inside an array on the way is masked whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bson.int64 import Int64

from proxy.branching.errors import CommandError
from proxy.branching.model import Branch
from proxy.config import Config
from proxy.wire.codes import Code

Pipeline = list[dict[str, Any]]

REDACTED = "REDACTED"
_ALPHABET = "".join(chr(c) for c in range(32, 127))
_BASE = 131                       # above the alphabet's size, so no two prefixes collide
_PRIME = Int64(36028797018963913)  # the largest prime below 2**55: value * 131 fits int64
_SEED = Int64(7)
_DOC_MARKER = "\x00document"
_NULL_MARKER = "\x00null"
# Stages that must come first and emit no document of the collection.
_STATS_FIRST = frozenset({"$collStats", "$indexStats"})
# Stages that must come first and read the collection by its real values (an index, a
# text or vector search): no masking stage can go before them.
_UNMASKABLE_FIRST = frozenset({"$geoNear", "$search", "$searchMeta", "$vectorSearch",
                               "$listSearchIndexes"})
# Stages that show other clients' operations, queries or sessions, with their values.
_OTHERS = frozenset({"$currentOp", "$planCacheStats", "$listSessions", "$queryStats"})
# Commands of a masked branch's port that show other clients' commands and their values.
REFUSED_COMMANDS = frozenset({"currentOp", "getLog"})
# Query operators that can reference any field of the document.
_ANY_FIELD = frozenset({"$where", "$expr", "$jsonSchema", "$text", "$function"})


def refusal(what: str, branch: str) -> CommandError:
    """mongod's shape for what a masked branch cannot serve without showing a masked value."""
    return CommandError(Code.COMMAND_NOT_SUPPORTED,
                        f"{what} is not supported on masked branch {branch!r} (mongobranch "
                        "masking): it could show unmasked values of a masked collection")


def _string_of(value: Any) -> dict[str, Any]:
    return {"$convert": {"input": value, "to": "string", "onError": _DOC_MARKER,
                         "onNull": _NULL_MARKER}}


def seed_of(salt: str) -> Int64:
    """The hash's state after the salt and a separator: the upstream then hashes only the
    value's characters (the same polynomial over salt + "|" + value, fewer steps). It
    depends on the salt alone, never on data."""
    state = int(_SEED)
    for ch in salt + "|":
        state = (state * _BASE + 2 + _ALPHABET.find(ch)) % int(_PRIME)
    return Int64(state)


def _hash_number(seed: Int64, value: Any) -> dict[str, Any]:
    step = {"$mod": [{"$add": [{"$multiply": ["$$value", _BASE]},
                               {"$add": [2, {"$indexOfCP": [_ALPHABET, {"$substrCP": [
                                   "$$mbs", "$$this", 1]}]}]}]}, _PRIME]}
    return {"$let": {"vars": {"mbs": _string_of(value)}, "in": {"$reduce": {
        "input": {"$range": [0, {"$strLenCP": "$$mbs"}]}, "initialValue": seed, "in": step}}}}


def _each(value: Any, scalar: Any) -> dict[str, Any]:
    """scalar (an expression of "$$mbv") applied to the value, or to each element of an
    array."""
    one = {"$let": {"vars": {"mbv": value}, "in": scalar}}
    return {"$cond": [{"$isArray": value},
                      {"$map": {"input": value, "as": "mbv", "in": scalar}}, one]}


def function(rule: str, seed: Int64, lists: dict[str, list[Any]], value: Any) -> Any:
    """The expression of a rule's masked value for a present value."""
    if rule == "redact":
        return {"$literal": REDACTED}
    if rule == "null":
        return {"$literal": None}
    if rule == "hash":
        return _each(value, {"$toString": _hash_number(seed, "$$mbv")})
    choices = lists[rule.removeprefix("fake:")]
    return _each(value, {"$arrayElemAt": [{"$literal": choices},
                                          {"$mod": [_hash_number(seed, "$$mbv"),
                                                    len(choices)]}]})


def _at(value: str, parts: list[str], leaf: Any, depth: int = 0) -> Any:
    """The new value of `value` (a field path expression) with the sub-path `parts` masked
    by leaf(expression): through arrays (each element) and documents ($mergeObjects), a
    missing sub-field left missing, an array inside an array masked whole, anything else
    kept as it is."""
    if not parts:
        return leaf(value)
    head, rest = parts[0], parts[1:]
    var = f"mbe{depth}"
    inner = f"{value}.{head}"

    def in_document(doc: str, field: str) -> Any:
        # Whether the field is there, from the document's keys: SecantusDB's $type of a
        # missing "$$var.field" is "null", not mongod's "missing".
        present = {"$in": [head, {"$map": {"input": {"$objectToArray": doc}, "as": "mbk",
                                           "in": "$$mbk.k"}}]}
        return {"$cond": [{"$ne": [{"$type": doc}, "object"]}, doc,
                          {"$cond": [present, {"$mergeObjects": [doc, {head: _at(
                              field, rest, leaf, depth + 1)}]}, doc]}]}

    element = f"$${var}"
    return {"$cond": [{"$isArray": value},
                      {"$map": {"input": value, "as": var,
                                "in": {"$cond": [{"$isArray": element}, leaf(element),
                                                 in_document(element, f"{element}.{head}")]}}},
                      in_document(value, inner)]}


@dataclass(frozen=True)
class Masker:
    """A masked branch's rules: which fields of which collections, and its salt."""

    branch: str
    salt: str
    rules: dict[str, dict[str, str]]
    lists: dict[str, list[Any]]

    def fields(self, db: str, coll: str) -> dict[str, str]:
        return self.rules.get(f"{db}.{coll}", {})

    def has_db(self, db: str) -> bool:
        return any(ns.partition(".")[0] == db for ns in self.rules)

    def stage(self, db: str, coll: str) -> dict[str, Any] | None:
        """The $set stage that masks a collection's configured fields (None: it has none)."""
        fields = self.fields(db, coll)
        if not fields:
            return None
        out: dict[str, Any] = {}
        for path, rule in fields.items():
            top, *rest = path.split(".")

            def leaf(expr: str, rule: str = rule) -> Any:
                return function(rule, seed_of(self.salt), self.lists, expr)

            out.setdefault(top, [])
            out[top].append((rest, leaf))
        stage: dict[str, Any] = {}
        for top, masks in out.items():
            value: Any = f"${top}"
            for rest, leaf in masks:
                value = _nested(value, rest, leaf)
            stage[top] = {"$cond": [{"$eq": [{"$type": f"${top}"}, "missing"]}, "$$REMOVE",
                                    value]}
        return {"$set": stage}

    def image(self, ns: str, doc: str) -> Any | None:
        """An expression of the document `doc` (a field path such as "$post") of the
        collection `ns` with its masked fields masked, by the same functions and salt as
        `stage`, so a WAL image and a read of the same document show the same values
        (None: the collection has no rules). Anything but a document is left as it is."""
        fields = self.rules.get(ns, {})
        if not fields:
            return None
        seed = seed_of(self.salt)
        value: Any = doc
        for path, rule in fields.items():
            def leaf(expr: str, rule: str = rule) -> Any:
                return function(rule, seed, self.lists, expr)

            value = {"$let": {"vars": {"mbi": value},
                              "in": _at("$$mbi", path.split("."), leaf)}}
        return value

    def images(self, fields: Iterable[str], namespaces: Iterable[str],
               ns: str = "$ns") -> dict[str, Any] | None:
        """A $set stage masking the image `fields` of documents (WAL entries, a diff's
        changes) that name their collection in the `ns` field, with the rules of that
        collection; only the given namespaces are looked at (those a reader can meet).
        A missing or non-document image is left missing. None: none has rules."""
        masked = [n for n in dict.fromkeys(namespaces) if self.rules.get(n)]
        if not masked:
            return None
        out: dict[str, Any] = {}
        for field in fields:
            path = f"${field}"
            cases = [{"case": {"$eq": [ns, n]}, "then": self.image(n, path)} for n in masked]
            out[field] = {"$cond": [{"$eq": [{"$type": path}, "object"]},
                                    {"$switch": {"branches": cases, "default": path}},
                                    "$$REMOVE"]}
        return {"$set": out}

    def namespaces(self, db: str | None = None) -> list[str]:
        """The collections with rules (of one database)."""
        return [n for n in self.rules if db is None or n.partition(".")[0] == db]

    def pipeline(self, db: str, coll: str | None, pipeline: Pipeline) -> Pipeline:
        """A read's pipeline over db.coll (None: no collection, `aggregate: 1`) with the
        masking stage first and in every sub-pipeline reading a masked collection."""
        first = self.stage(db, coll) if coll is not None else None
        kind = _kind(pipeline[0]) if pipeline else ""
        if first is not None and kind in _UNMASKABLE_FIRST:
            raise refusal(f"{kind} on masked collection {db}.{coll}", self.branch)
        out = [first] if first is not None and kind not in _STATS_FIRST else []
        return out + self._walk(db, pipeline)

    def _walk(self, db: str, pipeline: Pipeline) -> Pipeline:
        out: Pipeline = []
        for stage in pipeline:
            kind = _kind(stage)
            spec = stage.get(kind) if isinstance(stage, dict) else None
            if kind in _OTHERS or kind == "$changeStream":
                raise refusal(kind, self.branch)
            if kind == "$facet" and isinstance(spec, dict):
                out.append({"$facet": {k: self._walk(db, v) if isinstance(v, list) else v
                                       for k, v in spec.items()}})
            elif kind in ("$lookup", "$unionWith"):
                out.append({kind: self._joined(db, kind, spec)})
            elif kind == "$graphLookup" and isinstance(spec, dict):
                sub_db, coll = _target(db, spec.get("from"))
                if coll is None or self.fields(sub_db, coll):
                    raise refusal(f"$graphLookup from masked collection {sub_db}.{coll}",
                                  self.branch)
                out.append(stage)
            elif kind == "$merge":
                into = spec.get("into") if isinstance(spec, dict) else spec
                sub_db, coll = _target(db, into)
                if coll is None or self.fields(sub_db, coll):
                    # Its whenMatched pipeline reads the target's stored documents.
                    raise refusal(f"$merge into masked collection {sub_db}.{coll}",
                                  self.branch)
                out.append(stage)
            else:
                out.append(stage)
        return out

    def _joined(self, db: str, kind: str, spec: Any) -> Any:
        if kind == "$unionWith" and isinstance(spec, str):
            spec = {"coll": spec}
        if not isinstance(spec, dict):
            return spec
        spec = dict(spec)
        field = "from" if kind == "$lookup" else "coll"
        sub_db, coll = _target(db, spec.get(field)) if field in spec else (db, None)
        if field in spec and coll is None:
            raise refusal(f"{kind} with a {field} of that form", self.branch)
        inner = spec.get("pipeline")
        masked = coll is not None and self.fields(sub_db, coll)
        if kind == "$lookup" and masked and "foreignField" in spec:
            foreign = spec.get("foreignField")
            if not isinstance(foreign, str) or self.touches(sub_db, str(coll), [foreign]):
                # The equality is evaluated on the stored values, before any pipeline.
                raise refusal(f"$lookup with foreignField {foreign!r} of masked collection "
                              f"{sub_db}.{coll} (use let and a pipeline $match)", self.branch)
        if masked or isinstance(inner, list):
            spec["pipeline"] = self.pipeline(sub_db, coll, inner if isinstance(inner, list)
                                             else [])
        return spec

    def touches(self, db: str, coll: str, paths: Iterable[str]) -> bool:
        """Whether any of these field paths reads a masked field: the same path, a path
        inside it, or one holding it (array indexes ignored)."""
        masked = [_plain(p) for p in self.fields(db, coll)]
        for path in paths:
            plain = _plain(path)
            for m in masked:
                if plain == m or plain.startswith(m + ".") or m.startswith(plain + ".") \
                        or not plain:
                    return True
        return False

    def inside(self, db: str, coll: str, paths: Iterable[str]) -> bool:
        """Whether any of these paths lies strictly inside a masked field: an update there
        fails with an error quoting the field's stored value ("Cannot create field ... in
        element {...}")."""
        masked = [_plain(p) for p in self.fields(db, coll)]
        return any(_plain(path).startswith(m + ".") for path in paths for m in masked)

    def reads(self, db: str, coll: str, filt: Any, keys: Iterable[str] = ()) -> bool:
        """Whether a count's or distinct's answer can depend on a masked value: its
        filter or key names a masked field (or may read any field). When neither does,
        it answers alike over stored and masked documents and needs no masking stage."""
        if filt is not None and not isinstance(filt, dict):
            return True
        paths = list(_filter_paths(filt or {})) + list(keys)
        return None in paths or self.touches(db, coll, [p for p in paths if p is not None])

    def check_filter(self, db: str, coll: str, filt: Any, what: str) -> None:
        """A write's filter (or sort) is matched against the stored values: one naming a
        masked field would tell them by what it matches."""
        if not self.fields(db, coll) or not filt:
            return
        if not isinstance(filt, dict):
            raise refusal(f"{what} of that form on masked collection {db}.{coll}",
                          self.branch)
        paths = list(_filter_paths(filt))
        if None in paths or self.touches(db, coll, [p for p in paths if p is not None]):
            raise refusal(f"{what} on a masked field (or with $expr, $where, $jsonSchema, "
                          f"$text) of masked collection {db}.{coll}; writes may filter on "
                          "the fields that are not masked", self.branch)


def _nested(value: Any, rest: list[str], leaf: Any) -> Any:
    """`value` with one more masked sub-path applied over the earlier ones' result."""
    if not rest:
        return leaf(value)
    return {"$let": {"vars": {"mbn": value}, "in": _at("$$mbn", rest, leaf)}}


def _plain(path: str) -> str:
    return ".".join(p for p in path.split(".")
                    if not p.isdigit() and not p.startswith("$"))


def _filter_paths(filt: dict[str, Any]) -> Iterable[str | None]:
    """The field paths a query filter reads; None for an operator that may read any."""
    for key, value in filt.items():
        if key in ("$and", "$or", "$nor") and isinstance(value, list):
            for sub in value:
                yield from _filter_paths(sub) if isinstance(sub, dict) else [None]
        elif key in ("$comment",):
            continue
        elif key.startswith("$"):
            yield None
        else:
            yield key


def _kind(stage: Any) -> str:
    return next(iter(stage), "") if isinstance(stage, dict) and len(stage) == 1 else ""


def _target(db: str, spec: Any) -> tuple[str, str | None]:
    """The (db, coll) a stage names: a collection name, or {db, coll}."""
    if isinstance(spec, str) and spec:
        return db, spec
    if isinstance(spec, dict) and isinstance(spec.get("coll"), str):
        return str(spec.get("db", db)), spec["coll"]
    return db, None


def scrub(value: Any, salt: str) -> Any:
    """A reply that may quote the rewritten pipeline (an explain, an error) without the
    hash's seed (or the salt it comes from), which would let a client test guesses
    against the branch's hashes."""
    seed = seed_of(salt)
    return _scrubbed(value, salt, {int(seed), str(int(seed))})


def _scrubbed(value: Any, salt: str, seed: set[Any]) -> Any:
    if isinstance(value, str):
        if value in seed:
            return "<mask seed>"
        text = value.replace(salt, "<mask salt>") if salt in value else value
        for form in seed:
            if isinstance(form, str) and form in text:
                text = text.replace(form, "<mask seed>")
        return text
    if isinstance(value, int) and not isinstance(value, bool) and value in seed:
        return "<mask seed>"
    if isinstance(value, dict):
        return {k: _scrubbed(v, salt, seed) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v, salt, seed) for v in value]
    return value


def for_branch(config: Config, branch: Branch | None) -> Masker | None:
    """The masker of a branch's port; None where nothing is masked (the main port is the
    real database and is never masked)."""
    if branch is None or not branch.masked or not config.masking:
        return None
    return Masker(branch.name, branch.mask_salt or branch.bid, config.masking,
                  config.masking_lists)
