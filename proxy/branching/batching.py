"""Documents grouped for the proxy's own insert commands."""

from __future__ import annotations

from typing import Any

import bson

# Documents in one insert at most.
BATCH = 1000
# The bytes of documents sent in one insert: a command's body is one BSON document, which
# the upstream takes up to 16 MB (a driver's 48 MB batch of three documents near 16 MB
# comes in a document sequence, which the proxy's own commands do not use).
INSERT_BYTES = 8 * 1024 * 1024


def fitted(docs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Documents in consecutive groups of at most BATCH and INSERT_BYTES (a larger
    document alone)."""
    groups: list[list[dict[str, Any]]] = []
    size = 0
    for doc in docs:
        n = len(bson.encode(doc))
        if not groups or len(groups[-1]) >= BATCH or size + n > INSERT_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(doc)
        size += n
    return groups
