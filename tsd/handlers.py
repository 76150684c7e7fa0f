"""Request handlers: one function per request type, each answering a typed response.

A handler checks who may do what (tsd.auth), acts through the daemon's parts
and returns one of tsd.protocol's response dataclasses; streams (list, wait)
send events first. Handlers hold no state of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol, TypeVar

from tsd import auth, framing, jobcontrols, protocol, userdb
from tsd.codec import piece
from tsd.engine import Cluster, Scheduling
from tsd.errors import (
    BadRequest,
    ClientGone,
    NeverFits,
    NoSuchJob,
    OverQuota,
    QueueFull,
    StorageFull,
    WrongState,
)
from tsd.gpumonitor import GpuMonitor
from tsd.gpuusage import unmanaged
from tsd.gpuwatch import GpuWatch
from tsd.jobtable import JobTable
from tsd.ledger import Ledger
from tsd.model import Job, JobSpec, JobState, Peer, UnmanagedUse, UserLimits
from tsd.policy import Policy
from tsd.render import printable
from tsd.scheduler import check_fits
from tsd.server import caller_still_there
from tsd.waiters import Waiters

log = logging.getLogger("tsd")
# Callers' names and groups, asked of the databases once a second at most (tsd.userdb):
# a change (a user added to group tsd, or removed) counts from the next second on.
_CALLERS = userdb.UserDb()

SendEvent = Callable[[protocol.Event], Awaitable[None]]
# ts -n jobs waiting with their submitter's stdout and stderr held open, per user: each
# holds two of the daemon's descriptors until it starts.
MAX_TERMINALS_PER_USER = 64
# A job's supervisor tells its pid and output file a few ms after the start (launch.
# TELL_AFTER; a job sent ahead, once its turn comes: tsd.ahead). A record asked for
# meanwhile waits for that, at most this long, so that `ts -p` and `ts -o` right
# after a start find them.
START_TOLD_WAIT = 1.0
R = TypeVar("R", bound=protocol.Response | protocol.Event)


class Killer(Protocol):
    """The runner as handlers use it (tsd.runner.Runner)."""

    def kill(self, job: Job) -> None: ...

    def terminals_held(self, uid: int) -> int: ...

    def hold_terminal(self, job: Job, fds: tuple[int, int]) -> None: ...

    def sweep_terminals(self) -> None: ...


class UserSettings(Protocol):
    """Per-user settings in the store (tsd.store.Store)."""

    def user_settings(self, uid: int) -> dict[str, str]: ...

    def set_user_setting(self, uid: int, key: str, value: str | None) -> None: ...


@dataclass
class Parts:
    """The daemon's parts a request may touch."""

    system: bool  # the root service (admin checks apply), not a personal daemon
    my_uid: int
    table: JobTable
    policy: Policy
    gpus: GpuMonitor
    dispatcher: Scheduling  # tsd.dispatch.Dispatcher, or the Slurm engine
    runner: Killer
    waiters: Waiters
    settings: UserSettings
    stop: Callable[[], None]  # stop serving, once the current answer is on its way
    cluster: Cluster | None = None  # cluster.engine: slurm (tsd.slurm.SlurmEngine)
    gpu_watch: GpuWatch | None = None  # the jobs' GPU memory and use (None: not shown)
    ledger: Ledger | None = None  # usage and the history behind ts --stats


def _with_gpu_use(p: Parts, job: Job) -> Job:
    """The job with its GPU memory peak and current GPU use, where known."""
    return job if p.gpu_watch is None else p.gpu_watch.annotate(job)


async def handle(
    p: Parts, creds: tuple[int, int, int], req: protocol.Request, send: SendEvent
) -> protocol.Response:
    """Serve one request from the caller with these SO_PEERCRED credentials.

    Every job record in the answer and in its events leaves through
    `auth.visible_to` here, the one place that decides what a caller may see.
    """
    peer = auth.make_peer(*creds, is_admin=p.policy.config.is_admin, users=_CALLERS)
    auth.check_may_connect(peer, p.system, p.my_uid)

    async def send_visible(event: protocol.Event) -> None:
        await send(_visible(peer, event))

    return _visible(peer, await _serve(p, peer, req, send_visible))


