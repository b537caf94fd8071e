"""Error codes come from one table (proxy/wire/codes.py), so a code and its codeName
cannot drift apart, and the replies built from them are the bytes mongod's would be."""

from __future__ import annotations

import ast
from pathlib import Path

import bson

from proxy.wire.codes import Code, code_name
from proxy.wire.errors import CommandError

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"


def test_every_code_has_its_own_number() -> None:
    # An IntEnum member repeating a number silently becomes an alias of the first.
    assert len(Code.__members__) == len({int(c) for c in Code})


def test_a_named_error_replies_as_mongod() -> None:
    reply = CommandError(Code.NAMESPACE_NOT_FOUND, "ns not found x.y").to_reply()
    assert reply == {"ok": 0.0, "errmsg": "ns not found x.y", "code": 26,
                     "codeName": "NamespaceNotFound"}
    assert type(reply["code"]) is int
    assert bson.encode(reply) == bson.encode({"ok": 0.0, "errmsg": "ns not found x.y",
                                              "code": 26, "codeName": "NamespaceNotFound"})


def test_a_relayed_error_keeps_the_upstreams_name() -> None:
    exc = CommandError(2, "bad", code_name="SomethingNew", errorLabels=["X"])
    assert exc.to_reply() == {"ok": 0.0, "errmsg": "bad", "code": 2,
                              "codeName": "SomethingNew", "errorLabels": ["X"]}
    assert CommandError(40571, "m").code_name == "Location40571"
    assert code_name(11000) == "DuplicateKey" and code_name(123456) == "Location123456"


def test_no_error_is_built_from_a_literal_code() -> None:
    """`CommandError(26, "NamespaceNotFound", ...)` is how the two drifted apart before."""
    literal = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "CommandError" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                literal.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert literal == []


def test_an_internal_error_quotes_at_most_the_start_of_its_exception() -> None:
    """A failed bulk write's text can quote every document it held (tens of MB, over the
    wire's message limit): the client gets the start of it in a reply a driver can read."""
    from proxy.net.replies import INTERNAL_ERROR_CHARS, internal_error

    huge = internal_error(RuntimeError("x" * 50_000_000))
    assert len(huge["errmsg"]) < INTERNAL_ERROR_CHARS + 200
    assert huge["errmsg"].startswith("mongobranch internal error: RuntimeError('xxx")
    assert "see the proxy's log" in huge["errmsg"] and huge["code"] == 1
    small = internal_error(ValueError("boom"))
    assert small["errmsg"] == "mongobranch internal error: ValueError('boom')"
