# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The relay's per-message checks in C: see proxy/wire/fastwire.py, which picks this
module or its pure-Python twin. Nothing here allocates on the accepting path but the
command name's bytes."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, uint32_t
from libc.string cimport memchr

cdef enum:
    _OP_MSG = 2013
    _BODY_AT = 21  # a plain OP_MSG's body: after the 16-byte header, flags and kind byte
    _NAME_AT = 26  # its first field's name: after the body's length and type byte


cdef inline uint32_t _u32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))


cdef inline Py_ssize_t _i32(const unsigned char* p) noexcept nogil:
    return <Py_ssize_t><int32_t>_u32(p)


def plain_name(bytes data not None, unsigned int not_fast):
    """The raw first field name of `data` when it is exactly one whole plain OP_MSG (its
    length, opCode 2013, no flag of `not_fast`, one body section filling the message),
    else None."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef const unsigned char* q
    if n <= _NAME_AT:
        return None
    if (_i32(p) != n or _i32(p + 12) != _OP_MSG or _u32(p + 16) & not_fast or p[20] != 0
            or _i32(p + _BODY_AT) != n - _BODY_AT):
        return None
    q = <const unsigned char*>memchr(p + _NAME_AT, 0, n - _NAME_AT)
    if q == NULL:
        return None
    return PyBytes_FromStringAndSize(<const char*>p + _NAME_AT, q - (p + _NAME_AT))


def check_body(bytes data not None, Py_ssize_t start, Py_ssize_t end):
    """Whether data[start:end] is one BSON document whose top level is well formed: its
    length and terminator, then each element's type, terminated name and value framing
    (strings' length and terminator, embedded documents' and arrays' length and
    terminator, booleans 0 or 1, binary lengths). Embedded documents are not looked into.

    False is not a verdict: the caller then runs the full check, which has the last word
    (rare types, code with scope, undefined, regex, DBPointer, symbol and code are always
    left to it). True only for what that check accepts too.
    """
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef const unsigned char* q
    cdef Py_ssize_t pos, last, rem, size, length
    cdef unsigned char kind
    if start < 0 or end > n or end - start < 5:
        return False
    if _i32(p + start) != end - start or p[end - 1] != 0:
        return False
    pos = start + 4
    last = end - 1
    while pos < last:
        kind = p[pos]
        pos += 1
        q = <const unsigned char*>memchr(p + pos, 0, last - pos)
        if q == NULL:
            return False
        pos = (q - p) + 1
        rem = last - pos
        if kind == 0x01 or kind == 0x09 or kind == 0x11 or kind == 0x12:
            size = 8
        elif kind == 0x02:
            if rem < 4:
                return False
            length = _i32(p + pos)
            if length < 1 or length > rem - 4 or p[pos + 4 + length - 1] != 0:
                return False
            size = 4 + length
        elif kind == 0x03 or kind == 0x04:
            if rem < 4:
                return False
            length = _i32(p + pos)
            if length < 5 or length > rem or p[pos + length - 1] != 0:
                return False
            size = length
        elif kind == 0x05:
            if rem < 5:
                return False
            length = _i32(p + pos)
            if length < 0 or length > rem - 5:
                return False
            if p[pos + 4] == 2 and (length < 4 or _i32(p + pos + 5) != length - 4):
                return False
            size = 5 + length
        elif kind == 0x07:
            size = 12
        elif kind == 0x08:
            if rem < 1 or p[pos] > 1:
                return False
            size = 1
        elif kind == 0x0A or kind == 0x7F or kind == 0xFF:
            size = 0
        elif kind == 0x10:
            size = 4
        elif kind == 0x13:
            size = 16
        else:
            return False
        if size > rem:
            return False
        pos += size
    return pos == last
