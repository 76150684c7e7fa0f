"""Job records as `ts` reads them from its daemon: light, read-only views.

`ts` must start fast and list 100,000 jobs fast, so it never rebuilds the
daemon's records as tsd.model's dataclasses. A view reads a record as it
arrived (a row of a listing, or one job's JSON object) and offers the
attribute names of tsd.model's Job, JobSpec and ExitInfo on one object:
`view.spec` is the view itself and `view.exit` too (None until the job has
ended), so tsd.render's functions take a view or a Job alike. A state is its
string (`"running"`); tsd.model.JobState is a StrEnum and compares equal to it.

The client trusts its own daemon for the shape of what it lists; a record that
is not even shaped like one is a ProtocolError (one line), never a traceback.
Standard library only at run time (no dataclasses, enum or typing).
"""

from __future__ import annotations

from operator import itemgetter

from tsd.errors import ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ts a few ms at start and only mypy needs it here
    from collections.abc import Mapping, Sequence
    from typing import Any

PENDING = frozenset(("queued", "allocating", "held"))
DONE = frozenset(("finished", "skipped"))

# Keys of a job's JSON object (tsd.codec.job_to_dict) whose attribute has another name.
_RENAMED = {"enqueue": "enqueue_time", "start": "start_time", "end": "end_time",
            "output": "output_path"}  # fmt: skip


class JobView(list):  # type: ignore[type-arg]
    """A job record from the daemon: its row (a list), with Job's attribute names.

    Subclasses made by `view_class` read each column with an itemgetter property
    (in C: a listing reads millions of them); attributes the daemon did not send
    keep the defaults below.
    """

    __slots__ = ()

    # Job
    id: int = 0
    uid: int = -1
    user: str = ""
    state: str = "queued"
    order: int = 0
    enqueue_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    pid: int | None = None
    gpu_ids: Sequence[int] = ()
    gpu_uuids: Sequence[str] = ()
    output_path: str | None = None
    unit: str | None = None
    wait_reason: str = ""
    gpu_idle_since: float | None = None
    notice: str = ""
    attempts: int = 0
    slurm_id: int | None = None
    slurm_task: int | None = None
    gpu_mem_peak: int | None = None
    gpu_mem_now: int | None = None
    gpu_util_now: int | None = None
    # JobSpec
    command: Sequence[str] = ()
    cwd: str = ""
    env: Sequence[Sequence[str]] = ()
    umask: int = 0o022
    label: str | None = None
    slots: int = 1
    gpus: int = 0
    gpu_indices: Sequence[int] | None = None
    depends: Sequence[int] = ()
    depend_mode: str = "after"
    store_output: bool = True
    gzip: bool = False
    stderr_apart: bool = False
    output_name: str | None = None
    mail: bool = False
    timeout: float | None = None
    env_info: str | None = None
    forget: bool = False
    begin: float | None = None
    priority: int = 0
    retry: int = 0
    array_job: int | None = None
    array_task: int | None = None
    array_throttle: int | None = None
    gpu_mem: int | None = None
    # ExitInfo (`exited`: whether there is one)
    exited: bool = False
    code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    lost: bool = False
    cpu_seconds: float | None = None
    max_rss: int | None = None
    note: str = ""

    @property
    def spec(self) -> JobView:
        """The job's spec: the same view (JobSpec's names are on it)."""
        return self

    @property
    def exit(self) -> JobView | None:
        """How it ended: the same view (ExitInfo's names are on it), None until then."""
        return self if self.exited else None

    @property
    def redacted(self) -> bool:
        """Another user's job as a non-admin sees it (Job.redacted)."""
        return self.cwd == ""

    @property
    def gpus_wanted(self) -> int:
        """JobSpec.gpus_wanted."""
        return len(self.gpu_indices) if self.gpu_indices is not None else self.gpus

    @property
    def command_line(self) -> str:
        """JobSpec.command_line."""
        return " ".join(self.command)

    @property
    def success(self) -> bool:
        """ExitInfo.success."""
        return self.code == 0 and not self.timed_out and not self.lost

    @property
    def elevel(self) -> int:
        """ExitInfo.elevel: the exit code, or -1 when killed by a signal or lost."""
        return self.code if self.code is not None else -1

    @property
    def wait_code(self) -> int:
        """ExitInfo.wait_code: the job's code, 255 when killed or lost."""
        return self.code if self.code is not None and not self.timed_out else 255


