"""Writing `ts`'s output: stdout and stderr, listings, and following a job's output
file (-t, -c).

Standard library only at import; job records are read through tsd.jobview's
light views (never the job model's dataclasses), and the renderers load when
something is to be printed.
"""

# No `from __future__ import annotations` here: `ts COMMAND` (tsd.plainsubmit) reads
# its answer with this module, and that import loads __future__ (0.12 ms of each
# call). Annotations that name what only mypy imports are strings instead.

import errno
import posix
import select
import sys
from _stat import S_ISREG  # not stat: see tsd.leanos
from io import SEEK_END  # io is loaded at start; os is not (see tsd.leanos)

from tsd.errors import BadRequest, ProtocolError, TsdError, UsageError, from_wire

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a few ms at import and is needed only by mypy
    import zlib
    from collections.abc import Mapping
    from typing import IO, Any

    from tsd.client import Connection
    from tsd.jobview import JobView

PROG = "ts"
TAIL_LINES = 10
POLL_SECONDS = 0.2


class StdoutGone(Exception):
    """stdout was closed under us (`ts -c | head`)."""


def emit(text: str | bytes) -> None:
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    if sys.stdout is None:  # started with fd 1 closed (`ts -l >&-`), as cat says it
        raise TsdError("write error: standard output is closed")
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        raise StdoutGone() from None


def warn(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def terminal_width() -> int | None:
    try:
        if sys.stdout is not None and sys.stdout.isatty():
            return posix.get_terminal_size(sys.stdout.fileno()).columns
    except OSError:
        pass
    return None


def wait_code(job: "JobView") -> int:
    """What -w/-t/-c/-f exit with: the job's code; 255 when skipped, killed or lost."""
    if job.state == "finished" and job.exit is not None:
        return job.exit.wait_code
    return 255


def check(frame: "Mapping[str, Any]") -> "dict[str, Any]":
    """The daemon's final frame if it says ok; its error (a TsdError) otherwise."""
    if frame.get("ok") is True:
        return dict(frame)
    if frame.get("ok") is False:
        raise from_wire(str(frame.get("code", "error")), str(frame.get("error", "unknown error")))
    raise TsdError("malformed response from the daemon")


def submitted_ids(frame: "Mapping[str, Any]") -> tuple[int, list[int]]:
    """The id a submit's final frame gives, and every id (an --array's elements, in
    order); its error otherwise, a spec the daemon refused being a command-line error."""
    try:
        answer = check(frame)
    except BadRequest as exc:
        # The spec broke one of tsd.protocol.parse_spec's rules: a command-line error.
        raise UsageError(exc.message.removeprefix("bad request: ")) from None
    job_id = answer.get("id")
    ids = answer.get("ids", [job_id])
    if not isinstance(job_id, int) or not isinstance(ids, list):
        raise TsdError("malformed response from the daemon: no job id")
    return job_id, ids


def say_queue_full(frame: "Mapping[str, Any]") -> None:
    """The daemon waits for room in a full queue: say so, once (it sends it once)."""
    if frame.get("event") == "queue_full":
        waiting = frame.get("waiting")
        count = f" ({waiting} jobs waiting)" if isinstance(waiting, int) else ""
        warn(f"your queue is full{count}; waiting for room (Ctrl-C to give up)")


def job_of(resp: "Mapping[str, Any]") -> "JobView":
    """The job record of an answer (get, wait, a `started` event), as a view."""
    rec = resp.get("job")
    if not isinstance(rec, dict):
        raise TsdError("malformed response from the daemon: no job record")
    from tsd.jobview import view_of

    return view_of(rec)


def listing_views(resp: "Mapping[str, Any]") -> "list[JobView]":
    """The jobs of a listing: rows (what ts asks for) or records (an older daemon, ts -g)."""
    from tsd.jobview import views_of_pieces, views_of_records

    if "rows" in resp:
        return views_of_pieces(resp.get("pieces", [resp]))
    return views_of_records(resp.get("jobs", []))


def listing_text(
    resp: "Mapping[str, Any]", fmt: str, all_users: bool, gpus: bool = False,
    width: int | None = -1,
) -> str:
    """ts -l (-M json|tab), or ts -g with `gpus`: the daemon's answer as text.

    `width` -1: this terminal's. The daemon is trusted for the shape of its
    records, not relied on: anything that does not read as one is one line.
    """
    import time

    from tsd import render
    from tsd.jobview import unmanaged_views

    try:
        if gpus:
            if fmt == "json":
                return render.gpu_status_json(resp)
            return render.gpu_status_text(resp, listing_views(resp))
        jobs, now = listing_views(resp), time.time()
        outside = unmanaged_views(resp.get("unmanaged"))
        if fmt == "json":
            return render.list_json(jobs, now=now, unmanaged=outside)
        if fmt == "tab":
            return render.list_tab(jobs, show_user=all_users, now=now)
        slots, running = int(resp.get("slots", 0)), int(resp.get("running", 0))
        return render.list_text(
            jobs, slots, running, show_user=all_users, now=now,
            width=terminal_width() if width == -1 else width, unmanaged=outside,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ProtocolError(f"malformed job list from the daemon: {exc}") from None


def _inflater() -> "zlib._Decompress":
    """A gzip reader; zlib is loaded only for a job whose output is gzipped (-z)."""
    import zlib

    return zlib.decompressobj(wbits=31)


class OutputFollower:
    """Copies a job's output file to a stream as it grows; gunzips -z output on the fly."""

    def __init__(
        self,
        path: str,
        gzipped: bool,
        out: "IO[bytes]",
        tail_lines: int | None,
        owner: int | None = None,
    ) -> None:
        self.path = path
        self.owner = owner  # the job's uid: the file must be a regular file of theirs
        self.gzipped = gzipped
        self.out = out
        self.tail_lines = tail_lines  # None: everything (-c); N: start with the last N lines (-t)
        self.file: IO[bytes] | None = None
        self.inflater = _inflater() if gzipped else None

    def _open(self) -> bool:
        if self.file is not None:
            return True
        self.file = open_output(self.path, self.owner)
        if self.file is None:
            return False
        if self.tail_lines is not None:
            self._start_at_tail(self.tail_lines)
        return True

    def _start_at_tail(self, lines: int) -> None:
        assert self.file is not None
        if self.gzipped:
            data = self._inflate(self.file.read())
            self._write(last_lines(data, lines))
            return
        # Plain file: read backwards from the end only as far as needed.
        end = self.file.seek(0, SEEK_END)
        pos, chunk, buf = end, 1 << 16, b""
        while pos > 0 and buf.count(b"\n") <= lines:
            step = min(chunk, pos)
            pos -= step
            self.file.seek(pos)
            buf = self.file.read(step) + buf
        self.file.seek(end)
        self._write(last_lines(buf, lines))

    def _inflate(self, data: bytes) -> bytes:
        import zlib

        assert self.inflater is not None
        out = []
        while data:
            try:
                out.append(self.inflater.decompress(data))
            except zlib.error as exc:
                raise TsdError(f"{self.path}: not readable as gzip: {exc}") from None
            if self.inflater.eof:
                # gzip files may hold several members; start the next one.
                data = self.inflater.unused_data
                self.inflater = _inflater()
            else:
                data = b""
        return b"".join(out)

    def _write(self, data: bytes) -> None:
        if data:
            try:
                self.out.write(data)
                self.out.flush()
            except BrokenPipeError:
                raise StdoutGone() from None

    def poll(self) -> bool:
        """Copy whatever is new. False while the file does not exist yet."""
        if not self._open():
            return False
        assert self.file is not None
        while True:
            data = self.file.read(1 << 16)
            if not data:
                return True
            self._write(self._inflate(data) if self.gzipped else data)

    def close(self) -> None:
        """Close the file."""
        if self.file is not None:
            self.file.close()


def open_output(path: str, owner: int | None) -> "IO[bytes] | None":
    """Open a job's output file for reading; None while it does not exist.

    ts may run as root (an admin reading a user's job), and the path is in a
    directory the job's user controls: so never through a symlink (O_NOFOLLOW),
    never a FIFO or device (O_NONBLOCK keeps a FIFO from blocking the open), and
    only a regular file that belongs to the job's user. Anything else is one error.
    """
    flags = posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_NONBLOCK | posix.O_CLOEXEC | posix.O_NOCTTY
    try:
        fd = posix.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TsdError(
                f"{path} is a symbolic link, not the job's output: not reading it"
            ) from None
        raise TsdError(f"cannot read {path}: {exc.strerror}") from None
    st = posix.fstat(fd)
    problem = None
    if not S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif owner is not None and st.st_uid != owner:
        problem = f"belongs to uid {st.st_uid}, not to the job's user (uid {owner})"
    if problem is not None:
        posix.close(fd)
        raise TsdError(f"{path} {problem}: not reading it")
    posix.set_blocking(fd, True)
    return open(fd, "rb")


def last_lines(data: bytes, n: int) -> bytes:
    """The last n lines of `data`, as `tail -n` prints them."""
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-n:]) if n > 0 else b""


