"""The personal daemon's reused supervisors, linked to it directly.

A reused supervisor (tsd.spawner.run_member) is forked once by the spawner and
then kept: the daemon holds one end of a socketpair (its link) and hands it
each job there, once the job is stored as running: the job's plan and GO in
one message, with the job's report pipe (and ts -n's output fds) beside it. The
supervisor starts the job as soon as it reads that, with no spawner and no
round trip in between; a launch not stored (rolled back) sends nothing. After
the job (at once when its end was ACKed, see below) the supervisor is idle and
waits for the next one; when the daemon lets it go (BYE) or is gone (the link's
end of file) it exits, once the job it runs, if any, is over.

The plan waits in the daemon for the commit, rather than going ahead of its GO,
so that a supervisor wakes once for a job, not once for the plan and again for
its GO. The cost is in a crash between the commit and the send: the job is
recorded as running on a supervisor that never got it. A supervisor that finds
its daemon gone without a BYE while idle leaves a mark saying so
(tsd.exitreport.mark_idle), and the next daemon queues such a job again
(tsd.runend), as it does a job whose supervisor never heard its GO.

A supervisor that waits for its report's ACK (tsd.launch.acks_end) reads it on
the link too (Launched.answer); its turn ends with the ACK, and it says IDLE
only after a NAK (once its report file is written). Once its report is in
(Launched.ending), it is the first choice for the next job: the next job is
given to it ahead of the ACK, and the ACK goes with that job's plan and GO
(the same commit holds both the end and the start), in one message, read by the
supervisor in order: one process wakes for the end and the next start.
Otherwise an idle supervisor is taken (a new one when none is: the pool grows
to a few more than the jobs that run at once).

A job may also be sent ahead to a supervisor whose short job runs (tsd.ahead): it
starts it at that job's end, before a deadline, or gives it back, and reads the
answer to that end while the job sent ahead runs (tsd.spawner.run_member).

Signals: a supervisor drops the signals still pending from its previous job
(a ts -k that crossed that job's end) when it reads the next job, so the runner
sends none for a job before its "pid" line (tsd.runner holds them until then).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from dataclasses import dataclass

from tsd import exitreport, launch, spawner

MAX_IDLE = 32  # idle supervisors kept for good; more are let go after a burst...
# ...once idle this long: within a burst the pool is what the running jobs and the
# ends not yet committed need (a supervisor waits for its end's ACK), and one let go
# at a lull would be forked again at the next (with the loop waiting for the fork).
IDLE_KEEP = 30.0


@dataclass
class Member:
    """A reused supervisor as the daemon knows it."""

    pid: int
    start: int | None
    link: socket.socket
    busy: int = 0  # jobs sent whose turn is not over yet (no IDLE or ACK since)
    taken: bool = True  # chosen for a job not sent or aborted yet (a new one is, at once)
    idle_since: float = 0.0  # monotonic time its last turn ended (`turns_over`)
    ending: bool = False  # its one job's end came, its answer is due (Launched.ending)
    held: bytes = b""  # that answer, kept to go out with its next job (or alone at its abort)
    ahead_taken: bool = False  # chosen for a job sent ahead (tsd.ahead), not sent yet
    unanswered: int = 0  # jobs whose end came and was not answered yet
    behind: int | None = None  # a job sent ahead whose job before it has not ended: no slot
    acks_last: bool = True  # the last job sent to it reports its end on the pipe (acks_end)
    running_since: float = 0.0  # monotonic time the job it runs began (about)
    last_run: float | None = None  # how long its last job ran, end to end (about)

    def turns_over(self, count: int = 1) -> None:
        """`count` of the jobs sent to it are over: it said IDLE for each, or their end
        was ACKed (it says no IDLE after an ACK)."""
        self.busy -= count
        self.idle_since = time.monotonic()

    def ahead_deadline(self, window: float, now: float) -> float | None:
        """The deadline of a job sent ahead to it now (tsd.ahead), None when it takes
        none: it takes one when its last job ran less than half `window`, the last job
        sent to it reports its end on the pipe, it runs one job (besides those whose
        end came, not answered yet) begun less than that ago or is taken for its next
        one in this same turn (take()), and it has no other job sent or taken ahead.
        The deadline is that job's start plus `window`."""
        if (self.ahead_taken or not self.acks_last or self.last_run is None
                or self.last_run >= window / 2):  # fmt: skip
            return None
        if self.taken:  # its next job goes out in this turn, before this one
            return now + window
        if self.busy - self.unanswered == 1 and now - self.running_since < window / 2:
            return self.running_since + window
        return None

    @property
    def free(self) -> bool:
        """Idle: every job sent to it is over (IDLE said, or ACK sent), and it is not
        taken."""
        return not self.taken and self.busy == 0

    @property
    def next_up(self) -> bool:
        """It may take the next job ahead of the answer to its job's end."""
        return self.ending and not self.taken and self.busy == 1