# What a column may be: an attribute, or command_line (a listing sends the line alone).
NAMES = frozenset((*JobView.__annotations__, "command_line"))
_CLASSES: dict[tuple[str, ...], type[JobView]] = {}


def view_class(columns: Sequence[str], same: Mapping[str, Any] | None = None) -> type[JobView]:
    """The view of rows laid out as `columns`, whose other attributes are `same` for
    every row (tsd.codec.piece); names it does not know are skipped."""
    key = tuple(columns)
    cls = None if same else _CLASSES.get(key)
    if cls is None:
        props: dict[str, Any] = {"__slots__": ()}
        for name, value in (same or {}).items():
            if name in NAMES:
                props[name] = value
        for i, name in enumerate(key):
            if name in NAMES:
                props[name] = property(itemgetter(i))
        cls = type("JobRow", (JobView,), props)
        if not same:
            _CLASSES[key] = cls
    return cls


def views_of_pieces(pieces: Any) -> list[JobView]:
    """A listing's pieces of rows (tsd.codec.piece) as views; a malformed one is a
    ProtocolError."""
    if not isinstance(pieces, list):
        raise ProtocolError("malformed job list from the daemon: not a list")
    views: list[JobView] = []
    for piece in pieces:
        if not isinstance(piece, dict):
            raise ProtocolError("malformed job list from the daemon: not an object")
        views += views_of_rows(piece.get("columns"), piece.get("rows"), piece.get("same"))
    return views


def views_of_rows(columns: Any, rows: Any, same: Any = None) -> list[JobView]:
    """Rows of `columns` (tsd.codec.LIST_COLUMNS), the rest `same` for all, as views."""
    same = {} if same is None else same
    if (
        not isinstance(columns, list)
        or not all(isinstance(c, str) for c in columns)
        or not isinstance(same, dict)
        or "id" not in columns
        or not ("state" in columns or "state" in same)
        or not isinstance(rows, list)
    ):
        raise ProtocolError("malformed job list from the daemon: bad columns")
    width = len(columns)
    for row in rows:
        if type(row) is not list or len(row) != width:
            raise ProtocolError("malformed job list from the daemon: a row of the wrong shape")
    return list(map(view_class(columns, same), rows))


def view_of(record: Any) -> JobView:
    """One job's JSON object (tsd.codec.job_to_dict) as a view."""
    if not isinstance(record, dict):
        raise ProtocolError("malformed job record from the daemon: not an object")
    spec = record.get("spec")
    ex = record.get("exit")
    if not isinstance(spec, dict) or not (ex is None or isinstance(ex, dict)):
        raise ProtocolError("malformed job record from the daemon: no spec")
    if "id" not in record or "state" not in record:
        raise ProtocolError("malformed job record from the daemon: no id or state")
    flat: dict[str, Any] = {}
    flat.update(spec)
    if ex is not None:
        flat.update(ex)
        flat["exited"] = True
    for key, value in record.items():
        if key not in ("spec", "exit"):
            flat[_RENAMED.get(key) or key] = value
    flat.pop("exit", None)  # an ExitInfo key only if the record was odd: never a column
    return view_class(list(flat))(list(flat.values()))


def views_of_records(records: Any) -> list[JobView]:
    """A list of job objects (an older daemon's listing, ts -g's jobs) as views."""
    if not isinstance(records, list):
        raise ProtocolError("malformed job list from the daemon: not a list")
    return [view_of(r) for r in records]


class UnmanagedView:
    """A GPU process outside tsd (tsd.model.UnmanagedUse), as `ts -A -l` gets it."""

    __slots__ = ("gpus", "memory_mib", "pid", "uid", "user")

    def __init__(self, obj: Mapping[str, Any]) -> None:
        self.pid: int = int(obj["pid"])
        uid = obj.get("uid")
        self.uid: int | None = None if uid is None else int(uid)
        user = obj.get("user")
        self.user: str | None = None if user is None else str(user)
        self.gpus: tuple[int, ...] = tuple(int(i) for i in obj.get("gpus") or ())
        self.memory_mib: int = int(obj.get("memory_mib") or 0)


def unmanaged_views(items: Any) -> list[UnmanagedView]:
    """The `unmanaged` entries of a listing; a malformed one is a ProtocolError."""
    try:
        return [UnmanagedView(u) for u in items or ()]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"malformed GPU process record from the daemon: {exc}") from None
