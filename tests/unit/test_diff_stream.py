"""The admin client's incremental parse of the streamed diff, on every chunking of one
stream the server's format produces (proxy/admin/branches.py writes it)."""

from __future__ import annotations

import json

import pytest

from proxy.admin.client import ApiError, _diff_items


def stream(changes: list[dict[str, object]], summary: dict[str, object]) -> bytes:
    # The exact framing of the server's diff route.
    out = f'{{"branch": {json.dumps("b")}, "parent": {json.dumps("main")}, "changes": ['
    out += ",\n".join(json.dumps(c) for c in changes)
    out += f'], "summary": {json.dumps(summary)}}}\n'
    return out.encode()


CHANGES = [{"ns": "db.c", "op": "update", "_id": i, "parent": {"_id": i, "s": "é" * i},
            "branch": {"_id": i, "s": "]},[" * i}} for i in range(40)]
SUMMARY = {"db.c": {"insert": 0, "update": 40, "delete": 0}}


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1 << 20])
def test_every_chunking_gives_the_same_items(size: int) -> None:
    data = stream(CHANGES, SUMMARY)
    items = list(_diff_items(iter([data[i:i + size] for i in range(0, len(data), size)]), "u"))
    assert items[0] == ("parent", "main")
    assert items[1:-1] == [("change", c) for c in CHANGES]
    assert items[-1] == ("summary", SUMMARY)


def test_empty_diff() -> None:
    assert list(_diff_items(iter([stream([], {})]), "u")) == [("parent", "main"),
                                                               ("summary", {})]


@pytest.mark.parametrize("cut", [10, 60, -5])
def test_a_cut_stream_is_an_error(cut: int) -> None:
    data = stream(CHANGES[:3], SUMMARY)[:cut]
    with pytest.raises(ApiError, match="not well-formed"):
        list(_diff_items(iter([data]), "u"))
