"""A job's output files: created new by the job's own process, as its user.

The supervisor (tsd.launch, `_open_outputs`) opens them before the job starts, in
the job's child after the privilege drop or, on the personal daemon, around the
spawn: named as task-spooler names them (`ts-out.<id>.XXXXXX`) or as the user asked
(-O, -E), never an existing file, and gzip'd through a pipe to a child (-z).
"""

from __future__ import annotations

import os
import signal
import zlib

OUTPUT_PREFIX = "ts-out."
# A new file only: never one already there, nor through a symlink.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_new(path: str, flag: str) -> int:
    """A new output file, created here by the job's own process (as its user), mode 0600.

    Never an existing file: not someone else's, not the user's own, not a FIFO
    or a device, not through a symlink. Anything already at `path` means the
    job does not start, with a note saying why.
    """
    try:
        return os.open(path, _NEW_FILE, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{flag}: {path} already exists; tsd writes output only to a new file"
        ) from None


_ALPHABET = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# Random byte -> name character (b % 62), for bytes.translate: one call per name.
_NAME_CHARS = bytes(_ALPHABET[b % len(_ALPHABET)] for b in range(256))


def mkstemp(directory: str, prefix: str) -> tuple[int, str]:
    """A new output file in `directory` named `prefix` and six random letters or
    digits (task-spooler's ts-out.XXXXXX), created as `create_new` creates one: the fd
    and the path."""
    for _ in range(100):
        suffix = os.urandom(6).translate(_NAME_CHARS).decode()
        path = os.path.join(directory, prefix + suffix)
        try:
            return os.open(path, _NEW_FILE, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free output file name in {directory}")


def gzip_pipe(target: int, status_w: int) -> int:
    """A pipe whose reader, a child of the job (same user), gzips into `target`.

    It ignores SIGTERM so that ending the job's tree lets it flush a complete
    gzip file once its writers are gone.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            os.close(w)
            os.close(status_w)
            comp = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: gzip container
            while True:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                write_all(target, comp.compress(chunk))
            write_all(target, comp.flush())
        finally:
            os._exit(0)
    os.close(r)
    os.close(target)
    return w


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (a pipe may take it in parts)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
