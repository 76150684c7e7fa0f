"""The wire protocol: framing, typed requests and responses, job records on the wire.

A frame is a 4-byte big-endian length and a UTF-8 JSON object. Every byte
from a socket is hostile until `parse_request` has turned it into one of the
request dataclasses below; nothing else in the daemon looks at raw JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from tsd import codec, jobcontrols
from tsd.errors import BadRequest, ProtocolError, VersionMismatch

# Framing and limits live in tsd.framing (light enough for every `ts` call);
# they are part of this module's interface too.
from tsd.framing import HEADER as HEADER
from tsd.framing import LIST_CHUNK as LIST_CHUNK
from tsd.framing import MAX_ARGS as MAX_ARGS
from tsd.framing import MAX_COMMAND as MAX_COMMAND
from tsd.framing import MAX_DEPENDS as MAX_DEPENDS
from tsd.framing import MAX_ENV as MAX_ENV
from tsd.framing import MAX_FRAME as MAX_FRAME
from tsd.framing import MAX_GPU_MEM as MAX_GPU_MEM
from tsd.framing import MAX_GPUS as MAX_GPUS
from tsd.framing import MAX_ID as MAX_ID
from tsd.framing import MAX_SLOTS as MAX_SLOTS
from tsd.framing import MAX_TEXT as MAX_TEXT
from tsd.framing import MAX_TIMEOUT as MAX_TIMEOUT
from tsd.framing import PROTOCOL_VERSION as PROTOCOL_VERSION
from tsd.framing import Encoded
from tsd.framing import decode as decode
from tsd.framing import encode as encode
from tsd.framing import frame_length as frame_length
from tsd.model import HIDDEN, DependMode, Gpu, Job, JobSpec, UnmanagedUse
from tsd.statswire import Stats as Stats
from tsd.statswire import StatsReport as StatsReport
from tsd.wirefields import Fields as _Fields
from tsd.wirefields import check_line as _check_line
from tsd.wirefields import check_text as _check_text

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ts a few ms at start and only mypy needs it here
    from typing import Any, Literal, TypeVar

    Default = Literal["added", "run"]
    T = TypeVar("T")


# A job's record (spec without its environment, plus what happened to it) must fit
# one frame on its own, whatever JSON's escapes make of its text: a list piece may
# hold a single record, and -i sends one.
MAX_RECORD = MAX_FRAME - 64 * 1024


def encoded_size(obj: Mapping[str, Any]) -> int:
    """Bytes `obj` takes in a frame body (as tsd.framing.encode writes it)."""
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class Submit:
    """Queue a job. `block` False is ts -B: a full queue is an error, not a wait.

    `wait` (ts -nf): the same connection streams a `Queued` event, then ends with
    the job's final record. One request, so a job that is forgotten when it ends
    cannot end before its waiter asked for it.
    """

    spec: JobSpec
    depend_last: bool = False
    block: bool = True
    wait: bool = False
    hold: bool = False  # --hold: queued held, it never starts until released
    array: str | None = None  # --array SPEC (tsd.jobcontrols.parse_array): one job per index
    # ts -n: the client's stdout and stderr, passed with the frame (SCM_RIGHTS), never
    # part of the JSON; the server attaches them and closes whatever nobody took.
    terminal: PassedFds | None = field(default=None, compare=False)


class PassedFds:
    """Descriptors that came with a request: owned by whoever `take()`s them, else closed.

    The server closes what is left once the request is answered, so a request that
    fails anywhere (validation, a full queue, a hang-up) leaks none into the daemon.
    """

    def __init__(self, fds: tuple[int, ...]) -> None:
        self._fds = fds

    def add(self, fds: tuple[int, ...]) -> None:
        """More descriptors that came with the same request."""
        self._fds += fds

    def peek(self) -> tuple[int, ...]:
        """The descriptors held, still owned here."""
        return self._fds

    def take(self) -> tuple[int, ...]:
        """The descriptors, now the caller's to close."""
        fds, self._fds = self._fds, ()
        return fds

    def close(self) -> None:
        """Close the descriptors nobody took."""
        for fd in self.take():
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True)
class ListJobs:
    """ts -l; `all_users` is -A.

    `rows`: answer with rows (`JobRows`, tsd.codec.piece) rather than job records
    (`JobList`): what ts itself asks for. A daemon that predates rows ignores the
    key and answers records, which ts reads as well.
    """

    all_users: bool = False
    rows: bool = False


