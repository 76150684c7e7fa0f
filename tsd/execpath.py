"""Where a job's command is found, as execvp finds it, and its posix_spawn there.

The personal daemon's supervisors start jobs with os.posix_spawn, which takes a path:
this module searches the job's PATH itself, as execvp does, in the same order, and
raises the error execvp would when nothing runs.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
from collections.abc import Mapping


def exec_candidates(cmd: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """The paths execvp tries for `cmd` with `env`'s PATH (os.defpath when it has none):
    `cmd` itself when it holds a slash; an empty PATH entry is the working directory."""
    if "/" in cmd:
        return (cmd,)
    path = env.get("PATH")
    return _candidates(os.defpath if path is None else path, cmd)


# A reused supervisor runs job after job with the same PATH and command: their list is
# built once, not per job (os.get_exec_path alone, with its warnings guard, cost a job
# more than the search). Only the list is kept: every job still asks each directory.
@functools.lru_cache(maxsize=64)
def _candidates(path: str, cmd: str) -> tuple[str, ...]:
    # f-strings, not os.path.join: as execvp, "dir/cmd", and "cmd" for an empty entry.
    return tuple(f"{d}/{cmd}" if d else cmd for d in path.split(os.pathsep))


def spawn_on_path(argv: list[str], env: dict[str, str], actions: list[tuple[object, ...]]) -> int:
    """posix_spawn argv[0] searched on env's PATH, as os.execvpe searches it."""
    tried: list[tuple[str, OSError | None]] = []
    for exe in exec_candidates(argv[0], env):
        # A missing one costs no clone; access() says so without an exception.
        if not os.access(exe, os.F_OK):
            tried.append((exe, None))  # why, asked only when nothing runs
            continue
        try:
            return os.posix_spawn(
                exe, argv, env, file_actions=actions, setpgroup=0,
                setsigmask=(), setsigdef=(signal.SIGPIPE,),
            )
        except OSError as exc:
            tried.append((exe, exc))
    # Something was tried: PATH splits into one entry at least (exec_candidates).
    errors = [exc or _why_missing(exe) for exe, exc in tried]
    # As execvp: the first failure other than "not there" (EACCES...) wins, else the last.
    for error in errors:
        if not isinstance(error, (FileNotFoundError, NotADirectoryError)):
            raise error
    raise errors[-1]


def _why_missing(path: str) -> OSError:
    """Why `path` cannot be run, found not to exist: stat's error (ENOENT, EACCES...)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
