"""Hashable keys for _id values with BSON equality: 1, 1.0 and Int64(1) are one id."""

from __future__ import annotations

from typing import Any

import bson
from bson.decimal128 import Decimal128

from proxy.wire.bsonutil import CODEC


def idkey(value: Any) -> Any:
    if isinstance(value, bool):
        return ("b", value)
    # Python already equates 1, 1.0 and Decimal("1") with equal hashes.
    if isinstance(value, int):
        return ("n", int(value))
    if isinstance(value, float):
        return ("n", value) if value == value else ("nan",)
    if isinstance(value, Decimal128):
        dec = value.to_decimal()
        return ("n", dec) if not dec.is_nan() else ("nan",)
    if isinstance(value, str):
        return ("s", value)
    return ("x", bson.encode({"": value}, codec_options=CODEC))