@dataclass(frozen=True)
class GetJob:
    """One job's record (-i -s -p -o -a -F -q). id None picks the last added or last run."""

    id: int | None = None
    default: Default = "added"


@dataclass(frozen=True)
class Remove:
    """ts -r: remove a job that is not running."""

    id: int | None = None


@dataclass(frozen=True)
class Urgent:
    """ts -u: move a queued job to the front of its owner's queue."""

    id: int | None = None


@dataclass(frozen=True)
class Swap:
    """ts -U a-b: swap two queued jobs."""

    a: int
    b: int


@dataclass(frozen=True)
class Kill:
    """ts -k: end a running job's whole tree (id None: the caller's last run job)."""

    id: int | None = None


@dataclass(frozen=True)
class KillAll:
    """ts -T: end every running job the caller may end."""


@dataclass(frozen=True)
class Clear:
    """ts -C: forget the caller's finished jobs."""


@dataclass(frozen=True)
class Shutdown:
    """ts -K: stop the daemon (admin only on the system service)."""


@dataclass(frozen=True)
class Slots:
    """ts -S [N]: read, or set (admin), the server's slot count."""

    value: int | None = None


@dataclass(frozen=True)
class CountRunning:
    """ts -R: how many jobs are running."""


@dataclass(frozen=True)
class Wait:
    """ts -w/-t/-c/-f: a stream that ends when the job does.

    With `notify_start` the daemon first sends a `started` event carrying the job
    record (with its output path) as soon as it runs, so -t/-c can follow the file.
    """

    id: int | None = None
    default: Default = "added"
    notify_start: bool = False


@dataclass(frozen=True)
class Env:
    """--getenv/--setenv/--unsetenv: variables added to the caller's future jobs."""

    action: Literal["get", "set", "unset"]
    name: str
    value: str | None = None


@dataclass(frozen=True)
class LogDir:
    """--get_logdir/--set_logdir: where the caller's output files go."""

    path: str | None = None


@dataclass(frozen=True)
class GpuFreePerc:
    """--get_gpu_free_perc/--set_gpu_free_perc."""

    value: float | None = None


@dataclass(frozen=True)
class GpuStatus:
    """ts -g: the GPUs and the running GPU jobs."""


@dataclass(frozen=True)
class Hold:
    """ts --hold ID: a queued job is held (never starts); with `release`, ts --release ID."""

    id: int | None = None
    release: bool = False


Request = (
    Submit
    | ListJobs
    | GetJob
    | Remove
    | Urgent
    | Swap
    | Kill
    | KillAll
    | Clear
    | Shutdown
    | Slots
    | CountRunning
    | Wait
    | Env
    | LogDir
    | GpuFreePerc
    | GpuStatus
    | Stats
    | Hold
)

OPS: dict[str, type[Any]] = {
    "submit": Submit,
    "list": ListJobs,
    "get": GetJob,
    "remove": Remove,
    "urgent": Urgent,
    "swap": Swap,
    "kill": Kill,
    "kill_all": KillAll,
    "clear": Clear,
    "shutdown": Shutdown,
    "slots": Slots,
    "count_running": CountRunning,
    "wait": Wait,
    "env": Env,
    "logdir": LogDir,
    "gpu_free_perc": GpuFreePerc,
    "gpu_status": GpuStatus,
    "stats": Stats,
    "hold": Hold,
}
OP_NAMES = {cls: name for name, cls in OPS.items()}


def request_to_wire(req: Request) -> dict[str, Any]:
    """The JSON object a client sends for `req`, version included."""
    out: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": OP_NAMES[type(req)]}
    for key, value in req.__dict__.items():
        if isinstance(value, PassedFds) or (key == "terminal" and value is None):
            continue  # descriptors travel beside the frame, never in it
        out[key] = spec_to_wire(value) if isinstance(value, JobSpec) else value
    return out


def spec_to_wire(spec: JobSpec, include_env: bool = True) -> dict[str, Any]:
    """A JobSpec as a JSON object."""
    return codec.spec_to_dict(spec, include_env)


# ------------------------------------------------------------- validation


