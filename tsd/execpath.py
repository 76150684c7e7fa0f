"""A job's command started by posix_spawn, found on the job's PATH as execvp finds it.

The personal daemon's supervisors start jobs with posix_spawnp: glibc searches PATH
in the spawned child, trying each directory with execve as execvp does (the same
order, an empty entry being the working directory, EACCES reported when nothing ran
and some entry could not be run, ENOENT otherwise), so the supervisor makes no call
per directory itself. glibc reads PATH from the caller's environment, not from the
one the job is given: the supervisor's own PATH is set to the job's first (it runs
nothing else that reads it).
"""

from __future__ import annotations

import functools
import os
import signal

from tsd import cpupolicy

_UNSET = object()
_path_now: object = _UNSET  # the PATH this process's environment holds, as set here


def _use_path(path: str | None) -> None:
    """This process's PATH becomes `path` (none at all for None, which has glibc
    search its default, as execvp does for a job without PATH)."""
    global _path_now
    if path == _path_now:
        return
    if path is None:
        os.unsetenv("PATH")
    else:
        os.putenv("PATH", path)
    _path_now = path


def spawn_on_path(argv: list[str], env: dict[str, str]) -> int:
    """posix_spawn argv[0] searched on env's PATH, as execvp searches it, with this
    process's fds 0-2 (the caller puts the job's there); the job's pid, or the OSError
    execvp would have met (FileNotFoundError when nothing was found). The job runs
    with the CPU policy the supervisor started with (tsd.cpupolicy)."""
    _use_path(env.get("PATH"))
    # No file actions: glibc checks each one's fds against RLIMIT_NOFILE, a getrlimit
    # call per fd, five a job for stdin and two dup2s.
    spawn = functools.partial(
        os.posix_spawnp, argv[0], argv, env, setpgroup=0, setsigmask=(),
        setsigdef=(signal.SIGPIPE,),
    )  # fmt: skip
    policy = cpupolicy.for_jobs()
    # Left out rather than None: CPython 3.11's posix_spawnp refuses scheduler=None.
    return spawn() if policy is None else spawn(scheduler=policy)
