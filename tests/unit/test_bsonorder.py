"""BSON comparison order, which the proxy uses to merge server sort keys as mongos does:
checked against mongod's documented order of types and values."""

from __future__ import annotations

import datetime as dt
from typing import Any

from bson import Decimal128, Int64, ObjectId, Regex, Timestamp
from bson.binary import Binary
from bson.max_key import MaxKey
from bson.min_key import MinKey

from proxy.branching.bsonorder import compare, sort_key

# https://www.mongodb.com/docs/manual/reference/bson-type-comparison-order/
TYPE_ORDER: list[Any] = [
    MinKey(), None, 1, "a", {"a": 1}, [1], Binary(b"x", 0), ObjectId(), False,
    dt.datetime(2020, 1, 1), Timestamp(1, 1), Regex("a"), MaxKey(),
]


def test_types_compare_in_mongods_order() -> None:
    for i, a in enumerate(TYPE_ORDER):
        for j, b in enumerate(TYPE_ORDER):
            assert compare(a, b) == (i > j) - (i < j), (a, b)


def test_numbers_compare_by_value_across_types() -> None:
    assert compare(1, 1.0) == 0 and compare(Int64(1), Decimal128("1.0")) == 0
    assert compare(2, 1.5) == 1 and compare(Decimal128("0.1"), 0.2) == -1
    assert compare(float("nan"), -float("inf")) == -1  # NaN sorts below every number


def test_strings_compare_by_bytes_binaries_by_length_first() -> None:
    assert compare("B", "a") == -1 and compare("é", "z") == 1
    assert compare(Binary(b"zz", 0), Binary(b"aaa", 0)) == -1
    assert compare(Binary(b"a", 5), Binary(b"b", 0)) == 1


def test_documents_and_arrays_compare_element_by_element() -> None:
    assert compare({"a": 1}, {"a": 1, "b": 0}) == -1
    assert compare({"a": 2}, {"b": 1}) == -1  # same type: field names decide first
    assert compare({"a": "x"}, {"a": 1}) == 1  # value types before names
    assert compare([1, 2], [1, 3]) == -1 and compare([1], [1, 0]) == -1


def test_sort_key_honours_each_direction() -> None:
    keys = [[1, "b"], [2, "a"], [1, "a"], [2, "b"]]
    assert sorted(keys, key=sort_key([1, -1])) == [[1, "b"], [1, "a"], [2, "b"], [2, "a"]]
    assert sorted(keys, key=sort_key([-1, 1])) == [[2, "a"], [2, "b"], [1, "a"], [1, "b"]]