def _env_pairs(raw: Any) -> list[tuple[str, str]]:
    """spec.env's [name, value] pairs, checked as a whole rather than pair by pair.

    Every submit carries the caller's whole environment (dozens of variables): a
    check per string made a quarter of parse_spec's time (9 of 36 us for 35
    variables here). One string of all the text answers check_text's questions
    (NUL, encodable as UTF-8) for every part at once.
    """
    bad = "bad request: spec.env: expected a list of [name, value] pairs"
    if not isinstance(raw, list) or len(raw) > MAX_ENV:
        raise BadRequest(bad)
    if not all(isinstance(pair, list) and len(pair) == 2 for pair in raw):
        raise BadRequest(bad)
    names = [pair[0] for pair in raw]
    values = [pair[1] for pair in raw]
    if not (all(isinstance(n, str) and n and "=" not in n for n in names)
            and all(isinstance(v, str) for v in values)):  # fmt: skip
        raise BadRequest(bad)
    # MAX_FRAME: nothing longer arrives in a frame, as for each of the strings before.
    _check_text("".join(names) + "".join(values), MAX_FRAME,
                lambda what: BadRequest(f"bad request: spec.env: {what}"))  # fmt: skip
    return list(zip(names, values, strict=True))


def parse_spec(obj: Any) -> JobSpec:
    """Validate a job spec from the wire. Nothing from it is trusted beyond its shape."""
    if not isinstance(obj, dict):
        raise BadRequest("bad request: spec: expected an object")
    f = _Fields(obj, "spec.")
    command = obj.get("command")
    if not isinstance(command, list) or not command:
        raise BadRequest("bad request: no command given")
    if len(command) > MAX_ARGS or not all(isinstance(a, str) for a in command):
        raise BadRequest("bad request: spec.command: expected a list of strings")
    for arg in command:
        _check_text(arg, MAX_FRAME, lambda what: BadRequest(f"bad request: spec.command: {what}"))
    if not "".join(command).strip():
        raise BadRequest("bad request: the command is empty")
    if sum(len(a) + 1 for a in command) > MAX_COMMAND:
        # Keeps every job's record well under the frame limit when it is listed.
        raise BadRequest(f"bad request: the command is longer than {MAX_COMMAND} characters")
    cwd = f.text("cwd", 4096)
    if cwd is None or not cwd.startswith("/"):
        raise BadRequest("bad request: spec.cwd: expected an absolute path")
    env = _env_pairs(obj.get("env", []))
    gpu_indices = f.int_list("gpu_indices", 0, MAX_GPUS - 1, MAX_GPUS)
    if gpu_indices is not None:
        if not gpu_indices:
            raise BadRequest("bad request: spec.gpu_indices: empty list")
        if len(set(gpu_indices)) != len(gpu_indices):
            raise BadRequest("bad request: spec.gpu_indices: an index is repeated")
    depends = f.int_list("depends", 1, MAX_ID, MAX_DEPENDS) or ()
    output_name = f.text("output_name", 255)
    _check_line(output_name, lambda what: BadRequest(f"bad request: -O name {what}"))
    label = f.text("label", 1024)
    _check_line(label, lambda what: BadRequest(f"bad request: the label {what}"))
    if output_name is not None and (
        "/" in output_name or output_name in ("", ".", "..")
    ):
        raise BadRequest("bad request: -O takes a file name without any path")
    timeout = f.number("timeout", 0.0, MAX_TIMEOUT)
    if timeout is not None and timeout <= 0:
        raise BadRequest("bad request: spec.timeout: must be positive")
    gpus = f.integer("gpus", 0, MAX_GPUS, 0) or 0
    if gpu_indices is not None:
        gpus = len(gpu_indices)
    try:
        controls = jobcontrols.spec_controls(obj)
    except ValueError as exc:
        raise BadRequest(f"bad request: {exc}") from None
    gpu_mem = f.integer("gpu_mem", 1, MAX_GPU_MEM)
    if gpu_mem is not None and gpus == 0:
        gpus = 1  # --gpu-mem alone: one GPU with that much memory
    spec = JobSpec(
        command=tuple(command),
        cwd=cwd,
        env=tuple(env),
        umask=f.integer("umask", 0, 0o777, 0o022) or 0,
        label=label,
        slots=f.integer("slots", 1, MAX_SLOTS, 1) or 1,
        gpus=gpus,
        gpu_indices=gpu_indices,
        depends=depends,
        depend_mode=DependMode(f.choice("depend_mode", ("after", "success"), "after")),
        store_output=f.flag("store_output", True),
        gzip=f.flag("gzip"),
        stderr_apart=f.flag("stderr_apart"),
        output_name=output_name,
        mail=f.flag("mail"),
        timeout=timeout,
        env_info=f.text("env_info", MAX_TEXT),
        forget=f.flag("forget"),
        **controls,
        gpu_mem=gpu_mem,
    )
    size = encoded_size(codec.spec_to_dict(spec, include_env=False))
    if size > MAX_RECORD:
        raise BadRequest(
            f"bad request: the job's command, label and TS_ENV output take {size} bytes "
            f"as JSON, over the {MAX_RECORD}-byte limit of one record"
        )
    return spec


