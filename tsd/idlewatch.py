"""Idle GPUs (config `gpu.idle_*`): samples running GPU jobs, flags, notifies and acts.

While `gpu.idle_after` is set and some job holds GPUs, the watch reads the
NVML picture every few seconds (through tsd.gpumonitor, off the loop), feeds
each job's GPUs' utilisation to tsd.idle's tracker, and applies its verdicts:

* flag: the job's record carries `gpu_idle_since` (`ts -l` shows
  `running(idle)`, `ts -i` an `Idle since:` line, JSON `GPU_Idle_Since`);
* notify, once per run: the admin's `gpu.idle_notify` command, run as the
  job's user with TS_JOB_ID and friends in its environment, and a mail when
  the job was queued with -m; one log line either way;
* act, after `gpu.idle_grace`: `kill` ends the job like `ts -k` (its exit
  note says "idle GPU"); `requeue` ends it and queues it again at the front
  of its owner's queue, with a notice `ts -i` shows.

The hook and the mail run as child processes the loop waits for without
blocking; privileges are dropped in the child (groups, gid, uid) before it
runs anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from tsd.config import Config, IdleConfig
from tsd.gpumonitor import GpuMonitor
from tsd.idle import IdleRule, IdleTracker, RunKey, Verdict
from tsd.model import Job
from tsd.periodic import Periodic
from tsd.runner import EndReason

log = logging.getLogger("tsd")

SENDMAIL = "/usr/sbin/sendmail"  # tsd.launch.SENDMAIL
HOOK_TIMEOUT = 60.0  # seconds a notify command or sendmail may take before it is killed
OFF_RECHECK = 5.0  # seconds between looks at the config while the feature is off


class IdleTable(Protocol):
    """The job table as the watch uses it (tsd.jobtable.JobTable)."""

    running: dict[int, Job]

    def set_idle(self, job_id: int, since: float | None) -> None: ...


class IdleRunner(Protocol):
    """The runner as the watch uses it (tsd.runner.Runner)."""

    def kill(self, job: Job, why: EndReason | None = None) -> None: ...


def sample_interval(config: Config) -> float:
    """How often to sample: often enough to see `idle_after` and `idle_grace` pass."""
    idle = config.idle
    assert idle.after is not None
    spans = [config.gpus.poll_seconds, idle.after / 4]
    if idle.action != "none":
        spans.append(idle.grace / 4)
    return min(max(min(spans), 0.25), 60.0)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:.0f}s"


class IdleWatch:
    """The sampling loop and what its verdicts lead to."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: Callable[[], Config],
        table: IdleTable,
        gpus: GpuMonitor,
        runner: IdleRunner,
        env_of: Callable[[int], tuple[tuple[str, str], ...]],
    ) -> None:
        self.loop = loop
        self._config = config
        self.table = table
        self.gpus = gpus
        self.runner = runner
        self._env_of = env_of
        self.tracker = IdleTracker()
        self._rounds = Periodic(loop, self.tick, "idle GPUs: sampling failed", OFF_RECHECK)
        self._children: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        """Begin sampling (it sleeps while the feature is off or no job holds a GPU)."""
        self._rounds.start()

    async def stop(self) -> None:
        """Stop sampling (at shutdown); hooks under way are left to finish."""
        await self._rounds.stop()

    async def tick(self) -> float:
        """One sample round; the seconds until the next one."""
        config = self._config()
        if config.idle.after is None:
            self._clear()
            return OFF_RECHECK
        interval = sample_interval(config)
        holders = [j for j in self.table.running.values() if j.gpu_ids and j.start_time]
        if not holders:
            self.tracker.clear()
            return interval
        gpus, _ = await self.gpus.snapshot(max_age=interval / 2)
        by_index = {g.index: g for g in gpus or ()}
        samples: dict[RunKey, list[int | None] | None] = {}
        jobs: dict[RunKey, Job] = {}
        for job in holders:
            key = (job.id, float(job.start_time or 0))
            jobs[key] = job
            samples[key] = None if gpus is None else [
                by_index[i].utilization if i in by_index else None for i in job.gpu_ids
            ]
        rule = _rule(config.idle)
        for verdict in self.tracker.observe(time.time(), samples, rule):
            self._apply(jobs[verdict.key], verdict, config.idle)
        return interval

    def _clear(self) -> None:
        self.tracker.clear()
        for job_id, job in list(self.table.running.items()):
            if job.gpu_idle_since is not None:
                self.table.set_idle(job_id, None)

    def _apply(self, job: Job, verdict: Verdict, idle: IdleConfig) -> None:
        if job.id not in self.table.running:
            return  # it ended while NVML was read
        self.table.set_idle(job.id, verdict.idle_since)
        if verdict.idle_since is None:
            return
        idle_for = _duration(time.time() - verdict.idle_since)
        if verdict.notify:
            gpus = ",".join(map(str, job.gpu_ids))
            log.info("job %d of %s: its GPUs %s have been idle for %s", job.id, job.user, gpus,
                     idle_for)
            self._spawn(self._notify(job, verdict.idle_since, idle))
        if verdict.act:
            requeue = idle.action == "requeue"
            what = "requeued" if requeue else "killed"
            note = f"idle GPU: {what} after its GPUs sat idle for {idle_for}"
            log.info("job %d of %s: %s (gpu.idle_action %s)", job.id, job.user, note,
                     idle.action)
            self.runner.kill(job, EndReason(note, requeue=requeue))

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._children.add(task)
        task.add_done_callback(self._children.discard)

    # ------------------------------------------------------------ telling the user

    async def _notify(self, job: Job, since: float, idle: IdleConfig) -> None:
        try:
            pw = pwd.getpwuid(job.uid)
        except KeyError:
            return
        env = _hook_env(job, pw, since, idle)
        if idle.notify:
            code = await _run_as(pw, ["/bin/sh", "-c", idle.notify], env)
            if code != 0:
                log.warning("job %d: gpu.idle_notify exited %s", job.id, code)
        if job.spec.mail and os.path.exists(SENDMAIL):
            to = dict(self._env_of(job.id)).get("TS_MAILTO") or pw.pw_name
            action = {"kill": "killed", "requeue": "queued again"}.get(idle.action)
            after = f" It will be {action} in {_duration(idle.grace)}." if action else ""
            body = (
                f"Subject: Task Spooler: task {job.id} holds idle GPUs\nTo: {to}\n\n"
                f"Command: {job.spec.command_line}\nGPUs: {env['TS_GPU_IDS']}\n"
                f"Idle since: {time.ctime(since)}.{after}\n"
            )
            code = await _run_as(pw, [SENDMAIL, "-oi", to], env, body.encode())
            if code != 0:
                log.warning("job %d: idle GPU mail not sent: %s exited %s", job.id, SENDMAIL,
                            code)


