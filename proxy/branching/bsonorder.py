"""BSON comparison order, for merging server-computed sort keys (as mongos does).

The server computes every sort key (array min/max, missing as null); this
only orders two keys it handed back, under the simple collation.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from decimal import Decimal
from typing import Any

from bson import DBRef, ObjectId
from bson.binary import Binary
from bson.code import Code
from bson.datetime_ms import DatetimeMS
from bson.decimal128 import Decimal128
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.regex import Regex
from bson.timestamp import Timestamp

_MINKEY, _NULL, _NUMBER, _STRING, _OBJECT, _ARRAY, _BINARY, _OID, _BOOL, _DATE, _TS, \
    _REGEX, _CODE, _MAXKEY = range(14)


def _rank(value: Any) -> int:
    if value is None:
        return _NULL
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, int | float | Decimal128):
        return _NUMBER
    if isinstance(value, str):
        return _STRING
    if isinstance(value, dict | DBRef):
        return _OBJECT
    if isinstance(value, list | tuple):
        return _ARRAY
    if isinstance(value, bytes | Binary):
        return _BINARY
    if isinstance(value, ObjectId):
        return _OID
    if isinstance(value, dt.datetime | DatetimeMS):
        return _DATE
    if isinstance(value, Timestamp):
        return _TS
    if isinstance(value, Regex):
        return _REGEX
    if isinstance(value, Code):
        return _CODE
    if isinstance(value, MinKey):
        return _MINKEY
    if isinstance(value, MaxKey):
        return _MAXKEY
    raise TypeError(f"no BSON order for {type(value).__name__}")


def _sign(a: Any, b: Any) -> int:
    return (a > b) - (a < b)


def _number(value: Any) -> Decimal | float:
    if isinstance(value, Decimal128):
        return value.to_decimal()
    return value  # type: ignore[no-any-return]


def _ms(value: Any) -> int:
    if isinstance(value, DatetimeMS):
        return int(value)
    aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return int((aware - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1))


def compare(a: Any, b: Any) -> int:
    ra, rb = _rank(a), _rank(b)
    if ra != rb:
        return _sign(ra, rb)
    if ra == _NUMBER:
        x, y = _number(a), _number(b)
        x_nan = (isinstance(x, float) and math.isnan(x)) or (isinstance(x, Decimal) and x.is_nan())
        y_nan = (isinstance(y, float) and math.isnan(y)) or (isinstance(y, Decimal) and y.is_nan())
        if x_nan or y_nan:
            return _sign(not x_nan, not y_nan)
        if isinstance(x, Decimal) != isinstance(y, Decimal):
            x, y = Decimal(x), Decimal(y)
        return _sign(x, y)
    if ra == _STRING:
        return _sign(a.encode(), b.encode())
    if ra == _OBJECT:
        da = a.as_doc() if isinstance(a, DBRef) else a
        db = b.as_doc() if isinstance(b, DBRef) else b
        for (ka, va), (kb, vb) in zip(da.items(), db.items(), strict=False):
            c = _sign(_rank(va), _rank(vb)) or _sign(ka.encode(), kb.encode()) or compare(va, vb)
            if c:
                return c
        return _sign(len(da), len(db))
    if ra == _ARRAY:
        for va, vb in zip(a, b, strict=False):
            c = compare(va, vb)
            if c:
                return c
        return _sign(len(a), len(b))
    if ra == _BINARY:
        sa = a.subtype if isinstance(a, Binary) else 0
        sb = b.subtype if isinstance(b, Binary) else 0
        return _sign(len(a), len(b)) or _sign(sa, sb) or _sign(bytes(a), bytes(b))
    if ra == _OID:
        return _sign(a.binary, b.binary)
    if ra == _BOOL:
        return _sign(a, b)
    if ra == _DATE:
        return _sign(_ms(a), _ms(b))
    if ra == _TS:
        return _sign((a.time, a.inc), (b.time, b.inc))
    if ra == _REGEX:
        return _sign((a.pattern, a.flags), (b.pattern, b.flags))
    if ra == _CODE:
        return _sign(str(a), str(b))
    return 0


def sort_key(directions: list[int]) -> Any:
    """A key function over server sort keys (lists), honouring each field's direction."""
    def cmp(a: list[Any], b: list[Any]) -> int:
        for va, vb, d in zip(a, b, directions, strict=False):
            c = compare(va, vb)
            if c:
                return c * d
        return 0

    return functools.cmp_to_key(cmp)
