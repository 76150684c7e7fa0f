"""The daemon: wires requests to the scheduler, the store and the launcher.

`tsd --system` is the root service for a shared server (socket-activated by
systemd, config from /etc/tsd/tsd.yaml, jobs in transient scopes);
`tsd --user` is the personal daemon the first `ts` call starts. Both share
this code: the differences are who may connect, where state lives, and
whether jobs get a scope and a privilege drop.

Every accepted job and every state change is committed to SQLite before the
client hears "ok". Jobs outlive the daemon: each has a supervisor process
(tsd.launch) that records its exit status in a file, which the next daemon
picks up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pwd
import signal
import socket
import sys
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from tsd import __version__, auth, launch, protocol
from tsd.config import Config, GpuConfig, load_config
from tsd.errors import (
    BadRequest,
    ConfigError,
    NoSuchJob,
    QueueFull,
    WrongState,
)
from tsd.model import DependMode, ExitInfo, Gpu, Job, JobState, Peer, UserLimits
from tsd.scheduler import DepOutcome, Resources, check_fits, decide
from tsd.server import SendEvent, Server, bind_personal, bind_system, inherited_socket

log = logging.getLogger("tsd")

SYSTEM_CONFIG = "/etc/tsd/tsd.yaml"
SYSTEM_STATE = "/var/lib/tsd"
LIMITS_TTL = 60.0  # seconds a user's resolved quota is reused
KILL_BACKSTOP = 10.0  # seconds past the grace before the daemon SIGKILLs a stuck job itself


@dataclasses.dataclass
class Settings:
    """Where this daemon lives and how it behaves; decided at start from mode and env."""

    system: bool
    state_dir: Path
    socket_path: str | None
    config_path: str | None
    max_connections: int = 1000
    save_list: str | None = None
    on_finish: str | None = None


def personal_config(env: dict[str, str]) -> Config:
    """task-spooler's variables, read once when the personal daemon starts."""

    def number(name: str, default: int) -> int:
        try:
            return max(0, int(env.get(name, default)))
        except ValueError:
            return default

    visible = None
    if env.get("TS_VISIBLE_DEVICES", "").strip():
        from tsd.gpupool import parse_indices

        try:
            visible = tuple(sorted(parse_indices(env["TS_VISIBLE_DEVICES"])))
        except ValueError as exc:
            # Not "all GPUs": a typo must not hand out GPUs the user meant to keep free.
            logging.getLogger("tsd").error("TS_VISIBLE_DEVICES ignored, no GPUs used: %s", exc)
            visible = ()
    return Config(
        slots=number("TS_SLOTS", 1),
        gpus=GpuConfig(visible=visible),
        admins=(),
        defaults=UserLimits(max_queued=number("TS_MAXCONN", 1000) or None),
        max_finished=number("TS_MAXFINISHED", 1000),
    )