def follow_output(
    conn: "Connection", tail: int | None, out: "IO[bytes]", poll: float = POLL_SECONDS
) -> int:
    """-t/-c: copy the job's output until the daemon's final frame; the job's wait code.

    `tail`: start with the last that many lines (-t); None: everything (-c).
    """
    follower: OutputFollower | None = None
    started = False
    try:
        while True:
            if follower is not None:
                follower.poll()
            ready, _, _ = select.select([conn.fileno()], [], [], poll)
            if not ready:
                continue
            frame = conn.recv()
            if frame.get("event") == "started":
                started = True
                follower = follower_for(job_of(frame), out, tail)
                continue
            if "event" in frame:
                continue
            job = job_of(check(frame))
            break
        if not started:
            # It ended before it could be followed (or never ran): show what it left.
            follower = follower_for(job, out, tail)
        if follower is not None and not follower.poll():
            warn(f"job {job.id}: output file {follower.path} does not exist")
        return wait_code(job)
    finally:
        if follower is not None:
            follower.close()


def follower_for(job: "JobView", out: "IO[bytes]", tail: int | None) -> OutputFollower | None:
    """A follower of the job's output file; None (with a warning) when it has none."""
    if not job.spec.store_output:
        warn(f"job {job.id} does not store its output (-n)")
        return None
    if not job.output_path:
        if job.state != "skipped":
            warn(f"job {job.id} has no output file")
        return None
    return OutputFollower(job.output_path, job.spec.gzip, out, tail, owner=job.uid)