def parse_request(obj: dict[str, Any]) -> Request:
    """Turn a decoded frame into a typed request, or raise a one-line error."""
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"protocol version mismatch: client speaks {version!r}, "
            f"daemon speaks {PROTOCOL_VERSION} (restart the daemon or update ts)"
        )
    op = obj.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise BadRequest(f"bad request: unknown operation {str(op)[:40]!r}")
    f = _Fields(obj, "")
    default: Default = "run" if f.choice("default", ("added", "run"), "added") == "run" else "added"
    match op:
        case "submit":
            submit = Submit(
                spec=parse_spec(obj.get("spec")),
                depend_last=f.flag("depend_last"),
                block=f.flag("block", True),
                wait=f.flag("wait"),
                hold=f.flag("hold"),
                array=f.text("array", 256),
            )
            try:  # an --array alone (its elements' fields are the daemon's to set)
                jobcontrols.check_submit(
                    submit.array, submit.spec.store_output, submit.spec.output_name
                )
            except ValueError as exc:
                raise BadRequest(f"bad request: {exc}") from None
            return submit
        case "list":
            return ListJobs(all_users=f.flag("all_users"), rows=f.flag("rows"))
        case "get":
            return GetJob(id=f.integer("id", 0, MAX_ID), default=default)
        case "remove":
            return Remove(id=f.integer("id", 0, MAX_ID))
        case "urgent":
            return Urgent(id=f.integer("id", 0, MAX_ID))
        case "swap":
            return Swap(a=f.req_integer("a", 0, MAX_ID), b=f.req_integer("b", 0, MAX_ID))
        case "kill":
            return Kill(id=f.integer("id", 0, MAX_ID))
        case "slots":
            return Slots(value=f.integer("value", 0, MAX_SLOTS))
        case "wait":
            return Wait(
                id=f.integer("id", 0, MAX_ID),
                default=default,
                notify_start=f.flag("notify_start"),
            )
        case "env":
            action = f.choice("action", ("get", "set", "unset"), "get")
            name = f.text("name", 1024) or ""
            if not name or "=" in name:
                raise BadRequest("bad request: env: a variable name without '=' is needed")
            _check_line(name, lambda what: BadRequest(f"bad request: env: the name {what}"))
            value = f.text("value", MAX_TEXT)
            if action == "set" and value is None:
                raise BadRequest("bad request: env: --setenv needs NAME=VALUE")
            return Env(
                action="set" if action == "set" else "unset" if action == "unset" else "get",
                name=name,
                value=value,
            )
        case "logdir":
            path = f.text("path", 4096)
            _check_line(path, lambda what: BadRequest(f"bad request: the log directory {what}"))
            if path is not None and not path.startswith("/"):
                raise BadRequest("bad request: the log directory must be an absolute path")
            return LogDir(path=path)
        case "gpu_free_perc":
            return GpuFreePerc(value=f.number("value", 0.0, 100.0))
        case "stats":
            return Stats(since=f.number("since", 0.0, 1e11), all_users=f.flag("all_users"))
        case "hold":
            return Hold(id=f.integer("id", 0, MAX_ID), release=f.flag("release"))
    simple: dict[str, Request] = {
        "kill_all": KillAll(),
        "clear": Clear(),
        "shutdown": Shutdown(),
        "count_running": CountRunning(),
        "gpu_status": GpuStatus(),
    }
    return simple[op]


