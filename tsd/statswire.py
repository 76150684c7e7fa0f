"""`ts --stats` on the wire: its request and its response (re-exported by tsd.protocol).

Apart from tsd.protocol only to keep that module within its size; the request
is parsed with the others in `tsd.protocol.parse_request`.
"""

from __future__ import annotations

from dataclasses import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ts a few ms at start and only mypy needs it here
    from collections.abc import Mapping
    from typing import Any


@dataclass(frozen=True)
class Stats:
    """ts --stats: per-user accounting of the jobs ended since `since` (epoch seconds;
    None: all the history kept). `all_users` (-A, admins) lists every user."""

    since: float | None = None
    all_users: bool = False


@dataclass(frozen=True)
class StatsReport:
    """stats: one row per user, as `ts --stats -M json` prints them (contract keys)."""

    rows: tuple[Mapping[str, Any], ...]

    def to_wire(self) -> dict[str, Any]:
        """The response body."""
        return {"rows": [dict(r) for r in self.rows]}