class Daemon:
    """All state of a running daemon, and the handlers for every request."""

    def __init__(self, settings: Settings, config: Config) -> None:
        self.settings = settings
        self.config = config
        self.my_uid = os.getuid()
        state = settings.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.exits_dir = state / "exits"
        self.exits_dir.mkdir(exist_ok=True, mode=0o700)
        from tsd.store import Store

        self.store = Store(state / "state.db")
        # -S and --set_gpu_free_perc overrides, kept in memory too: the scheduler reads
        # them on every decision, the database only when they change.
        slots = self.store.get_setting("slots")
        self.slots_override = None if slots is None else int(slots)
        perc = self.store.get_setting("gpu_free_perc")
        self.free_perc_override = None if perc is None else float(perc)
        self.jobs: dict[int, Job] = {}
        self.pending: list[int] = []  # ids of queued/allocating jobs in queue order
        self.running: dict[int, Job] = {}
        self.dependents: dict[int, set[int]] = defaultdict(set)
        self.last_added: dict[int, int] = {}
        self.last_run: dict[int, int] = {}
        self.pending_count: dict[int, int] = defaultdict(int)
        self.pending_gpu_jobs = 0
        self.unvisited_reason = ""
        self.limits_cache: dict[int, tuple[float, UserLimits]] = {}
        self.order_range = (0, -1)  # lowest and highest queue order keys handed out
        self.finished_by_user: dict[int, deque[int]] = defaultdict(deque)  # oldest first
        self.waiters: dict[int, list[asyncio.Future[None]]] = defaultdict(list)
        self.start_waiters: dict[int, list[asyncio.Future[None]]] = defaultdict(list)
        self.room: asyncio.Condition | None = None
        self.watches: dict[int, tuple[int, int]] = {}  # job id -> (pidfd, report fd)
        self.kill_timers: dict[int, asyncio.TimerHandle] = {}
        self.gpu_timer: asyncio.TimerHandle | None = None
        self.gpu_cache: tuple[float, tuple[Gpu, ...] | None, str] = (0.0, None, "")
        self.stopping = asyncio.Event()
        self.server: Server | None = None
        self._gpus: Any = None
        self._scopes: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ adapters

    @property
    def scopes(self) -> Any:
        """systemd scopes, on the system service only (pydbus loads lazily)."""
        if self._scopes is None:
            from tsd.scope import SystemdScopes

            self._scopes = SystemdScopes()
        return self._scopes

    @property
    def gpus(self) -> Any:
        """NVML, loaded on first need: a CPU-only queue never touches it."""
        if self._gpus is None:
            from tsd.gpu import NvmlGpus

            self._gpus = NvmlGpus(library=os.environ.get("TSD_NVML_LIBRARY") or None)
        return self._gpus

    # ------------------------------------------------------------ startup

    def recover(self) -> None:
        """Load state; settle jobs whose supervisor ended while no daemon was running."""
        for job in self.store.load_all():
            self.jobs[job.id] = job
            if job.state.pending:
                self._enqueue_index(job)
            for dep in job.spec.depends:
                self.dependents[dep].add(job.id)
            self.last_added[job.uid] = max(self.last_added.get(job.uid, 0), job.id)
            if job.start_time is not None:
                self.last_run[job.uid] = max(self.last_run.get(job.uid, 0), job.id)
        self.pending.sort(key=lambda i: self.jobs[i].order)
        if self.jobs:
            orders = [j.order for j in self.jobs.values()]
            self.order_range = (min(orders), max(orders))
        for job in sorted(
            (j for j in self.jobs.values() if j.state.done), key=lambda j: (j.end_time or 0, j.id)
        ):
            self.finished_by_user[job.uid].append(job.id)
        for job in [j for j in self.jobs.values() if j.state is JobState.RUNNING]:
            self.running[job.id] = job
            if self._supervisor_alive(job):
                log.info("job %d: re-adopted (supervisor pid %s)", job.id, job.supervisor_pid)
                self._watch(job, report_fd=None)
            else:
                self._job_ended(job.id)
        for leftover in self.exits_dir.glob("*.json"):
            try:
                job_id = int(leftover.stem)
            except ValueError:
                continue
            known = self.jobs.get(job_id)
            if known is None or known.state is not JobState.RUNNING:
                leftover.unlink(missing_ok=True)

    def _next_order(self, front: bool = False) -> int:
        """A queue order key behind (or, for -u, in front of) every job; O(1)."""
        low, high = self.order_range
        if front:
            self.order_range = (low - 1, high)
            return low - 1
        self.order_range = (low, high + 1)
        return high + 1

    def _supervisor_alive(self, job: Job) -> bool:
        if job.supervisor_pid is None:
            return False
        if launch.proc_start_time(job.supervisor_pid) != job.supervisor_start:
            return False
        return not launch.exit_file(str(self.exits_dir), job.id).exists()

    def _enqueue_index(self, job: Job) -> None:
        self.pending.append(job.id)
        self.pending_count[job.uid] += 1
        if job.spec.gpus_wanted:
            self.pending_gpu_jobs += 1

    def _unqueue_index(self, job: Job) -> None:
        self.pending.remove(job.id)
        self.pending_count[job.uid] -= 1
        if job.spec.gpus_wanted:
            self.pending_gpu_jobs -= 1

    # ------------------------------------------------------------ requests

    async def handle(
        self, creds: tuple[int, int, int], req: protocol.Request, send: SendEvent
    ) -> dict[str, Any]:
        """Serve one request from the caller with these SO_PEERCRED credentials."""
        peer = auth.make_peer(*creds, is_admin=self.config.is_admin)
        auth.check_may_connect(peer, self.settings.system, self.my_uid)
        match req:
            case protocol.Submit():
                return await self.submit(peer, req)
            case protocol.ListJobs():
                return await self.list_jobs(peer, req.all_users, send)
            case protocol.GetJob():
                job = self._pick(peer, req.id, req.default)
                return {"job": protocol.job_to_wire(self._with_reason(job))}
            case protocol.Remove():
                return self.remove(peer, req.id)
            case protocol.Urgent():
                return self.urgent(peer, req.id)
            case protocol.Swap():
                return self.swap(peer, req.a, req.b)
            case protocol.Kill():
                job = self._pick(peer, req.id, "run")
                self.kill(job)
                return {"id": job.id}
            case protocol.KillAll():
                mine = [j for j in self.running.values() if j.uid == peer.uid or peer.admin]
                for job in mine:
                    self.kill(job)
                return {"count": len(mine)}
            case protocol.Clear():
                return self.clear(peer)
            case protocol.Shutdown():
                if self.settings.system:
                    auth.check_admin(peer, "stopping the daemon (-K)")
                assert self.loop is not None
                # Stop just after this answer is on its way, not before.
                self.loop.call_later(0.05, self.stopping.set)
                return {}
            case protocol.Slots():
                return self.slots(peer, req.value)
            case protocol.CountRunning():
                mine = [j for j in self.running.values() if j.uid == peer.uid or peer.admin]
                return {"count": len(mine)}
            case protocol.Wait():
                return await self.wait(peer, req, send)
            case protocol.Env():
                return self.env(peer, req)
            case protocol.LogDir():
                return self.logdir(peer, req.path)
            case protocol.GpuFreePerc():
                return self.gpu_free_perc(peer, req.value)
            case protocol.GpuStatus():
                return self.gpu_status()
        raise BadRequest("bad request: unsupported operation")

    # -- submit

    async def submit(self, peer: Peer, req: protocol.Submit) -> dict[str, Any]:
        """Validate, wait for room if the queue is full, make durable, then answer."""
        spec = req.spec
        depends = list(spec.depends)
        if req.depend_last and self.last_added.get(peer.uid):
            depends.append(self.last_added[peer.uid])
        for dep in depends:
            other = self.jobs.get(dep)
            if other is None:
                raise NoSuchJob(f"job {dep} does not exist (cannot depend on it)")
            auth.check_owner(peer, other)
        spec = replace(spec, depends=tuple(dict.fromkeys(depends)))
        limits = self.limits(peer.uid)
        pool = self._known_pool() if spec.gpus_wanted else None
        check_fits(
            spec, limits, self.total_slots(), None if pool is None else len(pool), pool
        )
        if limits.max_queued is not None:
            while self.pending_count[peer.uid] >= limits.max_queued:
                if not req.block:
                    raise QueueFull(f"your queue is full ({limits.max_queued} jobs waiting)")
                assert self.room is not None
                async with self.room:
                    await self.room.wait()
        job = self.store.add_job(
            peer.uid, peer.user, spec, self._next_order(), time.time()
        )
        self.jobs[job.id] = job
        self._enqueue_index(job)
        for dep in spec.depends:
            self.dependents[dep].add(job.id)
        self.last_added[peer.uid] = job.id
        log.info("job %d queued by %s: %s", job.id, peer.user, spec.command_line[:200])
        self.schedule()
        return {"id": job.id}

    def limits(self, uid: int) -> UserLimits:
        """A user's quota under the current config.

        Cached for a minute: the scheduler asks for it on every decision, and
        group membership (the group database) changes rarely.
        """
        if not self.settings.system:
            return self.config.defaults
        now = time.monotonic()
        cached = self.limits_cache.get(uid)
        if cached is not None and now - cached[0] < LIMITS_TTL:
            return cached[1]
        limits = self._limits_uncached(uid)
        self.limits_cache[uid] = (now, limits)
        return limits

    def _limits_uncached(self, uid: int) -> UserLimits:
        user = auth.user_name(uid)
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = -1
        return self.config.limits_for(user, auth.group_names(auth.group_ids(user, gid)))

    def total_slots(self) -> int:
        """The server's slot count: -S's override if set, else the config's."""
        return self.slots_override if self.slots_override is not None else self.config.slots

    # -- queries

    def _visible(self, peer: Peer, job: Job) -> Job:
        auth.check_owner(peer, job)
        return job

    def _pick(self, peer: Peer, job_id: int | None, default: str) -> Job:
        if job_id is None:
            table = self.last_run if default == "run" else self.last_added
            job_id = table.get(peer.uid)
            if job_id is None or job_id not in self.jobs:
                what = "run" if default == "run" else "queued"
                raise NoSuchJob(f"you have no {what} job")
        job = self.jobs.get(job_id)
        if job is None:
            raise NoSuchJob(f"job {job_id} does not exist")
        return self._visible(peer, job)

    async def list_jobs(self, peer: Peer, all_users: bool, send: SendEvent) -> dict[str, Any]:
        """ts -l (-A: everyone's). A long list goes out in pieces under the frame limit."""
        # One snapshot first: the queue may change while a piece is being sent.
        shown = [
            self._with_reason(j) for j in self._listing_order() if all_users or j.uid == peer.uid
        ]
        rows: list[dict[str, Any]] = []
        size = 0
        for job in shown:
            if size > protocol.LIST_CHUNK:
                await send({"event": "jobs", "jobs": rows})
                rows, size = [], 0
            rows.append(protocol.job_to_wire(job))
            size += 1024 + len(job.spec.command_line) + len(job.spec.label or "")
        used = sum(j.spec.slots for j in self.running.values())
        return {"jobs": rows, "slots": self.total_slots(), "running": used}

    def _with_reason(self, job: Job) -> Job:
        # The scheduler stops reading the queue once the server is full; jobs it did
        # not reach wait for that one reason.
        if job.state.pending and not job.wait_reason and self.unvisited_reason:
            return replace(job, wait_reason=self.unvisited_reason)
        if job.state is JobState.ALLOCATING:
            outside = self._outside_gpu_users()
            if outside:
                return replace(job, wait_reason=f"{job.wait_reason}; {outside}")
        return job

    def _outside_gpu_users(self) -> str:
        """Whose processes outside tsd keep GPUs busy, from the last NVML picture."""
        from tsd.gpupool import busy_reasons

        gpus = self.gpu_cache[1]
        if not gpus:
            return ""
        held, tsd_pids = self._gpu_holders()
        reasons = busy_reasons(
            gpus, held, self.free_threshold(), tsd_pids, self.config.gpus.visible
        )
        return "; ".join(
            f"GPU {i} {why}" for i, why in sorted(reasons.items()) if why.startswith("used by")
        )

    def _listing_order(self) -> Iterator[Job]:
        # task-spooler lists running first, then queued in queue order, then finished.
        yield from sorted(self.running.values(), key=lambda j: j.id)
        for job_id in self.pending:
            yield self.jobs[job_id]
        yield from sorted(
            (j for j in self.jobs.values() if j.state.done), key=lambda j: (j.end_time or 0, j.id)
        )

    # -- queue edits

    def remove(self, peer: Peer, job_id: int | None) -> dict[str, Any]:
        """ts -r: drop a job that is not running (queued, allocating or finished)."""
        job = self._pick(peer, job_id, "added")
        if job.state is JobState.RUNNING:
            raise WrongState(f"job {job.id} is running: use ts -k {job.id} to end it")
        self.store.delete([job.id])
        if job.state.done:
            self.finished_by_user[job.uid].remove(job.id)
        if job.state.pending:
            self._unqueue_index(job)
            self._room_changed()
        del self.jobs[job.id]
        self._notify_end(job.id)
        self.schedule()
        return {"id": job.id}

    def urgent(self, peer: Peer, job_id: int | None) -> dict[str, Any]:
        """ts -u: move a pending job to the front of the queue."""
        job = self._pick(peer, job_id, "added")
        if not job.state.pending:
            raise WrongState(f"job {job.id} is {job.state.value}, not queued")
        job = replace(job, order=self._next_order(front=True))
        self.store.save(job)
        self.jobs[job.id] = job
        self.pending.remove(job.id)
        self.pending.insert(0, job.id)
        self.schedule()
        return {"id": job.id}

    def swap(self, peer: Peer, a: int, b: int) -> dict[str, Any]:
        """ts -U a-b: swap two pending jobs' places."""
        ja, jb = self._pick(peer, a, "added"), self._pick(peer, b, "added")
        for j in (ja, jb):
            if not j.state.pending:
                raise WrongState(f"job {j.id} is {j.state.value}, not queued")
        ja, jb = replace(ja, order=jb.order), replace(jb, order=ja.order)
        self.store.save(ja, jb)
        self.jobs[ja.id], self.jobs[jb.id] = ja, jb
        ia, ib = self.pending.index(ja.id), self.pending.index(jb.id)
        self.pending[ia], self.pending[ib] = jb.id, ja.id
        self.schedule()
        return {}

    def clear(self, peer: Peer) -> dict[str, Any]:
        """ts -C: forget the caller's own finished jobs (everyone's is not offered)."""
        gone = [j.id for j in self.jobs.values() if j.state.done and j.uid == peer.uid]
        self.store.delete(gone)
        for job_id in gone:
            del self.jobs[job_id]
        self.finished_by_user[peer.uid].clear()
        return {"count": len(gone)}

    def slots(self, peer: Peer, value: int | None) -> dict[str, Any]:
        """ts -S [N]."""
        if value is not None:
            if self.settings.system:
                auth.check_admin(peer, "setting the slot count (-S)")
            self.store.set_setting("slots", str(value))
            self.slots_override = value
            self.schedule()
        return {"slots": self.total_slots()}

    def env(self, peer: Peer, req: protocol.Env) -> dict[str, Any]:
        """--getenv/--setenv/--unsetenv: variables added to the caller's future jobs."""
        key = "env:" + req.name
        if req.action == "get":
            return {"value": self.store.user_settings(peer.uid).get(key)}
        self.store.set_user_setting(peer.uid, key, req.value if req.action == "set" else None)
        return {"value": req.value if req.action == "set" else None}

    def logdir(self, peer: Peer, path: str | None) -> dict[str, Any]:
        """--get_logdir/--set_logdir. The path is only ever used by the user's own job."""
        if path is not None:
            self.store.set_user_setting(peer.uid, "logdir", path)
        return {"path": self.store.user_settings(peer.uid).get("logdir") or _default_logdir()}

    def gpu_free_perc(self, peer: Peer, value: float | None) -> dict[str, Any]:
        """--get_gpu_free_perc/--set_gpu_free_perc (admin-only to set on the system service)."""
        if value is not None:
            if self.settings.system:
                auth.check_admin(peer, "setting the GPU free-memory threshold")
            self.store.set_setting("gpu_free_perc", str(value))
            self.free_perc_override = value
            self.gpu_cache = (0.0, None, "")
            self.schedule()
        return {"value": self.free_threshold()}

    def free_threshold(self) -> float:
        """The free-memory percentage above which a GPU counts as free."""
        if self.free_perc_override is not None:
            return self.free_perc_override
        return self.config.gpus.free_memory_percent

    # -- GPUs

    def _snapshot(self, max_age: float = 0.0) -> tuple[tuple[Gpu, ...] | None, str]:
        taken, gpus, problem = self.gpu_cache
        if time.monotonic() - taken <= max_age and (gpus is not None or problem):
            return gpus, problem
        from tsd.gpu import GpuUnavailable

        before = self.gpu_cache[2]
        try:
            gpus, problem = self.gpus.snapshot(), ""
        except GpuUnavailable as exc:
            # The bare reason: the scheduler's wait reason and `ts -g` add their own prefix.
            gpus, problem = None, str(exc) or "NVML failed"
            # Once per distinct reason, not once per poll.
            if problem != before:
                log.warning("GPUs unavailable: %s", problem)
        else:
            if before:
                log.info("GPUs available again: NVML reports %d GPUs", len(gpus))
        self.gpu_cache = (time.monotonic(), gpus, problem)
        return gpus, problem

    def _pool(self, gpus: tuple[Gpu, ...]) -> tuple[int, ...]:
        visible = self.config.gpus.visible
        return tuple(g.index for g in gpus if visible is None or g.index in visible)

    def _gpu_holders(self) -> tuple[dict[int, int], set[int]]:
        """GPU index -> the running tsd job holding it, and the pids of tsd's jobs."""
        held = {i: j.id for j in self.running.values() for i in j.gpu_ids}
        pids = {p for j in self.running.values() for p in (j.pid, j.supervisor_pid) if p}
        return held, pids

    def _known_pool(self) -> tuple[int, ...] | None:
        """The GPUs tsd may hand out (visible and present), None while NVML is down."""
        gpus, _ = self._snapshot(max_age=1.0)
        return None if gpus is None else self._pool(gpus)

    def _free_gpus(self) -> tuple[tuple[int, ...] | None, str, tuple[int, ...] | None]:
        from tsd.gpupool import free_gpus

        gpus, problem = self._snapshot(max_age=0.2)
        if gpus is None:
            return None, problem, None
        held, tsd_pids = self._gpu_holders()
        free = free_gpus(gpus, held, self.free_threshold(), self.config.gpus.visible, tsd_pids)
        return free, "", self._pool(gpus)

    def gpu_status(self) -> dict[str, Any]:
        """ts -g: the GPUs, why busy ones are busy, and every running GPU job (like ts -A)."""
        from tsd.gpupool import busy_reasons

        gpus, problem = self._snapshot()
        held, tsd_pids = self._gpu_holders()
        reasons = (
            busy_reasons(gpus, held, self.free_threshold(), tsd_pids, self.config.gpus.visible)
            if gpus
            else {}
        )
        return {
            "gpus": [
                {
                    "index": g.index,
                    "uuid": g.uuid,
                    "name": g.name,
                    "memory_total": g.memory_total,
                    "memory_used": g.memory_used,
                    "free_percent": g.free_percent,
                    "busy": reasons.get(g.index),
                    "processes": [
                        {"pid": p.pid, "user": p.user, "used_memory": p.used_memory}
                        for p in g.processes
                    ],
                }
                for g in gpus or ()
            ],
            "jobs": [
                protocol.job_to_wire(j)
                for j in sorted(self.running.values(), key=lambda j: j.id)
                if j.gpu_ids
            ],
            "problem": problem,
        }

    # ------------------------------------------------------------ scheduling

    def schedule(self) -> None:
        """Start whatever may start now. Cheap when nothing can: decide() stops early."""
        if not self.pending:
            self._stop_gpu_poll()
            return
        total = self.total_slots()
        if self.pending_gpu_jobs:
            free, problem, pool = self._free_gpus()
        else:
            free, problem, pool = (), "", None
        res = Resources(
            total_slots=total,
            limits=self.limits,
            free_gpus=free,
            gpu_problem=problem,
            visible_gpus=pool,
        )
        decision = decide(
            (self.jobs[i] for i in self.pending),
            list(self.running.values()),
            self._dep_outcome,
            res,
        )
        self.unvisited_reason = decision.unvisited_reason
        allocating = set(decision.allocating)
        changed: list[Job] = []
        for job_id in allocating | decision.reasons.keys():
            job = self.jobs.get(job_id)
            if job is None or not job.state.pending:
                continue
            # A job read again that no longer waits for GPUs (it now waits for a slot
            # or a dependency) is back to plain queued.
            state = JobState.ALLOCATING if job_id in allocating else JobState.QUEUED
            updated = replace(
                job, state=state, wait_reason=decision.reasons.get(job_id, job.wait_reason)
            )
            if updated.state is not job.state:
                changed.append(updated)
            self.jobs[job_id] = updated
        if changed:
            self.store.save(*changed)
        for job_id in decision.skip:
            self._skip(job_id, decision.reasons.get(job_id, "a dependency failed"))
        for start in decision.start:
            self._start(self.jobs[start.job_id], start.gpu_ids)
        if decision.allocating:
            self._arm_gpu_poll()
        else:
            self._stop_gpu_poll()

    def _arm_gpu_poll(self) -> None:
        # NVML is polled only while some job waits for a GPU: an idle daemon sleeps.
        if self.gpu_timer is None and self.loop is not None:
            self.gpu_timer = self.loop.call_later(self.config.gpus.poll_seconds, self._gpu_tick)

    def _stop_gpu_poll(self) -> None:
        if self.gpu_timer is not None:
            self.gpu_timer.cancel()
            self.gpu_timer = None

    def _gpu_tick(self) -> None:
        self.gpu_timer = None
        # Expire the snapshot, but keep its problem so a failure is not logged at every poll.
        self.gpu_cache = (0.0, None, self.gpu_cache[2])
        self.schedule()

    def _dep_outcome(self, job_id: int) -> DepOutcome:
        job = self.jobs.get(job_id)
        if job is None:
            return DepOutcome.GONE
        if job.state is JobState.SKIPPED:
            return DepOutcome.SKIPPED
        if job.state is JobState.FINISHED:
            assert job.exit is not None
            return DepOutcome.SUCCEEDED if job.exit.success else DepOutcome.FAILED
        return DepOutcome.PENDING

    def _skip(self, job_id: int, reason: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or not job.state.pending:
            return
        now = time.time()
        job = replace(
            job,
            state=JobState.SKIPPED,
            end_time=now,
            exit=ExitInfo(note=reason),
            wait_reason=reason,
        )
        log.info("job %d skipped: %s", job.id, reason)
        self._end_pending(job)

    def _end_pending(self, job: Job) -> None:
        """A pending job that ends without running (skipped, or no scope): record it."""
        self.store.save(job)
        self._unqueue_index(job)
        self.jobs[job.id] = job
        self._finished(job)
        self._room_changed()
        self._notify_end(job.id)
        self._cascade(job)

    def _cascade(self, ended: Job) -> None:
        """A failed or skipped job skips every -W job that waits on it, transitively."""
        if ended.state is JobState.FINISHED and ended.exit is not None and ended.exit.success:
            return
        for dep_id in sorted(self.dependents.get(ended.id, ())):
            dep = self.jobs.get(dep_id)
            if dep is not None and dep.state.pending and dep.spec.depend_mode is DependMode.SUCCESS:
                self._skip(dep_id, f"job {ended.id} did not succeed")

    def _start(self, job: Job, gpu_ids: tuple[int, ...]) -> None:
        env = dict(self.store.env_of(job.id))
        settings = self.store.user_settings(job.uid)
        for key, value in settings.items():
            if key.startswith("env:"):
                env[key[4:]] = value
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["TS_JOBID"] = str(job.id)
        uuids: tuple[str, ...] = ()
        if gpu_ids:
            by_index = {g.index: g.uuid for g in self.gpu_cache[1] or ()}
            uuids = tuple(by_index.get(i, "") for i in gpu_ids)
        try:
            pw = pwd.getpwuid(job.uid)
            gid = pw.pw_gid
        except KeyError:
            self._finish_now(job, f"user {job.uid} no longer exists")
            return
        log_dir = settings.get("logdir") or env.get("TMPDIR") or "/tmp"
        on_finish = env.get("TS_ONFINISH") or (
            None if self.settings.system else self.settings.on_finish
        )
        plan = launch.LaunchPlan(
            job_id=job.id,
            uid=job.uid,
            gid=gid,
            user=pw.pw_name,
            command=job.spec.command,
            cwd=job.spec.cwd,
            env=env,
            umask=job.spec.umask,
            log_dir=log_dir,
            exits_dir=str(self.exits_dir),
            store_output=job.spec.store_output,
            output_name=job.spec.output_name,
            gzip=job.spec.gzip,
            stderr_apart=job.spec.stderr_apart,
            timeout=job.spec.timeout,
            grace=self.config.kill_grace_seconds,
            on_finish=on_finish,
            mail_to=(env.get("TS_MAILTO") or pw.pw_name) if job.spec.mail else None,
            drop_privileges=os.getuid() == 0,
        )
        devices: list[str] | None = None  # no NVIDIA device nodes here: no fence
        if self.settings.system and any(Path("/dev").glob("nvidia[0-9]*")):
            # Every job is fenced off the GPUs it was not given, a CPU job off
            # all of them: CUDA_VISIBLE_DEVICES alone is only a convention.
            from tsd.gpu import GpuUnavailable

            try:
                devices = self.gpus.device_nodes(gpu_ids) if gpu_ids else []
            except GpuUnavailable as exc:
                # NVML failed just now: the job stays queued and waits for it like any other.
                self.gpu_cache = (time.monotonic(), None, str(exc))
                log.warning("job %d not started, GPUs unavailable: %s", job.id, exc)
                return
        launched = launch.spawn(plan)
        unit = None
        if self.settings.system:
            try:
                unit = self.scopes.start(
                    job.id,
                    job.uid,
                    [launched.supervisor_pid],
                    self.config.job,
                    devices,
                    f"tsd job {job.id} of {job.user}: {job.spec.command_line[:100]}",
                )
            except Exception as exc:  # the scope is the job's fence: no scope, no job
                launched.abort()
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(launched.supervisor_pid, 0)
                launch.exit_file(str(self.exits_dir), job.id).unlink(missing_ok=True)
                os.close(launched.report_fd)
                log.error("job %d: %s", job.id, exc)
                self._finish_now(job, f"could not start its scope: {exc}")
                return
        now = time.time()
        job = replace(
            job,
            state=JobState.RUNNING,
            start_time=now,
            supervisor_pid=launched.supervisor_pid,
            supervisor_start=launched.supervisor_start,
            gpu_ids=gpu_ids,
            gpu_uuids=uuids,
            unit=unit,
            wait_reason="",
        )
        self.store.save(job)  # durable before the job may run
        launched.go()
        self._unqueue_index(job)
        self.jobs[job.id] = job
        self.running[job.id] = job
        self.last_run[job.uid] = max(self.last_run.get(job.uid, 0), job.id)
        self._room_changed()
        self._watch(job, launched.report_fd)
        log.info("job %d started (supervisor %d)", job.id, launched.supervisor_pid)

    def _finish_now(self, job: Job, note: str) -> None:
        job = replace(
            job,
            state=JobState.FINISHED,
            end_time=time.time(),
            exit=ExitInfo(code=None, lost=True, note=note),
        )
        self._end_pending(job)

    # ------------------------------------------------------------ job ends

    def _watch(self, job: Job, report_fd: int | None) -> None:
        assert self.loop is not None
        assert job.supervisor_pid is not None
        try:
            pidfd = os.pidfd_open(job.supervisor_pid)
        except ProcessLookupError:
            self.loop.call_soon(self._job_ended, job.id)
            if report_fd is not None:
                os.close(report_fd)
            return
        self.loop.add_reader(pidfd, self._job_ended, job.id)
        if report_fd is not None:
            self.loop.add_reader(report_fd, self._read_report, job.id, report_fd)
        self.watches[job.id] = (pidfd, report_fd if report_fd is not None else -1)

    def _read_report(self, job_id: int, fd: int) -> None:
        assert self.loop is not None
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        job = self.jobs.get(job_id)
        if job is not None and data:
            fields = launch.parse_report(data.decode(errors="replace"))
            pid = fields.get("pid")
            out = fields.get("out")
            updated = replace(
                job,
                pid=int(pid) if pid and pid.isdigit() else job.pid,
                output_path=(None if out == "-" else out) if out else job.output_path,
            )
            if updated != job and job.state is JobState.RUNNING:
                self.store.save(updated)
                self.jobs[job_id] = updated
                self.running[job_id] = updated
                if out:
                    self._notify_start(job_id)
        if not data or (job is not None and self.jobs[job_id].output_path is not None):
            self.loop.remove_reader(fd)
            os.close(fd)
            pidfd, _ = self.watches.get(job_id, (-1, -1))
            if pidfd >= 0:
                self.watches[job_id] = (pidfd, -1)

    def _job_ended(self, job_id: int) -> None:
        """The job's supervisor is gone: record the status it left, or that it was lost."""
        watch = self.watches.pop(job_id, None)
        if watch is not None and self.loop is not None:
            pidfd, report_fd = watch
            self.loop.remove_reader(pidfd)
            os.close(pidfd)
            if report_fd >= 0:
                self._read_report(job_id, report_fd)
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(report_fd)
                with contextlib.suppress(OSError):
                    os.close(report_fd)
        job = self.running.pop(job_id, None)
        if job is None:
            return
        if job.supervisor_pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(job.supervisor_pid, os.WNOHANG)
        timer = self.kill_timers.pop(job_id, None)
        if timer is not None:
            timer.cancel()
        path = launch.exit_file(str(self.exits_dir), job_id)
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            status = None
        if job.unit and self.settings.system:
            with contextlib.suppress(Exception):
                self.scopes.stop(job.unit)
        if status is not None and status.get("aborted"):
            # It never ran (the daemon died between recording and releasing it): queue again.
            job = replace(
                job, state=JobState.QUEUED, start_time=None, supervisor_pid=None,
                supervisor_start=None, gpu_ids=(), gpu_uuids=(), unit=None, pid=None,
            )
            self.store.save(job)
            self.jobs[job_id] = job
            self._enqueue_index(job)
            self.pending.sort(key=lambda i: self.jobs[i].order)
            path.unlink(missing_ok=True)
            log.info("job %d: never started, queued again", job_id)
            self.schedule()
            return
        if status is None:
            exit_info = ExitInfo(lost=True, note="its supervisor vanished (killed, or host reboot)")
        else:
            exit_info = ExitInfo(
                code=status.get("code"),
                signal=status.get("signal"),
                timed_out=bool(status.get("timed_out")),
                cpu_seconds=status.get("cpu_seconds"),
                max_rss=status.get("max_rss"),
                note=str(status.get("note") or ("timed out" if status.get("timed_out") else "")),
            )
        out = status.get("output") if status else None
        job = replace(
            job,
            state=JobState.FINISHED,
            end_time=float(status["end"]) if status and status.get("end") else time.time(),
            exit=exit_info,
            output_path=job.output_path or (None if out in (None, "-") else out),
        )
        self.store.save(job)
        path.unlink(missing_ok=True)
        self.jobs[job_id] = job
        log.info("job %d finished: %s", job_id, exit_info)
        self._finished(job)
        self._notify_start(job_id)
        self._notify_end(job_id)
        self._cascade(job)
        self.schedule()

    def _finished(self, job: Job) -> None:
        """Account a job that just became finished or skipped; drop the oldest beyond the cap."""
        done = self.finished_by_user[job.uid]
        done.append(job.id)
        drop: list[int] = []
        while len(done) > self.config.max_finished:
            drop.append(done.popleft())
        drop = [i for i in drop if i in self.jobs]
        if drop:
            self.store.delete(drop)
            for job_id in drop:
                del self.jobs[job_id]

    def kill(self, job: Job) -> None:
        """End a running job's whole tree: SIGTERM now, SIGKILL after the grace period."""
        if job.state is not JobState.RUNNING:
            raise WrongState(f"job {job.id} is {job.state.value}, not running")
        self._signal_job(job, signal.SIGTERM)
        if job.id not in self.kill_timers and self.loop is not None:
            delay = self.config.kill_grace_seconds + KILL_BACKSTOP
            self.kill_timers[job.id] = self.loop.call_later(
                delay, self._signal_job, job, signal.SIGKILL
            )

    def _signal_job(self, job: Job, sig: int) -> None:
        if job.id not in self.running:
            return
        if job.unit and self.settings.system:
            # KillUnit reaches every process of the scope; the supervisor handles SIGTERM
            # by ending the tree itself and recording the status.
            with contextlib.suppress(Exception):
                if self.scopes.kill(job.unit, sig):
                    return
        if job.supervisor_pid and self._supervisor_alive(job):
            with contextlib.suppress(OSError):
                os.kill(job.supervisor_pid, sig)

    # ------------------------------------------------------------ waiting

    def _notify_end(self, job_id: int) -> None:
        for fut in self.waiters.pop(job_id, []):
            if not fut.done():
                fut.set_result(None)
        self._notify_start(job_id)

    def _notify_start(self, job_id: int) -> None:
        for fut in self.start_waiters.pop(job_id, []):
            if not fut.done():
                fut.set_result(None)

    def _room_changed(self) -> None:
        if self.room is not None and self.loop is not None:
            self.loop.create_task(self._wake_room())

    async def _wake_room(self) -> None:
        assert self.room is not None
        async with self.room:
            self.room.notify_all()

    async def wait(self, peer: Peer, req: protocol.Wait, send: SendEvent) -> dict[str, Any]:
        """ts -w/-t/-c/-f: stream until the job is done; its record comes last."""
        job = self._pick(peer, req.id, req.default)
        assert self.loop is not None
        if req.notify_start:
            while job.state.pending or (
                job.state is JobState.RUNNING and not self._has_output(job)
            ):
                fut: asyncio.Future[None] = self.loop.create_future()
                self.start_waiters[job.id].append(fut)
                await fut
                job = self.jobs.get(job.id, job)
                if job.id not in self.jobs:
                    raise NoSuchJob(f"job {job.id} was removed")
            await send({"event": "started", "job": protocol.job_to_wire(job)})
        while not job.state.done:
            fut = self.loop.create_future()
            self.waiters[job.id].append(fut)
            await fut
            if job.id not in self.jobs:
                raise NoSuchJob(f"job {job.id} was removed")
            job = self.jobs[job.id]
        return {"job": protocol.job_to_wire(job)}

    def _has_output(self, job: Job) -> bool:
        return job.output_path is not None or not job.spec.store_output or job.pid is not None

    # ------------------------------------------------------------ lifecycle

    def reload(self) -> None:
        """SIGHUP: apply the config file, or keep the old one and say why."""
        if not self.settings.config_path:
            return
        try:
            config = load_config(self.settings.config_path)
        except ConfigError as exc:
            log.error("config not reloaded, keeping the previous one: %s", exc)
            return
        self.config = config
        self.limits_cache.clear()
        self.store.set_setting("slots", None)
        self.slots_override = None
        self.gpu_cache = (0.0, None, "")
        log.info("config reloaded from %s", self.settings.config_path)
        self.schedule()

    def save_list(self) -> None:
        """TS_SAVELIST: export the job list as text when the daemon stops."""
        if not self.settings.save_list:
            return
        from tsd.render import list_text

        used = sum(j.spec.slots for j in self.running.values())
        text = list_text(list(self._listing_order()), self.total_slots(), used, False)
        with contextlib.suppress(OSError):
            Path(self.settings.save_list).write_text(text)

    async def run(self, sock: socket.socket) -> None:
        """Serve until -K, SIGTERM or SIGINT. Running jobs are left running."""
        self.loop = asyncio.get_running_loop()
        self.room = asyncio.Condition()
        self.recover()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        self.server = Server(sock, self.handle, self.settings.max_connections)
        await self.server.start()
        sd_notify("READY=1\nSTATUS=serving")
        mode = "system" if self.settings.system else "user"
        log.info("tsd %s serving (%s mode)", __version__, mode)
        self.schedule()
        await self.stopping.wait()
        sd_notify("STOPPING=1")
        self.save_list()
        await self.server.close()
        if not self.settings.system and self.settings.socket_path:
            with contextlib.suppress(OSError):
                os.unlink(self.settings.socket_path)
        self.store.close()
        log.info("tsd stopped; %d running jobs keep running", len(self.running))

    def _on_hup(self) -> None:
        sd_notify("RELOADING=1")
        self.reload()
        sd_notify("READY=1")


def _default_logdir() -> str:
    return os.environ.get("TMPDIR") or "/tmp"


def sd_notify(message: str) -> None:
    """Tell systemd about our state (Type=notify); a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


def _lock(state_dir: Path) -> int | None:
    """One daemon per state dir; None when another holds it."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def personal_state_dir(env: dict[str, str]) -> Path:
    """$XDG_STATE_HOME/tsd, else ~/.local/state/tsd."""
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "tsd"


def _setup_logging(system: bool, state_dir: Path) -> None:
    if system:
        # journald adds time and unit; keep lines short.
        logging.basicConfig(
            level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr
        )
    else:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(message)s",
            filename=str(state_dir / "tsd.log"),
        )