# ------------------------------------------------------------ job records


def job_to_wire(job: Job, include_env: bool = False) -> dict[str, Any]:
    """A job as the daemon reports it. The environment stays home unless asked for."""
    return codec.job_to_dict(job, include_env)


def job_from_wire(obj: Mapping[str, Any]) -> Job:
    """Rebuild a Job from the daemon's report (the client trusts its daemon's shape)."""
    try:
        cwd = obj["spec"].get("cwd")
        # Another user's job comes redacted (tsd.auth.visible_to): no cwd to check.
        spec = parse_spec(obj["spec"] | {"env": obj["spec"].get("env") or [], "cwd": cwd or "/"})
        if cwd == HIDDEN:
            spec = replace(spec, cwd=HIDDEN)
        return codec.job_from_dict(obj, spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed job record from the daemon: {exc}") from None


# ------------------------------------------------------------- responses
# What the daemon answers, one dataclass per shape. `to_wire` gives the JSON
# object the client reads; the server adds {"ok": true} around it.


@dataclass(frozen=True)
class JobId:
    """submit, remove, urgent, kill: the job the request acted on.

    `ids`: a submit of an --array: every element's id, in index order (`id` the first).
    """

    id: int
    ids: tuple[int, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The response body."""
        return {"id": self.id, "ids": list(self.ids)} if self.ids else {"id": self.id}


@dataclass(frozen=True)
class Count:
    """kill_all, clear, count_running: how many jobs."""

    count: int

    def to_wire(self) -> dict[str, Any]:
        """The response body."""
        return {"count": self.count}


@dataclass(frozen=True)
class Done:
    """swap, shutdown: nothing to say beyond ok."""

    def to_wire(self) -> dict[str, Any]:
        """The response body."""
        return {}


@dataclass(frozen=True)
class JobRecord:
    """get, wait: one job's record (the final frame of a wait stream)."""

    job: Job

    def to_wire(self) -> dict[str, Any]:
        """The response body."""
        return {"job": job_to_wire(self.job)}


def unmanaged_from_wire(obj: Mapping[str, Any]) -> UnmanagedUse:
    """The client's copy of an unmanaged GPU process record (it trusts its daemon's shape)."""
    try:
        return codec.unmanaged_from_dict(obj)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed GPU process record from the daemon: {exc}") from None


@dataclass(frozen=True)
class JobList:
    """list: the last piece of the listing, with the server's slot use.

    `unmanaged` (ts -A only): processes outside tsd on the GPUs, shown as
    entries of their own (state `unmanaged`, no id).
    """

    jobs: tuple[Job, ...]
    slots: int
    running: int
    unmanaged: tuple[UnmanagedUse, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The response body."""
        return {
            "jobs": [job_to_wire(j) for j in self.jobs],
            "slots": self.slots,
            "running": self.running,
            "unmanaged": [codec.unmanaged_to_dict(u) for u in self.unmanaged],
        }


@dataclass(frozen=True)
class JobRows:
    """list with `rows`: the last piece of the listing (tsd.codec.piece), and slot use.

    The rows are already as `auth.visible_to` lets the caller see them: list_jobs
    makes them so, since rows hold no Job for the usual pass to redact.
    """

    piece: Mapping[str, Any]
    slots: int
    running: int
    unmanaged: tuple[UnmanagedUse, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The response body."""
        return {
            **self.piece,
            "slots": self.slots,
            "running": self.running,
            "unmanaged": [codec.unmanaged_to_dict(u) for u in self.unmanaged],
        }


@dataclass(frozen=True)
class SlotCount:
    """slots: the server's slot count."""

    slots: int

    def to_wire(self) -> dict[str, Any]:
        """The response body."""
        return {"slots": self.slots}


@dataclass(frozen=True)
class EnvValue:
    """env: the variable's value for the caller's future jobs (None: unset)."""

    value: str | None

    def to_wire(self) -> dict[str, Any]:
        """The response body."""
        return {"value": self.value}


@dataclass(frozen=True)
class LogDirPath:
    """logdir: where the caller's output files go."""

    path: str
    custom: bool = False  # set by --set_logdir; else jobs use their TMPDIR, or /tmp

    def to_wire(self) -> dict[str, Any]:
        """The response body."""
        return {"path": self.path, "custom": self.custom}


@dataclass(frozen=True)
class GpuThreshold:
    """gpu_free_perc: the free-memory percentage above which a GPU is free."""

    value: float

    def to_wire(self) -> dict[str, Any]:
        """The response body."""
        return {"value": self.value}


@dataclass(frozen=True)
class Holder:
    """Who holds a GPU: a tsd job (`job`) or a process outside tsd (`pid`), and its user."""

    job: int | None = None
    pid: int | None = None
    user: str | None = None
    memory_mib: int | None = None  # a process outside tsd: its GPU memory, all its GPUs

    def to_wire(self) -> dict[str, Any]:
        """The holder as `ts -g` gets it."""
        return {"job": self.job, "pid": self.pid, "user": self.user, "memory_mib": self.memory_mib}


def _no_holders() -> Mapping[int, tuple[Holder, ...]]:
    return {}


@dataclass(frozen=True)
class GpuReport:
    """gpu_status: every GPU, why busy ones are busy, the running GPU jobs, NVML's problem,
    and who holds each GPU."""

    gpus: tuple[Gpu, ...]
    busy: Mapping[int, str]
    jobs: tuple[Job, ...]
    problem: str
    holders: Mapping[int, tuple[Holder, ...]] = field(default_factory=_no_holders)

    def to_wire(self) -> dict[str, Any]:
        """The response body."""
        return {
            "gpus": [
                {
                    "index": g.index,
                    "uuid": g.uuid,
                    "name": g.name,
                    "memory_total": g.memory_total,
                    "memory_used": g.memory_used,
                    "free_percent": g.free_percent,
                    "utilization": g.utilization,
                    "memory_utilization": g.memory_utilization,
                    "temperature": g.temperature,
                    "power_mw": g.power_mw,
                    "power_limit_mw": g.power_limit_mw,
                    "busy": self.busy.get(g.index),
                    "holders": [h.to_wire() for h in self.holders.get(g.index, ())],
                    "processes": [
                        {"pid": p.pid, "user": p.user, "used_memory": p.used_memory}
                        for p in g.processes
                    ],
                }
                for g in self.gpus
            ],
            "jobs": [job_to_wire(j) for j in self.jobs],
            "problem": self.problem,
        }


Response = (
    JobId | Count | Done | JobRecord | JobList | JobRows | SlotCount | EnvValue | LogDirPath
    | GpuThreshold | GpuReport | StatsReport
)


@dataclass(frozen=True)
class JobsChunk:
    """An event of a list stream: a piece of a listing too long for one frame."""

    jobs: tuple[Job, ...]

    def to_wire(self) -> dict[str, Any]:
        """The event frame."""
        return {"event": "jobs", "jobs": [job_to_wire(j) for j in self.jobs]}


@dataclass(frozen=True)
class RowsChunk:
    """An event of a list stream with `rows`: a piece of a listing (tsd.codec.piece)
    too long for one frame."""

    piece: Mapping[str, Any]
    body: bytes | None = field(default=None, compare=False)  # to_wire's, encoded already

    def to_wire(self) -> dict[str, Any]:
        """The event frame."""
        frame = {"event": "rows", **self.piece}
        return frame if self.body is None else Encoded(self.body, frame)


@dataclass(frozen=True)
class Started:
    """An event of a wait stream with notify_start: the job runs (its output path known)."""

    job: Job

    def to_wire(self) -> dict[str, Any]:
        """The event frame."""
        return {"event": "started", "job": job_to_wire(self.job)}


@dataclass(frozen=True)
class Queued:
    """An event of a submit stream with `wait`: the job is queued under this id."""

    id: int

    def to_wire(self) -> dict[str, Any]:
        """The event frame."""
        return {"event": "queued", "id": self.id}


@dataclass(frozen=True)
class QueueFullWait:
    """An event of a submit stream without -B: the queue is full; the daemon waits for room.

    Sent once, so that `ts` can say why it does not return; clients that do not
    know it skip it like any event.
    """

    waiting: int

    def to_wire(self) -> dict[str, Any]:
        """The event frame."""
        return {"event": "queue_full", "waiting": self.waiting}


Event = JobsChunk | RowsChunk | Started | Queued | QueueFullWait
