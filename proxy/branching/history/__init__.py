"""History computed from the WAL (docs/ARCHITECTURE.md, "History"): log, diff, merge,
reset, and branches at a past point, one module each over the points and lookups they
share. Callers name the operations from here (`history.merge`, `history.reset`).

Everything streams in batches: a diff or a merge never holds more than one batch
of documents, whatever the number of changes.
"""

from proxy.branching.history.at import create_at
from proxy.branching.history.branchmerge import STRATEGIES, Applier, Caller, MergeResult, merge
from proxy.branching.history.changes import (
    collection_change,
    diff,
    masked_diff,
    summarize,
    touched,
)
from proxy.branching.history.entries import log
from proxy.branching.history.points import (
    recorded_resets,
    resolve_point,
    visible_at,
    voids_at,
)
from proxy.branching.history.resets import reset

__all__ = [
    "STRATEGIES",
    "Applier",
    "Caller",
    "MergeResult",
    "collection_change",
    "create_at",
    "diff",
    "log",
    "masked_diff",
    "merge",
    "recorded_resets",
    "reset",
    "resolve_point",
    "summarize",
    "touched",
    "visible_at",
    "voids_at",
]