class SupervisorPool:
    """The daemon's reused supervisors: which is free, and handing one a job."""

    def __init__(self) -> None:
        self._members: dict[int, Member] = {}  # link fd -> member
        self._epoll = select.epoll()

    def add(self, pid: int, start: int | None, link: socket.socket) -> Member:
        """A supervisor just forked on `link`, taken for a job at once."""
        member = Member(pid, start, link)
        self._members[link.fileno()] = member
        self._epoll.register(link.fileno(), select.EPOLLIN)
        return member

    def idle(self) -> int:
        """How many supervisors are free now."""
        self._hear()
        return sum(1 for m in self._members.values() if m.free)

    def take(self) -> Member | None:
        """A supervisor for a job, now taken: one whose job just ended (it wakes for the
        answer anyway), else an idle one; None when there is neither."""
        self._hear()
        chosen = next((m for m in self._members.values() if m.next_up), None) or next(
            (m for m in self._members.values() if m.free), None)
        if chosen is not None:
            chosen.taken = True
            chosen.ending = False
        return chosen

    def ahead_room(self, window: float) -> int:
        """How many supervisors would take a job ahead now (`take_ahead`); the links
        are read first, once for the turn's take_ahead calls."""
        self._hear()
        now = time.monotonic()
        return sum(m.ahead_deadline(window, now) is not None for m in self._members.values())

    def behind(self) -> set[int]:
        """The jobs sent ahead whose job before them has not ended: recorded as running,
        they hold no slot yet (that job does)."""
        return {m.behind for m in self._members.values() if m.behind is not None}

    def forget_behind(self, job_id: int) -> None:
        """A job sent ahead was given back: it is nobody's."""
        for member in self._members.values():
            if member.behind == job_id:
                member.behind = None

    def take_ahead(self, window: float) -> tuple[Member, float] | None:
        """A supervisor to send a job ahead to (tsd.ahead), now taken for it, and the
        deadline (Member.ahead_deadline); None when none takes one."""
        now = time.monotonic()
        for member in self._members.values():
            until = member.ahead_deadline(window, now)
            if until is not None:
                member.ahead_taken = True
                return member, until
        return None

    def _hear(self) -> None:
        """Read what the links said: IDLE, or end of file (that supervisor is gone)."""
        for fd, _ in self._epoll.poll(0):
            member = self._members.get(fd)
            if member is None:
                continue
            try:
                said = member.link.recv(64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                said = b""
            if not said or said.strip(spawner.IDLE) or len(said) > member.busy:
                self.drop(member)  # gone, or said what a supervisor never says
                continue
            member.turns_over(len(said))
        free = [m for m in self._members.values() if m.free]
        if len(free) > MAX_IDLE:
            now = time.monotonic()
            for extra in free[MAX_IDLE:]:  # the newest: take() prefers the oldest
                if now - extra.idle_since >= IDLE_KEEP:
                    self.drop(extra)

    def drop(self, member: Member) -> None:
        """Let a supervisor go: told BYE, it exits once its job (if any) is over. One
        taken for a job not sent yet is told nothing: that job may be recorded as
        running on it, and the end of file alone has it leave its idle mark."""
        if self._members.pop(member.link.fileno(), None) is not None:
            self._epoll.unregister(member.link.fileno())
            if not member.taken:
                with contextlib.suppress(OSError):
                    member.link.send(spawner.BYE, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        member.link.close()

    def close(self) -> None:
        """Let every supervisor go (the daemon stops): jobs running finish on their own."""
        for member in list(self._members.values()):
            self.drop(member)
        self._epoll.close()

    def launched(self, member: Member, plan: launch.LaunchPlan) -> launch.Launched:
        """The job of `plan` on `member`: go() sends its plan and GO (and it runs; a
        member gone by then has the job queued again), abort() gives the member back
        with nothing sent. The caller may close its ts -n fds once this returns."""
        body = spawner.NEXT + spawner.encode(plan)

        def release() -> None:  # what take() or take_ahead() took it for is over
            if plan.ahead_until is None:
                member.taken = False
            else:
                member.ahead_taken = False

        made: list[int] = []
        try:
            made.extend(os.pipe())
            made.extend(os.dup(fd) for fd in plan.out_fds or ())
        except OSError:  # out of fds: the member stays free, the job queued (tsd.runner)
            release()
            for fd in made:
                os.close(fd)
            raise
        rep_r, rep_w, *out_fds = made
        acks = launch.acks_end(plan)
        # A job sent ahead goes behind one whose end comes on the pipe (`ending` below
        # says when that job is over); TS_ONFINISH or mail end it through the file.
        member.acks_last = acks
        if plan.ahead_until is not None:
            member.behind = plan.job_id

        def let_go() -> None:
            release()
            member.held = b""
            for fd in (rep_w, *out_fds):
                os.close(fd)

        def go() -> None:
            try:
                if member.link.fileno() < 0:
                    raise OSError("the supervisor was let go")
                # The answer to its previous job's end after the plan: the supervisor
                # keeps the plan (and the GO) while it waits for that answer.
                spawner.send_with_fds(member.link, body + member.held + launch.GO,
                                      [rep_w, *out_fds])  # fmt: skip
                if member.busy == 0:  # it starts it now (a job sent ahead: at its end)
                    member.running_since = time.monotonic()
                member.busy += 1  # over at the ACK of its end, or at its IDLE
            except OSError:
                # It died since it was taken, or was let go (the daemon stops): the job
                # never ran. Say so on its report pipe and in its report file, as a
                # supervisor cut off before its GO would, so that this daemon, or the
                # next one, queues it again.
                self.drop(member)
                with contextlib.suppress(OSError):
                    os.write(rep_w, f"end {exitreport.encode(exitreport.ABORTED)}\n".encode())
                with contextlib.suppress(OSError):
                    exitreport.write(plan.exits_dir, plan.job_id, exitreport.ABORTED)
            finally:
                let_go()

        def abort() -> None:
            if member.behind == plan.job_id:
                member.behind = None
            word = member.held
            let_go()
            if word:
                with contextlib.suppress(OSError):  # gone: it waits for nothing
                    member.link.send(word, socket.MSG_NOSIGNAL)

        def ending() -> None:
            now = time.monotonic()
            member.last_run = now - member.running_since
            member.running_since = now  # a job sent ahead starts now (or goes back)
            member.behind = None
            member.ending = True
            member.unanswered += 1

        def answer(word: bytes | None) -> bool:
            member.ending = False
            if word is None:
                return True  # it waits for nothing: it sent no end to answer
            member.unanswered = max(0, member.unanswered - 1)  # (a NAK to no end: none)
            if (member.taken or member.ahead_taken) and member.link.fileno() >= 0:
                # Its next job is chosen, and that job's plan and GO (or its abort) follow
                # this answer in the same commit: one message, and the supervisor wakes
                # once for both. (Should the link break first, it is gone or the daemon
                # stops: then it writes its report file, as without an ACK.)
                member.held += word
            else:
                try:
                    member.link.send(word, socket.MSG_NOSIGNAL)
                except OSError:
                    return False
            if word == launch.ACK:
                member.turns_over()
            return True

        os.set_blocking(rep_r, False)
        return launch.make_launched(
            member.pid, member.start, go, abort, rep_r, pidfd=None,
            answer=answer if acks else None, ending=ending if acks else None,
        )