def _visible(peer: Peer, answer: R) -> R:
    """`answer` with every Job in it (alone or in a tuple) as `peer` may see it."""
    changes: dict[str, Any] = {}
    for f in fields(answer):
        value = getattr(answer, f.name)
        if isinstance(value, Job):
            changes[f.name] = auth.visible_to(peer, value)
        elif isinstance(value, tuple) and any(isinstance(v, Job) for v in value):
            changes[f.name] = tuple(
                auth.visible_to(peer, v) if isinstance(v, Job) else v for v in value
            )
    return replace(answer, **changes) if changes else answer


async def _serve(
    p: Parts, peer: Peer, req: protocol.Request, send: SendEvent
) -> protocol.Response:
    match req:
        case protocol.Submit():
            return await submit(p, peer, req, send)
        case protocol.ListJobs():
            return await list_jobs(p, peer, req, send)
        case protocol.GetJob():
            return await get_job(p, peer, req)
        case protocol.Remove():
            return await remove(p, peer, req)
        case protocol.Urgent():
            return urgent(p, peer, req)
        case protocol.Swap():
            return swap(p, peer, req)
        case protocol.Kill():
            return await kill(p, peer, req)
        case protocol.KillAll():
            return await kill_all(p, peer)
        case protocol.Clear():
            return protocol.Count(p.table.clear(peer.uid))
        case protocol.Shutdown():
            return shutdown(p, peer)
        case protocol.Slots():
            return slots(p, peer, req)
        case protocol.CountRunning():
            return protocol.Count(len(_own_running(p, peer)))
        case protocol.Wait():
            return await wait(p, peer, req, send)
        case protocol.Env():
            return env(p, peer, req)
        case protocol.LogDir():
            return logdir(p, peer, req)
        case protocol.GpuFreePerc():
            return gpu_free_perc(p, peer, req)
        case protocol.GpuStatus():
            return await gpu_status(p)
        case protocol.Stats():
            return stats(p, peer, req)
        case protocol.Hold():
            return await hold(p, peer, req)
    raise BadRequest("bad request: unsupported operation")


