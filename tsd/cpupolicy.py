"""A reused supervisor's CPU policy: it yields to the work that runs, its jobs do not.

A supervisor sleeps while its job runs and wakes for short bookkeeping: the job's end
(reap it, report it) and the daemon's answer with the next job's plan. Under Linux's
fair scheduler a task that wakes preempts the one running on its CPU when it has
waited longer, as a supervisor always has: the daemon's send of a plan handed its CPU
to that supervisor before the daemon had sent the turn's other plans, and a job's end
took the CPU from another job. SCHED_BATCH keeps the same fair share and nice value
but never preempts on waking: the supervisor runs at the next scheduling point
instead, and a burst's hand-offs cost fewer context switches (bench/README.md).

Its jobs get the supervisor's first policy back (posix_spawn's scheduler attribute,
or sched_setscheduler in a forked child before exec), so a job runs as it would
without this. Only a supervisor that starts as SCHED_OTHER, the default, switches: a
daemon started under chrt (SCHED_IDLE, a real-time policy, reset-on-fork) keeps its
policy for its supervisors and their jobs, as before.
"""

from __future__ import annotations

import contextlib
import os

# What a job's process gets back before it execs, once this process switched; None
# while it runs its first policy (nothing to give back).
_for_jobs: tuple[int, os.sched_param] | None = None


def yield_to_jobs() -> None:
    """In a reused supervisor, once: SCHED_BATCH if it runs SCHED_OTHER (else nothing),
    remembering that its jobs get SCHED_OTHER back. The way back is tried here first
    (a job's spawn fails where its policy cannot be set): any refusal, a seccomp
    filter say, leaves SCHED_OTHER for the supervisor and nothing to give back."""
    global _for_jobs
    other, batch, param = os.SCHED_OTHER, os.SCHED_BATCH, os.sched_param(0)
    try:
        if os.sched_getscheduler(0) != other:
            return
        for policy in (batch, other, batch):
            os.sched_setscheduler(0, policy, param)
    except OSError:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, other, param)
        return
    _for_jobs = (other, param)


def for_jobs() -> tuple[int, os.sched_param] | None:
    """posix_spawn's `scheduler` for a job: the policy to give back, or None."""
    return _for_jobs


def give_back() -> None:
    """In a forked child about to exec a job's command (or TS_ONFINISH, or mail): the
    policy the supervisor started with. Moving from SCHED_BATCH to SCHED_OTHER at the
    same nice value needs no privilege (sched(7)), and yield_to_jobs tried it; should
    it fail after all, the job runs SCHED_BATCH rather than not at all."""
    if _for_jobs is not None:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, *_for_jobs)
