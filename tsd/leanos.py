"""The few os and os.path calls `ts` makes, on the posix module underneath them.

`import os` costs every `ts` call about 0.9 ms here (a tenth of a quick call):
os loads _collections_abc, whose two dozen abstract classes are built at import.
The client needs only the environment, a few path tests and joins, so it asks
posix (built into the interpreter) directly through this module. Everything
else in tsd uses os as usual.
"""

# No `from __future__ import annotations` here: this module is on the way of
# `ts COMMAND` (tsd.plainsubmit), and that import loads __future__ (0.12 ms of each
# call). Annotations that name what only mypy imports are strings instead.

import posix
import sys

# _stat, not stat: stat is frozen into the interpreter, but its body still defines a
# hundred names around _stat's, 25-75 us of a ts call for the three it needs.
from _stat import S_ISDIR

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

_environ: dict[str, str] | None = None


def environ() -> dict[str, str]:
    """The process environment as os.environ has it (str, decoded as os decodes it).

    Once os is loaded (a test, the daemon), its environ is the live one, changed
    by putenv calls that posix's copy at start does not see: that one is used.
    """
    global _environ
    os_module = sys.modules.get("os")
    if os_module is not None:
        return os_module.environ  # type: ignore[no-any-return]
    if _environ is None:
        encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
        _environ = {
            key.decode(encoding, errors): value.decode(encoding, errors)
            for key, value in posix.environ.items()
        }
    return _environ


def join(first: str, *rest: str) -> str:
    """os.path.join for str paths: a part that starts with / starts over."""
    path = first
    for part in rest:
        if part.startswith("/") or not path:
            path = part
        elif path.endswith("/"):
            path += part
        else:
            path += "/" + part
    return path


def dirname(path: str) -> str:
    """os.path.dirname: everything before the last /, trailing slashes dropped
    unless that is all there is."""
    head = path[: path.rfind("/") + 1]
    if head and head != "/" * len(head):
        head = head.rstrip("/")
    return head


def normpath(path: str) -> str:
    """os.path.normpath: no empty or . parts, each .. takes the part before it away."""
    if not path:
        return "."
    # POSIX leaves a path that starts with exactly two slashes to the implementation.
    lead = 2 if path.startswith("//") and not path.startswith("///") else int(path[0] == "/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part != ".." or (not lead and not parts) or (parts and parts[-1] == ".."):
            parts.append(part)
        elif parts:
            parts.pop()
    return "/" * lead + "/".join(parts) or "."


def abspath(path: str) -> str:
    """os.path.abspath: normalized, relative to the working directory."""
    if not path.startswith("/"):
        path = join(posix.getcwd(), path)
    return normpath(path)


def exists(path: str) -> bool:
    """os.path.exists: stat (following links) succeeds."""
    return _succeeds(posix.stat, path)


def lexists(path: str) -> bool:
    """os.path.lexists: there is an entry, even a dangling link."""
    return _succeeds(posix.lstat, path)


def _succeeds(call: "Callable[[str], object]", path: str) -> bool:
    try:
        call(path)
    except (OSError, ValueError):  # ValueError: a NUL in the path, as genericpath says
        return False
    return True


def isdir(path: str) -> bool:
    """os.path.isdir: stat (following links) says directory."""
    try:
        return S_ISDIR(posix.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def getcwd() -> str | None:
    """The current directory, or None when it cannot be read (removed, no permission)."""
    try:
        return posix.getcwd()
    except OSError:
        return None


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is put straight back)."""
    mask = posix.umask(0o022)
    posix.umask(mask)
    return mask


def exit_now(code: int) -> "NoReturn":
    """End the process with `code` once stdout and stderr are flushed, without tearing
    the interpreter down module by module (a tenth of a quick `ts` call): for a `ts`
    that is done, every connection and file closed."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    posix._exit(code)