async def submit(
    p: Parts, peer: Peer, req: protocol.Submit, send: SendEvent
) -> protocol.JobId | protocol.JobRecord:
    """Validate, wait for room if the queue is full, make durable, then answer.

    With `wait` (ts -nf) the answer is the job's final record, after a `Queued` event.
    An --array is stored whole, in one transaction, and answered with every id.
    """
    # Checked already by the protocol (tsd.jobcontrols.check_submit).
    array = None if req.array is None else jobcontrols.parse_array(req.array)
    count = 1 if array is None else len(array[0])
    spec = req.spec
    if (spec.options.array_job, spec.options.array_task, spec.options.array_throttle) != (
        None, None, None
    ):
        spec = replace(spec, options=replace(
            spec.options, array_job=None, array_task=None, array_throttle=None))
    depends = list(spec.depends)
    last = p.table.last_added.get(peer.uid)
    if req.depend_last and last:
        depends.append(last)
    for dep in depends:
        other = p.table.get(dep)
        if other is None:
            raise NoSuchJob(f"job {dep} does not exist (cannot depend on it)")
        auth.check_owner(peer, other)
    unique = tuple(dict.fromkeys(depends))
    if unique != spec.depends:
        spec = replace(spec, depends=unique)
    limits = p.policy.limits(peer.uid)
    pool = None
    if p.cluster is not None:
        # Slots and GPUs are Slurm's to grant: only what Slurm cannot do is refused here.
        p.cluster.check(spec, req.terminal is not None)
        _local_only(p, *(name for name, given in (
            ("--retry", spec.retry), ("--priority", spec.priority)) if given))  # fmt: skip
    elif spec.gpus_wanted:
        await p.gpus.snapshot(max_age=1.0)
        pool = p.gpus.pool()
        no_nvml = p.gpus.absent()
        if pool is None and no_nvml:
            # No driver: no GPU will ever come, so refuse now rather than queue forever.
            n = spec.gpus_wanted
            raise NeverFits(
                f"job needs {n} GPU{'s' if n > 1 else ''} but this server has no GPUs ({no_nvml})"
            )
    if p.cluster is None:
        rooms = p.gpus.rooms() if spec.gpu_mem is not None else None
        totals = None if rooms is None else {i: r.total for i, r in rooms.items()}
        check_fits(
            spec, limits, p.policy.total_slots(), None if pool is None else len(pool), pool,
            totals,
        )
    size = spec.stored_bytes  # computed over the whole environment: once
    _check_bytes(p, peer, size, limits, count=count)
    if limits.max_queued is not None:
        if count > limits.max_queued:
            raise OverQuota(  # never fits: exit 1, not -B's 2
                f"the array has {count} elements but at most {limits.max_queued} of your "
                "jobs may wait (max_queued)"
            )
        told = False
        while p.table.pending_count[peer.uid] + count > limits.max_queued:
            if not req.block:
                raise QueueFull(f"your queue is full ({limits.max_queued} jobs waiting)")
            if not told:
                # Once: the caller would otherwise hang without a word.
                await send(protocol.QueueFullWait(p.table.pending_count[peer.uid]))
                told = True
            await p.waiters.room_freed()
    # Again: others may have queued meanwhile.
    _check_bytes(p, peer, size, limits, count=count)
    if req.terminal is not None and p.runner.terminals_held(peer.uid) >= MAX_TERMINALS_PER_USER:
        raise QueueFull(
            f"too many of your ts -n jobs wait to write to a terminal "
            f"(at most {MAX_TERMINALS_PER_USER})"
        )
    # Commit only for a client that is still there to hear the id: one that gave up
    # (Ctrl-C, timeout) while the daemon was busy or stopped must not find its job
    # running later. Residual race, accepted: a client that hangs up after this
    # check and before the answer reaches it gets a job it was not told about, as
    # with any lost reply; `ts -l` shows it. Nothing awaits between here and the commit.
    if not caller_still_there():
        log.info("submit of %s not queued: the client hung up first", peer.user)
        raise ClientGone("the client hung up before its job was queued: nothing queued")
    if array is not None:
        specs = [
            replace(spec, options=replace(spec.options, array_task=i, array_throttle=array[1]))
            for i in array[0]
        ]
        jobs = p.table.add_many(peer.uid, peer.user, specs, held=req.hold, array=True)
        queued = _log_queued(p, f"jobs {jobs[0].id}-{jobs[-1].id} (array)", peer, spec)
        await _stored(p)
        if p.cluster is not None:
            # ONE sbatch --array; on refusal every element is gone again.
            jobs = await p.cluster.forward_array(jobs)
            p.dispatcher.schedule()
            log.info("%s", queued)
        return protocol.JobId(jobs[0].id, tuple(j.id for j in jobs))
    job = p.table.add_many(peer.uid, peer.user, [spec], held=req.hold)[0]
    queued = _log_queued(p, f"job {job.id}", peer, spec)
    # ts -nf waits for its end from now: the job starts once its start is committed,
    # before the answer (which waits for the fsync), and a quick one may be over, and
    # forgotten (-nf jobs are), before the answer is sent.
    ended = p.waiters.end_ticket(job.id) if req.wait else None
    try:
        return await _submitted(p, req, send, job, ended, queued)
    finally:
        if ended is not None:
            p.waiters.drop_ticket(job.id, ended)


async def _submitted(
    p: Parts, req: protocol.Submit, send: SendEvent, job: Job,
    ended: asyncio.Future[Job | None] | None, queued: str,
) -> protocol.JobId | protocol.JobRecord:
    """The rest of `submit` for one job, queued in memory: durable, then answered."""
    if req.terminal is not None:
        # ts -n: the job writes to the submitting ts's stdout and stderr (task-spooler's
        # behaviour); the daemon holds them, in memory only, until the job starts.
        out, err = req.terminal.take()
        p.runner.hold_terminal(job, (out, err))
    await _stored(p)
    if p.cluster is not None:
        # sbatch as the owner; on refusal the record is gone again and Slurm's reason raised.
        job = await p.cluster.forward(job)
        p.dispatcher.schedule()
        log.info("%s", queued)
    if not req.wait:
        return protocol.JobId(job.id)
    await send(protocol.Queued(job.id))
    return await _until_done(p, job, ended)


def _log_queued(p: Parts, what: str, peer: Peer, spec: JobSpec) -> str:
    """Log who queued what, for the journal, once it is on disk: with the commit that
    stores it, before any line of its start or end (a quick job may be over before the
    submit's answer), and not for a submit rolled back (full disk). Returns the line:
    forwarded to Slurm, the job is logged by the caller once Slurm took it, not here.
    Escaped: a command word may hold a newline, which must not forge a journal line."""
    line = f"{what} queued by {peer.user}: {printable(spec.command_line[:200])}"
    if p.cluster is None:
        p.table.after_commit(functools.partial(log.info, "%s", line))
    return line