def _rule(idle: IdleConfig) -> IdleRule:
    assert idle.after is not None
    return IdleRule(after=idle.after, threshold=idle.threshold, grace=idle.grace,
                    action=idle.action)


def _hook_env(job: Job, pw: pwd.struct_passwd, since: float, idle: IdleConfig) -> dict[str, str]:
    """What gpu.idle_notify gets: who, which job, since when, and what happens next."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "TS_JOB_ID": str(job.id),
        "TS_JOBID": str(job.id),
        "TS_USER": job.user,
        "TS_COMMAND": job.spec.command_line,
        "TS_LABEL": job.spec.label or "",
        "TS_GPU_IDS": ",".join(map(str, job.gpu_ids)),
        "TS_IDLE_SINCE": str(int(since)),
        "TS_IDLE_SECONDS": str(int(time.time() - since)),
        "TS_IDLE_ACTION": idle.action,
        "TS_IDLE_GRACE": str(int(idle.grace)),
    }


async def _run_as(
    pw: pwd.struct_passwd, argv: list[str], env: Mapping[str, str], stdin: bytes = b""
) -> int | None:
    """Run argv as this user (from root: groups, gid, uid dropped in the child); its exit code."""
    drop: dict[str, Any] = {}
    if os.getuid() == 0 and pw.pw_uid != 0:
        drop = {"user": pw.pw_uid, "group": pw.pw_gid,
                "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid)}
    try:
        proc = await asyncio.create_subprocess_exec(
            # cwd "/": a root-squashed home may refuse root, who changes directory first.
            *argv, env=dict(env), cwd="/", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True, **drop,
        )
    except OSError as exc:
        log.warning("cannot run %s as %s: %s", argv[0], pw.pw_name, exc.strerror or exc)
        return None
    try:
        await asyncio.wait_for(proc.communicate(stdin), HOOK_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    return proc.returncode
