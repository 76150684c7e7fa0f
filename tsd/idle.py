"""Which running jobs hold GPUs they do not use: the pure decision behind `gpu.idle_*`.

The daemon (tsd.idlewatch) samples each GPU job's GPUs' utilisation every
few seconds and feeds the samples here; this module keeps, per job run, since
when its GPUs have been idle and says what to do now. No I/O, no clock: the
time of each sample is an argument.

The rules, which are the feature's semantics:

* A sample is idle when every GPU of the job reports a utilisation at or
  below the threshold. A GPU that reports none (NVML down, a board without
  the sensor) makes the sample not idle: tsd never acts on what it cannot see.
* Idleness is continuous from the first idle sample; any sample that is not
  idle (a busy GPU, an unknown one, no picture at all) starts it over.
* A job is flagged once it has been idle for `after` seconds, and stays
  flagged until a sample is not idle. Its user is notified the first time it
  is flagged, once per run of the job.
* With an action (`kill` or `requeue`), the job is acted on once it has been
  idle for `after + grace` seconds, once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

RunKey = tuple[int, float]  # (job id, start time): a requeued job's next run starts afresh


@dataclass(frozen=True)
class IdleRule:
    """The config's `gpu.idle_*` keys, as the decision reads them."""

    after: float  # seconds
    threshold: float  # percent
    grace: float  # seconds
    action: str = "none"  # "none", "kill" or "requeue"


@dataclass(frozen=True)
class Verdict:
    """What a sample round says about one job run."""

    key: RunKey
    idle_since: float | None  # when its idleness began, while it is flagged; else None
    notify: bool = False  # tell its user now (first flag of this run)
    act: bool = False  # apply the rule's action now


@dataclass
class _Run:
    since: float | None = None
    notified: bool = False
    acted: bool = False


def sample_is_idle(utilizations: Sequence[int | None] | None, threshold: float) -> bool:
    """Whether one sample of a job's GPUs counts as idle (see the module's rules)."""
    if not utilizations:
        return False
    return all(u is not None and u <= threshold for u in utilizations)


class IdleTracker:
    """Per job run: since when it is idle, whether its user was told, whether it was acted on."""

    def __init__(self) -> None:
        self._runs: dict[RunKey, _Run] = {}

    def observe(
        self,
        now: float,
        samples: Mapping[RunKey, Sequence[int | None] | None],
        rule: IdleRule,
    ) -> list[Verdict]:
        """One sample round of every running GPU job; runs not in `samples` are forgotten.

        Returns a verdict for every job run sampled, in the order of `samples`.
        """
        for gone in set(self._runs) - set(samples):
            del self._runs[gone]
        out = []
        for key, utilizations in samples.items():
            run = self._runs.setdefault(key, _Run())
            if not sample_is_idle(utilizations, rule.threshold):
                run.since = None
                out.append(Verdict(key, None))
                continue
            if run.since is None:
                run.since = now
            idle_for = now - run.since
            if idle_for < rule.after:
                out.append(Verdict(key, None))
                continue
            notify = not run.notified
            run.notified = True
            act = (
                rule.action != "none" and not run.acted and idle_for >= rule.after + rule.grace
            )
            run.acted = run.acted or act
            out.append(Verdict(key, run.since, notify=notify, act=act))
        return out

    def clear(self) -> None:
        """Forget every run (the feature was turned off)."""
        self._runs.clear()
