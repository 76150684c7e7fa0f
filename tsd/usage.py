"""Fair share by decayed usage: the pure arithmetic, and a per-user usage book.

A user's usage is what their jobs took: slot-seconds plus `gpu_weight` times
GPU-seconds. It decays exponentially: every `half_life` seconds it halves, so
what someone used last month weighs little against what they used today. The
scheduler orders users by usage divided by their `share` (least first).

Each user's usage is kept as one number and the time it was valid at
(`Usage`): decaying it to any later time is one multiplication, and adding a
charge is decay-then-add. So the book is O(users) whatever the history, and
it is what the store persists (table `usage`, one row per user).

A running job is charged continuously: its contribution from `start` to
`end` at rate r (slots + gpu_weight x GPUs) is the integral of r decayed to
`end`, r * H / ln 2 * (1 - 2^(-(end - start) / H)). Nothing here does I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_GPU_WEIGHT",
    "DEFAULT_HALF_LIFE",
    "FairShareSettings",
    "Running",
    "Usage",
    "UsageBook",
    "decayed",
    "parse_duration",
    "run_charge",
]

DEFAULT_HALF_LIFE = 7 * 86400.0  # seconds: a week
DEFAULT_GPU_WEIGHT = 4.0  # one GPU-second weighs as much as four slot-seconds


_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([smhdw]?)\s*")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float | None:
    """Seconds from `90`, `90s`, `30m`, `12h`, `7d`, `2w`; None unless a positive duration."""
    match = _DURATION_RE.fullmatch(text)
    if not match:
        return None
    value = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return value if 0 < value < math.inf else None


@dataclass(frozen=True)
class FairShareSettings:
    """The `scheduler.fair_share` section: how fast usage fades and what a GPU weighs."""

    half_life: float = DEFAULT_HALF_LIFE  # seconds; > 0
    gpu_weight: float = DEFAULT_GPU_WEIGHT  # >= 0


@dataclass(frozen=True)
class Usage:
    """A user's decayed usage `value` (weighted slot-seconds), valid at time `at` (epoch s)."""

    value: float = 0.0
    at: float = 0.0


@dataclass(frozen=True)
class Running:
    """A job that holds slots and GPUs now, for the usage it is adding as it runs."""

    uid: int
    slots: int
    gpus: int
    start: float  # epoch seconds


def decayed(usage: Usage, now: float, half_life: float) -> float:
    """`usage`'s value at `now`: halved for every `half_life` seconds since `usage.at`.

    A time before `usage.at` (a clock stepped back) does not make usage grow.
    """
    elapsed = now - usage.at
    if elapsed <= 0 or usage.value == 0:
        return usage.value
    return usage.value * math.exp2(-elapsed / half_life)


def rate(slots: int, gpus: int, gpu_weight: float) -> float:
    """Usage per second of a job holding `slots` slots and `gpus` GPUs."""
    return max(0, slots) + gpu_weight * max(0, gpus)


def run_charge(rate_: float, start: float, end: float, half_life: float) -> float:
    """Usage a job with this rate adds from `start` to `end`, decayed to `end`.

    The integral of rate * 2^(-(end - t) / H) dt over [start, end]; for a run
    much shorter than H it is about rate * (end - start).
    """
    span = end - start
    if span <= 0 or rate_ <= 0:
        return 0.0
    return rate_ * half_life / math.log(2) * -math.expm1(-span * math.log(2) / half_life)


def charged(usage: Usage, amount: float, at: float, half_life: float) -> Usage:
    """`usage` with `amount` added at time `at` (decayed to the later of the two times)."""
    if at >= usage.at:
        return Usage(decayed(usage, at, half_life) + max(0.0, amount), at)
    # A charge dated before the book's time (an end recorded late): decay it instead.
    late = Usage(max(0.0, amount), at)
    return Usage(usage.value + decayed(late, usage.at, half_life), usage.at)


class UsageBook:
    """Every user's decayed usage, in memory; the daemon persists what `charge` returns."""

    def __init__(
        self, settings: FairShareSettings, rows: Mapping[int, Usage] | None = None
    ) -> None:
        self.settings = settings
        self._usage: dict[int, Usage] = dict(rows or {})

    def usage(self, uid: int) -> Usage:
        """The user's recorded usage (without their running jobs)."""
        return self._usage.get(uid, Usage())

    def users(self) -> list[int]:
        """Every uid with recorded usage."""
        return list(self._usage)

    def after_charge(self, uid: int, slot_seconds: float, gpu_seconds: float, at: float) -> Usage:
        """What the user's usage becomes once charged (not applied: persist it, then `set`)."""
        amount = max(0.0, slot_seconds) + self.settings.gpu_weight * max(0.0, gpu_seconds)
        return charged(self.usage(uid), amount, at, self.settings.half_life)

    def after_run(self, uid: int, slots: int, gpus: int, start: float, end: float) -> Usage:
        """What the user's usage becomes once a job's whole run is charged (not applied)."""
        h = self.settings.half_life
        amount = run_charge(rate(slots, gpus, self.settings.gpu_weight), start, end, h)
        return charged(self.usage(uid), amount, end, h)

    def set(self, uid: int, usage: Usage) -> None:
        """Record a user's usage (after the store has it)."""
        self._usage[uid] = usage

    def now(self, uid: int, now: float, running: Iterable[Running] = ()) -> float:
        """The user's usage at `now`, their running jobs' time so far included."""
        h = self.settings.half_life
        total = decayed(self.usage(uid), now, h)
        for job in running:
            if job.uid == uid:
                r = rate(job.slots, job.gpus, self.settings.gpu_weight)
                total += run_charge(r, job.start, now, h)
        return total

    def keys(
        self, now: float, running: Iterable[Running], share: Mapping[int, float] | None = None
    ) -> dict[int, float]:
        """Usage at `now` divided by share: for the users in `share` (share 1 for those
        absent), or with `share` None for every user with usage or a running job.

        A user absent from the result has no usage: their key is 0.
        """
        h = self.settings.half_life
        wanted = self._usage.keys() if share is None else share.keys()
        totals = {uid: decayed(self.usage(uid), now, h) for uid in wanted}
        for job in running:
            if share is not None and job.uid not in share:
                continue
            r = rate(job.slots, job.gpus, self.settings.gpu_weight)
            totals[job.uid] = totals.get(job.uid, 0.0) + run_charge(r, job.start, now, h)
        shares = share or {}
        return {uid: value / shares.get(uid, 1.0) for uid, value in totals.items()}
