"""Aggregation stages the proxy builds around documents it holds, for the upstream to
evaluate (matching, sorting, checking unique keys) rather than Python."""

from __future__ import annotations

from typing import Any


def documents_stage(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """A $documents stage yielding these documents as they are: its argument is an
    expression, so a bare "$name" string or {"$type": ...} inside one would be evaluated."""
    return {"$documents": [{"$literal": doc} for doc in docs]}
