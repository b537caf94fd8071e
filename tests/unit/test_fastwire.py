"""The relay's per-message checks: the compiled extension (proxy/wire/_cwire.pyx) and its
pure-Python twin (proxy/wire/fastwire.py) give the same answers, and neither accepts a body
the full BSON check refuses."""

from __future__ import annotations

import datetime
import os
import random
import struct
import subprocess
import sys
from collections.abc import Callable

import bson
import pytest
from bson import Binary, Decimal128, Int64, MaxKey, MinKey, ObjectId, Timestamp
from bson.code import Code
from bson.regex import Regex

from proxy.wire import fastwire
from proxy.wire.bsonutil import check_document
from proxy.wire.errors import ProtocolError
from proxy.wire.opmsg import MORE_TO_COME, NOT_PLAIN

try:
    from proxy.wire import _cwire
except ImportError:  # the extension is not built here: only the pure-Python side runs
    _cwire = None  # type: ignore[assignment]

NOT_FAST = NOT_PLAIN | MORE_TO_COME

BODIES = [bson.encode(d) for d in (
    {"ping": 1, "lsid": {"id": Binary(b"u" * 16, 4)},
     "$clusterTime": {"clusterTime": Timestamp(1, 2)}, "$db": "admin"},
    {"find": "items", "filter": {"_id": 5}, "limit": 1, "singleBatch": True, "$db": "x",
     "comment": "héllo"},
    {"insert": "c", "documents": [{"_id": i, "v": "x" * i} for i in range(10)], "$db": "t"},
    {"a": 1.5, "d": datetime.datetime(2020, 1, 1), "n": None, "o": ObjectId(), "i": Int64(5),
     "dec": Decimal128("1.5"), "mn": MinKey(), "mx": MaxKey(), "t": Timestamp(3, 4),
     "f": False, "b": Binary(b"abc", 0), "old": Binary(b"abcd", 2)},
    {"rare": Regex("^a", "i"), "code": Code("f()"), "scope": Code("f()", {"x": 1})},
    {},
)]


def _msg(body: bytes, flags: int = 0, request_id: int = 7) -> bytes:
    return struct.pack("<iiiiIB", 21 + len(body), request_id, 0, 2013, flags, 0) + body


def _full_accepts(data: bytes, start: int, end: int) -> bool:
    try:
        check_document(data, start, end)
    except ProtocolError:
        return False
    return True


def _implementations() -> list[tuple[str, Callable[[bytes, int, int], bool]]]:
    impls: list[tuple[str, Callable[[bytes, int, int], bool]]] = [
        ("pure", fastwire.py_check_body)]
    if _cwire is not None:
        impls.append(("compiled", _cwire.check_body))
    return impls


def _mutants(count: int, seed: int) -> list[tuple[bytes, int, int]]:
    rng = random.Random(seed)
    found = []
    for _ in range(count):
        raw = bytearray(rng.choice(BODIES))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(raw))
            roll = rng.random()
            if roll < 0.6:
                raw[at] = rng.randrange(256)
            elif roll < 0.8:
                raw[at] = rng.choice([0, 1, 2, 3, 4, 5, 8, 0x0A, 0x0F, 0x10, 0x7F, 0xFF])
            else:
                struct.pack_into("<i", raw, min(at, len(raw) - 4), rng.randrange(-5, 300))
        before = bytes(rng.randrange(256) for _ in range(rng.randrange(3)))
        found.append((before + bytes(raw) + b"\x00" * rng.randrange(2), len(before),
                      len(before) + len(raw)))
    return found


@pytest.mark.parametrize("name", ["pure", "compiled"])
def test_check_body_accepts_driver_bodies(name: str) -> None:
    check = dict(_implementations()).get(name)
    if check is None:
        pytest.skip("the compiled extension proxy.wire._cwire is not built")
    for body in BODIES[:4] + BODIES[5:]:
        assert check(body, 0, len(body)), body
        msg = _msg(body)
        assert check(msg, 21, len(msg))


