"""The daemon's end of the spawner (tsd.spawner): supervisors forked by a small process.

`SpawnerLauncher` is the runner's launcher (tsd.runner.Launcher). It starts the
spawner with exec at the daemon's start, sends it each job's plan and fds, and
gets back the supervisor's pid, start time and a pidfd. Losing the spawner
loses no job: the supervisors it forked are on their own already (setsid'd,
watched by pidfd), a request it did not answer is sent to a new spawner, and
when spawners keep failing the daemon forks supervisors itself (tsd.launch.spawn)
for a while.

A request the spawner may have acted on without answering (it died, or hung
past the timeout, between fork and reply) may have left a supervisor the daemon
knows nothing of, waiting on that request's go pipe: the daemon tells it to quit
(tsd.launch.QUIT) rather than closing the pipe, which it would take for an
aborted start and report so, in the job's name, while the job runs elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from tsd import launch, spawner
from tsd.supervisorpool import Member, SupervisorPool

log = logging.getLogger("tsd")

_T = TypeVar("_T")

STARTUP_TIMEOUT = 30.0  # seconds for a new spawner to load (python, tsd.launch), on a busy machine
REPLY_TIMEOUT = 5.0  # seconds for one fork, on a busy machine
BACKOFF = 60.0  # seconds of forking from the daemon after a spawner failed twice in a row
# -I: no environment variables, no user site, no current directory on the path;
# -S: no site-packages either: the spawner imports tsd (from where this daemon's
# came) and the standard library, nothing else.
START = "import sys; sys.path.insert(0, sys.argv[1]); import tsd.spawner as s; s.main(sys.argv)"


class SpawnerGone(Exception):
    """The spawner did not answer: it died, or hung."""


class SpawnerLauncher:
    """tsd.runner.Launcher through the spawner; tsd.launch.spawn when there is none."""

    def __init__(self, python: str | None = None, reply_timeout: float = REPLY_TIMEOUT) -> None:
        self.python = python or sys.executable
        self.reply_timeout = reply_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready = False  # the spawner said READY
        self._lock = threading.Lock()
        self._failures = 0  # spawners lost since the last answered request
        self._not_before = 0.0  # monotonic time before which no spawner is started
        self.pool = SupervisorPool()  # reused supervisors (plans with `reuse`)

    @property
    def spawner_pid(self) -> int | None:
        """The running spawner's pid, None when there is none."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the spawner now, so that the first job does not wait for its start."""
        with self._lock:
            self._ensure()

    def close(self) -> None:
        """Stop the spawner (at the daemon's stop). Supervisors keep running."""
        with self._lock:
            proc, sock = self._proc, self._sock
            self._proc = self._sock = None
            self.pool.close()
        if sock is not None:
            sock.close()  # end of file: the spawner exits
        if proc is not None:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def start_time(self, pid: int) -> int | None:
        """The pid's kernel start time, None when it is gone."""
        return launch.proc_start_time(pid)

    def spawn(self, plan: launch.LaunchPlan) -> launch.Launched:
        """A reused supervisor for a plan with `reuse` (idle, or forked by the spawner);
        else have the spawner fork the supervisor (it waits for go); fork it here
        without a spawner."""
        if plan.reuse:
            member = self.pool.take() or self._through_spawner(
                functools.partial(self._new_member, exits_dir=plan.exits_dir))
            if member is not None:
                return self.pool.launched(member, plan)
        launched = self._through_spawner(lambda sock: self._ask(sock, plan))
        return launched if launched is not None else launch.spawn(plan)

    def ahead_room(self, window: float) -> int:
        """How many reused supervisors would take a job ahead now (tsd.ahead)."""
        return self.pool.ahead_room(window)

    def behind(self) -> set[int]:
        """Jobs sent ahead that hold no slot yet (tsd.supervisorpool)."""
        return self.pool.behind()

    def forget_behind(self, job_id: int) -> None:
        """A job sent ahead was given back."""
        self.pool.forget_behind(job_id)

    def take_ahead(self, window: float) -> tuple[Member, float] | None:
        """A reused supervisor for a job sent ahead, and its deadline (tsd.ahead)."""
        return self.pool.take_ahead(window)

    def spawn_on(self, member: Member, plan: launch.LaunchPlan) -> launch.Launched:
        """The plan on that supervisor (taken by take_ahead)."""
        return self.pool.launched(member, plan)

    def _through_spawner(self, ask: Callable[[socket.socket], _T]) -> _T | None:
        """`ask` the spawner (a new one when it failed once); None without a spawner."""
        with self._lock:
            for _ in range(2):
                sock = self._ensure()
                if sock is None:
                    break
                try:
                    answer = ask(sock)
                except SpawnerGone as exc:
                    self._lost(str(exc))
                    continue
                self._failures = 0
                return answer
        return None

    def _new_member(self, sock: socket.socket, exits_dir: str) -> Member:
        """A new reused supervisor, forked by the spawner, linked to this daemon; it
        leaves its mark in `exits_dir` should this daemon die (tsd.spawner.run_member)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._await_ready(sock)
            pid, start, pidfd = self._request(
                sock, spawner.member_request(exits_dir), [theirs.fileno()])
        except BaseException:
            ours.close()  # a supervisor forked all the same exits at its end of file
            raise
        finally:
            theirs.close()
        os.close(pidfd)
        return self.pool.add(pid, start, ours)

    def _ensure(self) -> socket.socket | None:
        if self._sock is not None:
            return self._sock
        if time.monotonic() < self._not_before:
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        root = os.path.dirname(os.path.dirname(os.path.abspath(launch.__file__)))
        try:
            self._proc = subprocess.Popen(
                [self.python, "-I", "-S", "-c", START, root, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, cwd="/", env={},
            )
        except OSError as exc:
            ours.close()
            self._not_before = time.monotonic() + BACKOFF
            log.warning("spawner not started (%s); the daemon forks supervisors itself", exc)
            return None
        finally:
            theirs.close()
        self._sock, self._ready = ours, False
        return ours

    def _lost(self, why: str) -> None:
        """The spawner failed a request: end it, and start another one or back off."""
        proc, sock = self._proc, self._sock
        self._proc = self._sock = None
        if sock is not None:
            sock.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()  # by its pid: our own child, not yet reaped
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        self._failures += 1
        if self._failures >= 2:
            self._failures = 0
            self._not_before = time.monotonic() + BACKOFF
        pid = proc.pid if proc is not None else "?"
        log.warning("spawner (pid %s) lost: %s", pid, why)

    def _await_ready(self, sock: socket.socket) -> None:
        """Wait for a new spawner's READY: its start does not count as a hung request."""
        if self._ready:
            return
        sock.settimeout(STARTUP_TIMEOUT)
        try:
            word = sock.recv(len(spawner.READY))
        except OSError as exc:
            raise SpawnerGone(f"it did not start: {exc or type(exc).__name__}") from exc
        if word != spawner.READY:
            raise SpawnerGone("it did not start")
        sock.settimeout(self.reply_timeout)
        self._ready = True

    def _ask(self, sock: socket.socket, plan: launch.LaunchPlan) -> launch.Launched:
        self._await_ready(sock)
        go_r, go_w = os.pipe()
        rep_r, rep_w = os.pipe()
        fds = [go_r, rep_w, *(plan.out_fds or ())]
        try:
            pid, start, pidfd = self._request(sock, spawner.encode(plan), fds)
        except BaseException:
            # Perhaps a supervisor was forked for this request all the same: it must go
            # away quietly, not report the job as never started.
            with contextlib.suppress(OSError):
                os.write(go_w, launch.QUIT)
            os.close(go_w)
            os.close(rep_r)
            raise
        finally:
            os.close(go_r)  # the supervisor has its own copies now
            os.close(rep_w)
        return launch.launched(
            pid, start, go_w, rep_r, wait=lambda: launch.wait_pidfd(pidfd), pidfd=pidfd,
            keep_go=launch.acks_end(plan),
        )

    def _request(
        self, sock: socket.socket, data: bytes, fds: list[int]
    ) -> tuple[int, int | None, int]:
        """Send one request; its answer: pid, start time, pidfd."""
        got: list[int] = []
        try:
            spawner.send_with_fds(sock, data, fds)
            reply, ancdata, _, _ = sock.recvmsg(
                spawner.REPLY.size, spawner.fds_space(), socket.MSG_CMSG_CLOEXEC
            )
            got = spawner.received_fds(ancdata)
            while reply and len(reply) < spawner.REPLY.size:
                more = sock.recv(spawner.REPLY.size - len(reply))
                if not more:
                    break
                reply += more
        except OSError as exc:  # the timeout included
            _close(got)
            raise SpawnerGone(str(exc) or type(exc).__name__) from exc
        if len(reply) < spawner.REPLY.size:
            _close(got)
            raise SpawnerGone("it closed the connection")
        pid, start = spawner.REPLY.unpack(reply)
        if pid <= 0:
            _close(got)
            raise OSError(-pid, f"cannot start a supervisor: {os.strerror(-pid)}")
        if len(got) != 1:
            _close(got)
            raise SpawnerGone(f"it answered with {len(got)} pidfds")
        return pid, None if start < 0 else start, got[0]


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