async def _stored(p: Parts) -> None:
    """Until the jobs just queued are on disk (the group commit of this loop turn).

    Those that can start now are launched first, into the same group: one fsync makes
    both the jobs and their starts durable; their supervisors' go goes out at its
    COMMIT (tsd.groupcommit's after_write), the answer after the fsync (the server
    writes it in the step this returns in). Dispatched after the commit instead, a
    start would wait for a second commit, and the answer with it (it waits for
    every change made before it is written). A launch only
    stores and plans here and takes an idle supervisor (the spawner forks one only
    when none is); the job itself starts after the commit. (Slurm is nudged once it
    has the job.)
    """
    if p.cluster is None:
        p.dispatcher.schedule()  # never raises: the jobs are queued whatever a launch did
    try:
        await p.table.durable()
    except StorageFull as exc:
        p.runner.sweep_terminals()  # a ts -n job rolled back holds its terminal no more
        raise StorageFull(
            f"the server cannot store the job: no space left on {exc.where}", exc.where
        ) from None


def _settings_bytes(p: Parts, uid: int) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in p.settings.user_settings(uid).items())


def _check_bytes(
    p: Parts, peer: Peer, adding: int, limits: UserLimits, removing: int = 0, count: int = 1
) -> None:
    """Refuse to store `adding` more bytes of the caller's text (`count` times: an --array)
    over their caps."""
    if limits.max_job_bytes is not None and adding > limits.max_job_bytes:
        raise OverQuota(
            f"this job's command, environment, label and TS_ENV output take {adding} bytes, "
            f"over your limit of {limits.max_job_bytes} (max_job_bytes)"
        )
    if limits.max_stored_bytes is None:
        return
    stored = p.table.stored.of(peer.uid) + _settings_bytes(p, peer.uid) - removing
    adding *= count
    if stored + adding > limits.max_stored_bytes:
        raise OverQuota(
            f"your stored jobs and --setenv values take {stored} bytes; {adding} more would "
            f"pass your limit of {limits.max_stored_bytes} (max_stored_bytes): "
            "remove finished jobs with ts -C"
        )


async def list_jobs(
    p: Parts, peer: Peer, req: protocol.ListJobs, send: SendEvent
) -> protocol.JobList | protocol.JobRows:
    """ts -l (-A: everyone's). A long list goes out in pieces under the frame limit."""
    if req.rows:
        table = list_rows(p, peer, req.all_users)  # one snapshot, before any await
        outside = await _outside(p, req.all_users)
        last = await send_rows(table, send)
        return protocol.JobRows(
            last, p.policy.total_slots(), p.table.used_slots(), unmanaged=outside
        )
    # One snapshot first: the queue may change while a piece is being sent.
    shown = [
        _with_gpu_use(p, p.dispatcher.explain(j))
        for j in p.table.listing()
        if req.all_users or j.uid == peer.uid
    ]
    outside = await _outside(p, req.all_users)
    rows: list[Job] = []
    size = 0
    for job in shown:
        # Sized by encoded bytes: JSON writes a `"` as 2 bytes and a control character
        # as 6. A record is never over protocol.MAX_RECORD, so one alone always fits;
        # redaction (in handle) only makes a record smaller.
        record = protocol.encoded_size(protocol.job_to_wire(job)) + 1
        if rows and size + record > protocol.LIST_CHUNK:
            await send(protocol.JobsChunk(tuple(rows)))
            rows, size = [], 0
        rows.append(job)
        size += record
    return protocol.JobList(
        tuple(rows), p.policy.total_slots(), p.table.used_slots(), unmanaged=outside
    )


async def _outside(p: Parts, all_users: bool) -> tuple[UnmanagedUse, ...]:
    """ts -A: GPU use outside tsd, as of a picture at most one poll old (never NVML's
    first load from here: a CPU-only daemon keeps away from it)."""
    if not all_users or p.gpus.cached()[0] is None:
        return ()
    await p.gpus.snapshot(max_age=p.policy.config.gpus.poll_seconds)
    return p.gpus.unmanaged()


