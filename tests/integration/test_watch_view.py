"""`ts -l --watch` in a real terminal (a tmux pane) against a real personal daemon, and
into a pipe."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from integration.harness import TS, Env, Runner, queue, wait_state, wait_until

WIDTH, HEIGHT = 100, 30
PROMPT = "PROMPT$ "


class Pane:
    """A tmux server of our own (its own socket) with one interactive bash in one pane."""

    def __init__(self, env: Env) -> None:
        self.socket = str(env.root / "tmux.sock")
        self.env = {k: v for k, v in env.items() if k != "NO_COLOR"}
        # The shell's own variables, on its command line: tmux does not hand every one of
        # its client's variables (PS1 among them) to the shells it starts.
        keep = ("PATH", "TMPDIR", "XDG_STATE_HOME", "TS_SOCKET", "HOME", "USER")
        assigned = [f"{k}={v}" for k, v in self.env.items() if k in keep]
        shell = shlex.join(["env", *assigned, f"PS1={PROMPT}", "bash", "--norc", "--noprofile",
                            "-i"])
        self.tmux("new-session", "-d", "-s", "w", "-x", str(WIDTH), "-y", str(HEIGHT), shell)
        try:
            wait_until(lambda: PROMPT.strip() in self.text(), what="the shell's prompt")
        except BaseException:
            self.close()  # no tmux server left behind when the shell never came up
            raise

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-S", self.socket, *args], env=self.env, check=True, capture_output=True,
            text=True, timeout=10,
        ).stdout

    def type(self, line: str) -> None:
        self.tmux("send-keys", "-t", "w", "-l", line)
        self.tmux("send-keys", "-t", "w", "Enter")

    def key(self, key: str) -> None:
        self.tmux("send-keys", "-t", "w", key)

    def text(self, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", "-t", "w", *(["-e"] if escapes else []))

    def lines(self) -> list[str]:
        return self.text().split("\n")

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], env=self.env,
                       capture_output=True, timeout=10, check=False)


@pytest.fixture
def pane(tsd_env: Env, ts: Runner) -> Iterator[Pane]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (tests/run installs it when run as root)")
    ts("-S", "1")  # the personal daemon is up, with one slot
    p = Pane(tsd_env)
    try:
        yield p
    finally:
        p.close()


def row_of(lines: list[str], job: int) -> str | None:
    rows = [line for line in lines if line.split()[:1] == [str(job)]]
    assert len(rows) <= 1, f"job {job} is listed twice: the view scrolled\n" + "\n".join(lines)
    return rows[0] if rows else None


def state_in(pane: Pane, job: int) -> str | None:
    row = row_of(pane.lines(), job)
    return row.split()[1] if row else None


def test_watch_redraws_in_place_as_jobs_come_and_change_and_q_gives_the_shell_back(
    pane: Pane, ts: Runner, tsd_env: Env
) -> None:
    pane.type("ts -l --watch 0.5")
    wait_until(lambda: pane.lines()[0].startswith("Every 0.5s: ts -l"), what="the view")
    gate = tsd_env.tmp / "gate"
    first = queue(ts, "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    wait_state(ts, first, "running")
    second = queue(ts, "echo", "x" * 300)  # one slot: it waits; its command is wider than us
    wait_until(lambda: state_in(pane, first) == "running", what="job 1 running on screen")
    wait_until(lambda: state_in(pane, second) == "queued", what="job 2 queued on screen")
    lines = pane.lines()
    assert lines[0].startswith("Every") and lines[1].startswith("ID ")  # title, then header
    assert all(len(line) <= WIDTH for line in lines)
    long_row = row_of(lines, second)
    assert long_row is not None and len(long_row) == WIDTH  # cut at the edge...
    after = lines[lines.index(long_row) + 1]
    assert after.strip() == "" or after[0].isdigit()  # ...not wrapped onto the next line
    coloured = pane.text(escapes=True)
    assert "\x1b[32m" in coloured  # running in green, on a terminal

    gate.touch()
    wait_until(lambda: state_in(pane, first) == "finished", what="job 1 finished on screen")
    wait_until(lambda: state_in(pane, second) == "finished", what="job 2 finished on screen")
    assert pane.lines()[0].startswith("Every")  # still the same screen, redrawn in place

    pane.key("q")
    wait_until(lambda: "Every" not in pane.text(), what="the view to close")
    wait_until(lambda: pane.text().rstrip().endswith(PROMPT.rstrip()), what="the prompt back")
    # The terminal's modes are back: line editing (icanon) and echo.
    pane.type("stty -a | tr ' ;' '\\n\\n' | grep -xE -- '-?(icanon|echo)' | paste -sd,")
    wait_until(lambda: "icanon,echo" in pane.text() or "echo,icanon" in pane.text(),
               what="stty to show icanon and echo", timeout=5)
    assert "-icanon" not in pane.text() and "-echo," not in pane.text()


def test_no_color_and_ctrl_c_leave_the_view_plain_and_the_terminal_restored(
    pane: Pane, ts: Runner, tsd_env: Env
) -> None:
    gate = tsd_env.tmp / "gate"
    job = queue(ts, "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    wait_state(ts, job, "running")
    pane.type("NO_COLOR=1 ts -l --watch")
    wait_until(lambda: state_in(pane, job) == "running", what="the running job on screen")
    assert "\x1b[32m" not in pane.text(escapes=True)
    pane.key("C-c")
    wait_until(lambda: pane.text().rstrip().endswith(PROMPT.rstrip()), what="the prompt back")
    pane.type("echo rc=$?")
    wait_until(lambda: "rc=130" in pane.text(), what="exit status 130 after Ctrl-C")
    gate.touch()


def test_watch_into_a_pipe_prints_plain_tables_without_escape_codes(
    ts: Runner, tsd_env: Env
) -> None:
    job = queue(ts, "true")
    ts("-w", str(job))
    proc = subprocess.Popen([TS, "-l", "--watch", "0.2"], env=dict(tsd_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    proc.terminate()
    out, err = proc.communicate(timeout=10)
    text = out.decode()
    assert "\x1b" not in text and err == b""
    assert text.count("ID   State") >= 3  # a table per interval
    assert f"\n{job}    finished" in text


def test_watch_into_a_closed_pipe_stops_quietly(ts: Runner, tsd_env: Env) -> None:
    proc = subprocess.run(f"{TS} -l --watch 0.1 | head -n 1", shell=True, env=dict(tsd_env),
                          capture_output=True, text=True, timeout=20)
    assert proc.stdout.startswith("ID ") and proc.stderr == ""