@pytest.mark.parametrize("name", ["pure", "compiled"])
def test_check_body_never_accepts_what_the_full_check_refuses(name: str) -> None:
    check = dict(_implementations()).get(name)
    if check is None:
        pytest.skip("the compiled extension proxy.wire._cwire is not built")
    accepted = refused = 0
    for data, start, end in _mutants(20_000, seed=16):
        if check(data, start, end):
            accepted += 1
            assert _full_accepts(data, start, end), data.hex()
        else:
            refused += 1
    assert accepted > 1000 and refused > 1000  # the mutants exercise both answers


def test_check_body_refuses_each_malformed_top_level_value() -> None:
    good = bson.encode({"s": "items", "d": {"a": 1}, "b": True})
    cases = {
        "string length past the end": good.replace(b"\x06\x00\x00\x00items", b"\x60\x00\x00"
                                                   b"\x00items"),
        "undefined element type": good.replace(b"\x03d\x00", b"\x7ad\x00"),
        "boolean 2": good[:-2] + b"\x02\x00",
        "embedded document unterminated": good.replace(b"\x10a\x00\x01\x00\x00\x00\x00",
                                                       b"\x10a\x00\x01\x00\x00\x00\x01"),
        "wrong total length": b"\x06" + good[1:],
    }
    for name, check in _implementations():
        for case, data in cases.items():
            assert data != good, case
            assert not check(data, 0, len(data)), (name, case)
            assert not _full_accepts(data, 0, len(data)), case


def test_plain_name_agrees() -> None:
    impls: list[Callable[[bytes, int], bytes | None]] = [fastwire.py_plain_name]
    if _cwire is not None:
        impls.append(_cwire.plain_name)
    cases = [_msg(b) for b in BODIES] + [
        _msg(BODIES[0], flags=MORE_TO_COME), _msg(BODIES[0], flags=1), _msg(BODIES[0])[:-1],
        _msg(BODIES[0]) + b"\x00", _msg(b"")[:20], b"",
        struct.pack("<iiii", 16, 1, 0, 2004) + b"\x00" * 20,
    ]
    rng = random.Random(3)
    for _ in range(5000):
        raw = bytearray(rng.choice(cases[:4]))
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        cases.append(bytes(raw))
    for data in cases:
        answers = {impl(data, NOT_FAST) for impl in impls}
        assert len(answers) == 1, data.hex()
    assert fastwire.plain_name(_msg(BODIES[1]), NOT_FAST) == b"find"
    assert fastwire.plain_name(_msg(BODIES[1], flags=MORE_TO_COME), NOT_FAST) is None


@pytest.mark.parametrize("value", ["1", ""])
def test_pure_python_forced_by_the_environment(value: str) -> None:
    env = {**os.environ, "MONGOBRANCH_PURE_PYTHON": value}
    out = subprocess.run(
        [sys.executable, "-c", "from proxy.wire import fastwire as f; "
         "print(f.COMPILED, f.check_body is f.py_check_body, f.IMPLEMENTATION)"],
        env=env, capture_output=True, text=True, check=True).stdout
    if value:
        assert out.startswith("False True pure Python (MONGOBRANCH_PURE_PYTHON is set)"), out
    elif _cwire is None:
        assert out.startswith("False True pure Python (the compiled extension"), out
    else:
        assert out.startswith("True False compiled"), out


def test_pure_python_without_the_extension() -> None:
    """An install where the extension could not be built (no compiler) runs the fallback."""
    code = (
        "import importlib.abc, sys\n"
        "class NoExtension(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'proxy.wire._cwire':\n"
        "            raise ImportError('not built')\n"
        "sys.meta_path.insert(0, NoExtension())\n"
        "from proxy.wire import fastwire as f\n"
        "print(f.COMPILED, f.plain_name is f.py_plain_name, f.IMPLEMENTATION)\n")
    env = {key: value for key, value in os.environ.items() if key != "MONGOBRANCH_PURE_PYTHON"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith(
        "False True pure Python (the compiled extension proxy.wire._cwire is not built)"), out