def list_rows(p: Parts, peer: Peer, all_users: bool) -> tuple[list[Job], list[str]]:
    """The jobs of the listing as `peer` may see each, and their wait reasons.

    No copy of a job is made unless it must change: wait reasons come apart (the
    dispatcher's), and only GPU jobs (their use) and other users' jobs (redacted)
    are copied.
    """
    shown: list[Job] = []
    reason = p.dispatcher.wait_reason
    watch = p.gpu_watch
    for job in p.table.listing():
        if job.uid != peer.uid and not all_users:
            continue
        if watch is not None:
            job = watch.annotate(job)
        shown.append(auth.visible_to(peer, job))
    return shown, [reason(j) for j in shown]


async def send_rows(listed: tuple[list[Job], list[str]], send: SendEvent) -> dict[str, Any]:
    """Send all but the last piece (tsd.codec.piece) of a listing as events, each under
    the frame limit; the last piece.

    Pieces are sized by their encoded bytes (one job alone always fits: its row is
    smaller than its record, which protocol.MAX_RECORD bounds); their length adapts.
    """
    jobs, reasons = listed
    start, step = 0, 2048
    while True:
        end = start + step
        chunk = piece(jobs[start:end], reasons[start:end])
        # Encoded once: to size it, and as the frame that goes out (protocol.Encoded).
        body = framing.dumps({"event": "rows", **chunk}).encode()
        if len(body) > protocol.LIST_CHUNK and step > 1:
            step //= 2
            continue
        start = end
        if start >= len(jobs):
            return chunk
        await send(protocol.RowsChunk(chunk, body))
        if len(body) < protocol.LIST_CHUNK // 3:
            step *= 2


async def get_job(p: Parts, peer: Peer, req: protocol.GetJob) -> protocol.JobRecord:
    """-i -s -p -o -a -F -q: one job's record, with why it waits. A job that runs on a
    supervisor that has not told its pid yet is answered once it has (START_TOLD_WAIT
    at most)."""
    job = p.table.pick(peer, req.id, req.default)
    if job.state is JobState.RUNNING and job.pid is None and job.supervisor_pid is not None:
        # Still untold past it (a job given back, a slow machine): the record as it is.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(p.waiters.next_start(job.id), START_TOLD_WAIT)
        job = p.table.get(job.id) or job  # forgotten meanwhile (the finished cap): as it was
    job = p.dispatcher.explain(job)
    return protocol.JobRecord(_with_gpu_use(p, job))


async def remove(p: Parts, peer: Peer, req: protocol.Remove) -> protocol.JobId:
    """ts -r: drop a job that is not running (queued, allocating or finished)."""
    job = p.table.pick(peer, req.id, "added")
    if job.state is JobState.RUNNING or job.id in p.table.launching:
        raise WrongState(f"job {job.id} is running: use ts -k {job.id} to end it")
    if p.cluster is not None and job.state.pending and job.slurm_id is not None:
        await p.cluster.cancel(job)  # first: if Slurm refuses, tsd keeps following it
        job = p.table.get(job.id) or job
        if not job.state.pending:
            raise WrongState(f"job {job.id} started meanwhile: use ts -k {job.id} to end it")
    p.table.remove(job)
    p.runner.sweep_terminals()  # a removed ts -n job no longer holds its submitter's terminal
    p.dispatcher.schedule()
    return protocol.JobId(job.id)


def _queued(p: Parts, job: Job) -> Job:
    if not p.table.is_queued(job):
        state = "starting" if job.id in p.table.launching else job.state.value
        raise WrongState(f"job {job.id} is {state}, not queued")
    return job


def _local_only(p: Parts, *controls: str) -> None:
    """Job controls are this scheduler's: under a cluster engine, refuse them in one line."""
    if controls and p.cluster is not None:
        raise BadRequest(f"{controls[0]} is not available with cluster.engine: slurm")


async def hold(p: Parts, peer: Peer, req: protocol.Hold) -> protocol.JobId:
    """ts --hold ID: a queued job (the caller's, or anyone's for admins) never starts;
    ts --release ID (`req.release`): a held job is queued again, at its place.
    Under a cluster engine the cluster holds it too (first: it may refuse)."""
    job = p.table.pick(peer, req.id, "added")
    if req.release and job.state is not JobState.HELD:
        raise WrongState(f"job {job.id} is {job.state.value}, not held")
    if not req.release and job.state is not JobState.HELD:
        _queued(p, job)
    if (job.state is JobState.HELD) == req.release:
        if p.cluster is not None:
            await p.cluster.hold(job, not req.release)
            job = p.table.jobs.get(job.id, job)
            if (job.state is JobState.HELD) != req.release or not job.state.pending:
                return protocol.JobId(job.id)  # a poll moved it on while Slurm answered
        job = p.table.set_held(job, not req.release)
        log.info("job %d %s by %s", job.id, "released" if req.release else "held", peer.user)
        p.dispatcher.schedule()  # the slots it would have taken may go to others
    return protocol.JobId(job.id)