def run_daemon(system: bool, config_path: str | None, socket_path: str | None) -> int:
    """Start a daemon in the foreground; returns its exit status."""
    env = dict(os.environ)
    if system:
        if os.getuid() != 0:
            print("tsd: --system must run as root", file=sys.stderr)
            return 1
        path = config_path or SYSTEM_CONFIG
        try:
            config = load_config(path) if os.path.exists(path) or config_path else Config()
        except ConfigError as exc:
            print(f"tsd: {exc}", file=sys.stderr)
            return 1
        settings = Settings(
            system=True,
            state_dir=Path(os.environ.get("STATE_DIRECTORY", SYSTEM_STATE).split(":")[0]),
            socket_path=socket_path or "/run/tsd/tsd.sock",
            config_path=path,
        )
    else:
        from tsd.client import personal_socket_path

        try:
            config = load_config(config_path) if config_path else Config()
        except ConfigError as exc:
            print(f"tsd: {exc}", file=sys.stderr)
            return 1
        settings = Settings(
            system=False,
            state_dir=personal_state_dir(env),
            socket_path=socket_path or personal_socket_path(env),
            config_path=config_path,
            max_connections=int(env.get("TS_MAXCONN", "1000") or 1000),
            save_list=env.get("TS_SAVELIST") or None,
            on_finish=env.get("TS_ONFINISH") or None,
        )
    lock = _lock(settings.state_dir)
    if lock is None:
        print("tsd: another daemon already runs on this state", file=sys.stderr)
        return 0
    _setup_logging(system, settings.state_dir)
    if not system and not config_path:
        config = personal_config(env)  # after logging is set up: it may complain
    (settings.state_dir / "tsd.pid").write_text(f"{os.getpid()}\n")
    sock = inherited_socket()
    if sock is None:
        assert settings.socket_path is not None
        try:
            if system:
                sock = bind_system(settings.socket_path, auth.SUBMIT_GROUP)
            else:
                sock = bind_personal(settings.socket_path)
        except FileExistsError as exc:
            print(f"tsd: {exc}", file=sys.stderr)
            return 0
        except OSError as exc:
            log.error("cannot listen on %s: %s", settings.socket_path, exc)
            print(f"tsd: cannot listen on {settings.socket_path}: {exc}", file=sys.stderr)
            return 1
    daemon = Daemon(settings, config)
    asyncio.run(daemon.run(sock))
    return 0


def check_config(path: str) -> int:
    """tsd --check-config FILE: validate for admins; one line either way."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"tsd: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: OK ({config.slots} slots, {len(config.users)} user and "
          f"{len(config.groups)} group overrides)")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of `tsd`."""
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--system", "mode", flag_value="system", help="Run as the root service.")
    @click.option("--user", "mode", flag_value="user", default=True, help="Run a personal daemon.")
    @click.option("--config", "config_path", metavar="PATH", help="Config file to use.")
    @click.option("--socket", "socket_path", metavar="PATH", help="Socket to listen on.")
    @click.option("--check-config", metavar="FILE", help="Validate a config file and exit.")
    @click.version_option(__version__, "-V", "--version", prog_name="tsd")
    def cli(mode: str, config_path: str | None, socket_path: str | None,
            check_config: str | None) -> None:
        """tsd: the task spooler daemon."""
        if check_config:
            sys.exit(globals()["check_config"](check_config))
        sys.exit(run_daemon(mode == "system", config_path, socket_path))

    cli.main(args=argv, prog_name="tsd")


if __name__ == "__main__":
    main()
