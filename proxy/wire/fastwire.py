"""The relay's per-message checks: compiled (proxy/wire/_cwire.pyx) or pure Python.

The main port's fast path runs two checks on every request it forwards unchanged:
`plain_name` (is this exactly one whole plain OP_MSG, and what is its command's raw
name) and `check_body` (is the body's top level well-formed BSON). Profiled, they were
the largest Python cost per forwarded message after the socket writes themselves, so
they are compiled when the package is built with Cython (`pip install .` does it).

Without the extension, or with MONGOBRANCH_PURE_PYTHON=1 in the environment, the
pure-Python versions below are used: the same answers, more interpreter work.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from proxy.wire.bsonutil import SKIM_ELEMENTS, SKIM_OPTIONS

_BODY_AT = 21  # a plain OP_MSG's body: after the 16-byte header, flags and kind byte
_NAME_AT = 26  # its first field's name: after the body's length and type byte
_OP_MSG = 2013
# Length, opCode, flags, the first section's kind and its document's length.
_FAST_HEAD = struct.Struct("<i8xiIBi")
_unpack_head = _FAST_HEAD.unpack_from
_unpack_length = struct.Struct("<i").unpack_from
_skim = SKIM_ELEMENTS
_SKIM_OPTIONS = SKIM_OPTIONS


def py_plain_name(data: bytes, not_fast: int) -> bytes | None:
    """The raw first field name of `data` when it is exactly one whole plain OP_MSG (its
    length, opCode 2013, no flag of `not_fast`, one body section filling the message),
    else None."""
    if len(data) <= _NAME_AT:
        return None
    length, op_code, flags, kind, body_length = _unpack_head(data)
    if (length != len(data) or op_code != _OP_MSG or kind != 0
            or body_length != length - _BODY_AT or flags & not_fast):
        return None
    end = data.find(b"\x00", _NAME_AT)
    return None if end < 0 else data[_NAME_AT:end]


def py_check_body(data: bytes, start: int, end: int) -> bool:
    """Whether data[start:end] is one BSON document whose top level is well formed, by
    pymongo's C decoder in raw-document mode (`bsonutil.check_document`'s quick pass).
    False is not a verdict: the caller then runs the full check."""
    if (_skim is None or end - start < 5 or data[end - 1]
            or _unpack_length(data, start)[0] != end - start):
        return False
    try:
        _skim(data, start + 4, end - 1, _SKIM_OPTIONS, {}, True)
    except Exception:
        return False
    return True


plain_name: Callable[[bytes, int], bytes | None] = py_plain_name
check_body: Callable[[bytes, int, int], bool] = py_check_body
# What runs: "compiled" or "pure Python" (and why), for the startup log.
IMPLEMENTATION = "pure Python (MONGOBRANCH_PURE_PYTHON is set)"

if os.environ.get("MONGOBRANCH_PURE_PYTHON", "") in ("", "0"):
    try:
        from proxy.wire import _cwire
    except ImportError:
        IMPLEMENTATION = "pure Python (the compiled extension proxy.wire._cwire is not built)"
    else:
        plain_name = _cwire.plain_name
        check_body = _cwire.check_body
        IMPLEMENTATION = "compiled (proxy.wire._cwire)"

COMPILED = IMPLEMENTATION.startswith("compiled")