def urgent(p: Parts, peer: Peer, req: protocol.Urgent) -> protocol.JobId:
    """ts -u: move a pending job to the front of the queue."""
    job = p.table.move_front(_queued(p, p.table.pick(peer, req.id, "added")))
    p.dispatcher.schedule()
    return protocol.JobId(job.id)


def swap(p: Parts, peer: Peer, req: protocol.Swap) -> protocol.Done:
    """ts -U a-b: swap two pending jobs' places."""
    a, b = p.table.pick(peer, req.a, "added"), p.table.pick(peer, req.b, "added")
    p.table.swap(_queued(p, a), _queued(p, b))
    p.dispatcher.schedule()
    return protocol.Done()


async def kill(p: Parts, peer: Peer, req: protocol.Kill) -> protocol.JobId:
    """ts -k: end a running job (default: the caller's last run one)."""
    job = p.table.pick(peer, req.id, "run")
    await _end(p, job)
    return protocol.JobId(job.id)


async def _end(p: Parts, job: Job) -> None:
    if p.cluster is not None and job.slurm_id is not None:
        if job.state is not JobState.RUNNING:
            raise WrongState(f"job {job.id} is {job.state.value}, not running")
        await p.cluster.cancel(job)  # scancel as the owner; the poll records the end
        return
    p.runner.kill(job)


def _own_running(p: Parts, peer: Peer) -> list[Job]:
    return [j for j in p.table.running.values() if j.uid == peer.uid or peer.admin]


async def kill_all(p: Parts, peer: Peer) -> protocol.Count:
    """ts -T: end every running job the caller may end."""
    mine = _own_running(p, peer)
    for job in mine:
        await _end(p, job)
    return protocol.Count(len(mine))


def shutdown(p: Parts, peer: Peer) -> protocol.Done:
    """ts -K: stop the daemon (admins only on the system service)."""
    if p.system:
        auth.check_admin(peer, "stopping the daemon (-K)")
    p.stop()
    return protocol.Done()


def slots(p: Parts, peer: Peer, req: protocol.Slots) -> protocol.SlotCount:
    """ts -S [N]."""
    if req.value is not None:
        if p.system:
            auth.check_admin(peer, "setting the slot count (-S)")
        p.policy.set_slots(req.value)
        p.dispatcher.schedule()
    return protocol.SlotCount(p.policy.total_slots())


def _has_output(job: Job) -> bool:
    return job.output_path is not None or not job.spec.store_output or job.pid is not None


async def wait(p: Parts, peer: Peer, req: protocol.Wait, send: SendEvent) -> protocol.JobRecord:
    """ts -w/-t/-c/-f: stream until the job is done; its record comes last."""
    job = p.table.pick(peer, req.id, req.default)
    if req.notify_start:
        while job.state.pending or (job.state is JobState.RUNNING and not _has_output(job)):
            await p.waiters.next_start(job.id)
            job = _still_there(p, job)
        await send(protocol.Started(job))
    return await _until_done(p, job)


async def _until_done(
    p: Parts, job: Job, ended: asyncio.Future[Job | None] | None = None
) -> protocol.JobRecord:
    """The job's record once it is done (a -nf job's even though it is then forgotten:
    `ended`, its end_ticket, taken before it could end)."""
    current = p.table.get(job.id) or job
    while not current.state.done:
        final = await (ended if ended is not None else p.waiters.next_end(job.id))
        ended = None
        current = final if final is not None else _still_there(p, current)
    return protocol.JobRecord(current)


def _still_there(p: Parts, job: Job) -> Job:
    current = p.table.get(job.id)
    if current is None:
        raise NoSuchJob(f"job {job.id} was removed")
    return current


def env(p: Parts, peer: Peer, req: protocol.Env) -> protocol.EnvValue:
    """--getenv/--setenv/--unsetenv: variables added to the caller's future jobs."""
    key = "env:" + req.name
    if req.action == "get":
        return protocol.EnvValue(p.settings.user_settings(peer.uid).get(key))
    value = req.value if req.action == "set" else None
    if value is not None:
        old = p.settings.user_settings(peer.uid).get(key)
        removing = 0 if old is None else len(key.encode()) + len(old.encode())
        adding = len(key.encode()) + len(value.encode())
        _check_bytes(p, peer, adding, p.policy.limits(peer.uid), removing)
    p.settings.set_user_setting(peer.uid, key, value)
    return protocol.EnvValue(value)


