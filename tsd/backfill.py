"""Reservations and backfill: when a waiting big job cannot be delayed by a smaller one.

The scheduler gives one waiting job a reservation: the job first in queue
order (the one that has waited longest) among the heads that are short of the
server's free slots or GPUs while within their user's quota. Jobs after it in
the queue may start only if they cannot delay it, as in Slurm's backfill:

* the reservation's *shadow time* is when enough slots and GPUs will be free
  for it, from the running jobs' expected ends (start + --timeout). A running
  job without --timeout has no known end, and if the reservation needs what
  such a job holds, the shadow time is unknown;
* a job whose --timeout ends by the shadow time may use anything free now:
  it is gone before the reserved job could start;
* any other job (no --timeout, or a longer one) may use only what the
  reserved job will not need at the shadow time (its *extra*): slots and GPUs
  beyond its needs. With an unknown shadow time that is what is free now
  beyond its needs. So a job without --timeout never takes what the
  reservation needs.

Pure: plain values in, plain values out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Holder", "Need", "Plan", "plan"]


@dataclass(frozen=True)
class Holder:
    """A job holding slots and GPUs now; `end` is when it will have ended, None if unknown."""

    slots: int
    gpus: tuple[int, ...]
    end: float | None


@dataclass(frozen=True)
class Need:
    """What a job takes: slots, a number of GPUs, or exactly these GPUs (`pinned`)."""

    slots: int
    gpus: int = 0
    pinned: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Plan:
    """The reservation's shadow time and what jobs that outlast it may still take."""

    shadow: float | None  # when the reserved job can start at the latest; None: unknown
    extra_slots: int  # slots a long-running job may take without delaying it
    extra_gpus: int  # GPUs (by count) a long-running job may take; for a pinned need
    protected: frozenset[int]  # GPU indices a long-running job must not take (pinned need)

    def allows(self, need: Need, end: float | None, free_gpus: Sequence[int]) -> bool:
        """Whether a job with this need, ending at `end` if started now, may start.

        `free_gpus` are the GPUs free now (sorted): where a GPU job would get
        its GPUs, avoiding `protected` ones when it can.
        """
        if end is not None and self.shadow is not None and end <= self.shadow:
            return True
        if need.slots > self.extra_slots:
            return False
        if need.pinned is not None:
            if set(need.pinned) & self.protected:
                return False
            return len(need.pinned) <= self.extra_gpus
        if need.gpus == 0:
            return True
        outside = [g for g in free_gpus if g not in self.protected]
        return need.gpus <= len(outside) and need.gpus <= self.extra_gpus


def _enough(slots: int, gpus: set[int], need: Need) -> bool:
    if slots < need.slots:
        return False
    if need.pinned is not None:
        return set(need.pinned) <= gpus
    return len(gpus) >= need.gpus


def plan(
    need: Need, free_slots: int, free_gpus: Iterable[int], holders: Iterable[Holder]
) -> Plan:
    """The reservation of a job with `need`, given what is free now and who holds the rest.

    Walks the holders in order of expected end, freeing what each holds, until
    the need is met: that time is the shadow time. What is then free beyond
    the need is the extra (with an unknown shadow time: what is free now).
    """
    slots = max(0, free_slots)
    gpus = set(free_gpus)
    shadow: float | None = None
    if not _enough(slots, gpus, need):
        timed = sorted((h for h in holders if h.end is not None), key=lambda h: h.end or 0.0)
        for i, holder in enumerate(timed):
            slots += holder.slots
            gpus.update(holder.gpus)
            last = i + 1 == len(timed) or (timed[i + 1].end or 0.0) > (holder.end or 0.0)
            if last and _enough(slots, gpus, need):
                shadow = holder.end
                break
        else:
            # Never enough with the known ends: count only what is free now.
            slots, gpus = max(0, free_slots), set(free_gpus)
    extra_slots = max(0, slots - need.slots)
    if need.pinned is not None:
        protected = frozenset(need.pinned)
        extra_gpus = len(gpus - protected)
    else:
        protected = frozenset()
        extra_gpus = max(0, len(gpus) - need.gpus)
    return Plan(shadow, extra_slots, extra_gpus, protected)
