"""`ts --stats`'s output: the per-user accounting rows as a table or as JSON.

Client side and light: only `json` from the standard library, loaded when used.
The rows come from the daemon with the contract's keys: `User`, `Jobs`,
`Failed`, `Slot_Hours`, `GPU_Hours`, `Mean_Wait_s`.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a few ms at import and is needed only by mypy
    from collections.abc import Mapping, Sequence
    from typing import Any

KEYS = ("User", "Jobs", "Failed", "Slot_Hours", "GPU_Hours", "Mean_Wait_s")


def _wait(seconds: float) -> str:
    """A wait as people read it: 42s, 3m05s, 2h10m, 1d04h."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _number(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, int | float) else 0.0


def stats_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per user under a header."""
    from tsd.render import printable

    header = (
        f"{'User':<16} {'Jobs':>6} {'Failed':>6} {'Slot-hours':>11} {'GPU-hours':>10}"
        f" {'Mean wait':>10}"
    )
    out = [header]
    for row in rows:
        user = printable(str(row.get("User", "?")))
        out.append(
            f"{user:<16} {int(_number(row, 'Jobs')):>6} {int(_number(row, 'Failed')):>6}"
            f" {_number(row, 'Slot_Hours'):>11.2f} {_number(row, 'GPU_Hours'):>10.2f}"
            f" {_wait(_number(row, 'Mean_Wait_s')):>10}"
        )
    return "\n".join(out) + "\n"


def stats_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a JSON list of objects with the contract's keys, in their order."""
    import json

    return json.dumps([{k: row.get(k) for k in KEYS} for row in rows], indent=2) + "\n"
