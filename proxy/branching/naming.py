"""Reserved names of overlay collections.

`__mb_<bid>_<kind>_<collection>`: the branch id is hex and the kind one
letter, so a name splits back unambiguously whatever the collection name holds.
"""

from __future__ import annotations

import re

PREFIX = "__mb_"
# The upstream's own data, the root every branch descends from.
MAIN = "main"
LIVE = "l"
HIDDEN = "h"
# A read's copy of what a $graphLookup or $lookup `from` shows on the branch
# (commands/scratchfrom.py), dropped when the read ends.
SCRATCH_FROM = "g"
# Never created: what the upstream answers for a collection that does not exist is
# asked under it (commands/stats.py, commands/upkeep.py).
ABSENT = "a"
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def live(bid: str, coll: str) -> str:
    return f"{PREFIX}{bid}_{LIVE}_{coll}"


def hidden(bid: str, coll: str) -> str:
    return f"{PREFIX}{bid}_{HIDDEN}_{coll}"


def absent(bid: str, coll: str) -> str:
    return f"{PREFIX}{bid}_{ABSENT}_{coll}"


def is_reserved(coll: str) -> bool:
    return coll.startswith(PREFIX)


def valid_branch_name(name: object) -> bool:
    return isinstance(name, str) and bool(_NAME_RE.match(name)) and name != "main"


def scratch_from(bid: str, token: str) -> str:
    return f"{scratch_from_prefix(bid)}{token}"


def scratch_from_prefix(bid: str) -> str:
    """The names of every scratch `from` copy of a branch begin with this."""
    return f"{PREFIX}{bid}_{SCRATCH_FROM}_"