def logdir(p: Parts, peer: Peer, req: protocol.LogDir) -> protocol.LogDirPath:
    """--get_logdir/--set_logdir. The path is only ever used by the user's own job."""
    if req.path is not None:
        p.settings.set_user_setting(peer.uid, "logdir", req.path)
    path = p.settings.user_settings(peer.uid).get("logdir")
    return protocol.LogDirPath(path or os.environ.get("TMPDIR") or "/tmp", custom=bool(path))


def gpu_free_perc(p: Parts, peer: Peer, req: protocol.GpuFreePerc) -> protocol.GpuThreshold:
    """--get_gpu_free_perc/--set_gpu_free_perc (admin-only to set on the system service)."""
    if req.value is not None:
        if p.system:
            auth.check_admin(peer, "setting the GPU free-memory threshold")
        p.policy.set_free_threshold(req.value)
        p.gpus.expire(keep_problem=False)
        p.dispatcher.schedule()
    return protocol.GpuThreshold(p.policy.free_threshold())


def stats(p: Parts, peer: Peer, req: protocol.Stats) -> protocol.StatsReport:
    """ts --stats: the caller's row; every user's with -A (admins only on the system service)."""
    if req.all_users and p.system:
        auth.check_admin(peer, "everyone's accounting (--stats -A)")
    if p.ledger is None:
        raise BadRequest("accounting is not kept by this daemon")
    uid = None if req.all_users else peer.uid
    rows = p.ledger.stats(req.since or 0.0, uid)
    if uid is not None and not rows:
        from tsd.store import StatsRow

        rows = [StatsRow(peer.uid, peer.user, 0, 0, 0.0, 0.0, None)]
    return protocol.StatsReport(tuple(
        {
            "User": r.user,
            "Jobs": r.jobs,
            "Failed": r.failed,
            "Slot_Hours": round(r.slot_seconds / 3600.0, 6),
            "GPU_Hours": round(r.gpu_seconds / 3600.0, 6),
            "Mean_Wait_s": 0.0 if r.mean_wait is None else round(r.mean_wait, 1),
        }
        for r in rows
    ))


async def gpu_status(p: Parts) -> protocol.GpuReport:
    """ts -g: the GPUs, why busy ones are busy, who holds each, and every running GPU job.

    Holders are named to everyone (job id and user, or pid and user for a
    process outside tsd): who holds a GPU is what every user of a shared
    server needs to know, and `ps` shows process owners to anyone anyway.
    Job records leave redacted like any other (tsd.auth.visible_to).
    """
    gpus, problem = await p.gpus.snapshot()
    held, tsd_pids = p.table.gpu_holders()
    busy = p.gpus.busy(held, tsd_pids, p.policy.free_threshold())
    holding = sorted((j for j in p.table.holding() if j.gpu_ids), key=lambda j: j.id)
    holders: dict[int, list[protocol.Holder]] = {}
    for job in holding:
        for index in job.gpu_ids:
            holders.setdefault(index, []).append(protocol.Holder(job=job.id, user=job.user))
    for use in unmanaged(gpus or (), p.gpus.owners()):
        for index in use.gpus:
            holders.setdefault(index, []).append(
                protocol.Holder(pid=use.pid, user=use.user, memory_mib=use.memory_mib)
            )
    for gpu in gpus or ():
        sharing = [j for j in holding if gpu.index in j.gpu_ids and j.spec.gpu_mem is not None]
        if sharing:  # name them all, and how much of the GPU they declared
            declared = sum(j.spec.gpu_mem or 0 for j in sharing)
            ids = ", ".join(str(j.id) for j in sharing)
            busy[gpu.index] = (
                f"shared by --gpu-mem job{'s' if len(sharing) > 1 else ''} {ids} "
                f"({declared / 1024:.1f} of {gpu.memory_total / 2**30:.1f} GiB declared)"
            )
    jobs = tuple(_with_gpu_use(p, j) for j in holding if j.state is JobState.RUNNING)
    return protocol.GpuReport(
        gpus or (), busy, jobs, problem, {i: tuple(h) for i, h in holders.items()}
    )
