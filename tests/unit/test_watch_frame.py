"""`ts -l --watch`: its command line and the screenful it draws (tsd.cli_watch)."""

from __future__ import annotations

import re

import pytest

from tsd.cli_options import UsageError
from tsd.cli_request import invocation
from tsd.cli_watch import COLOURS, FAILED, frame

TABLE = (
    "ID   State      Output               E-Level  Time   GPUs  Command [run=1/4]\n"
    "3    running    /tmp/ts-out.3.abcdef          1.00s 0     python train.py --epochs 100\n"
    "4    queued     (file)                              -     sleep 10\n"
    "1    finished   /tmp/ts-out.1.abcdef 2         0.01s -     false\n"
    "2    finished   /tmp/ts-out.2.abcdef 0         0.01s -     true\n"
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def visible_lines(screen: str) -> list[str]:
    lines = [ANSI.sub("", line) for line in screen.split("\r\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def test_every_line_is_cut_to_the_width_never_wrapped() -> None:
    screen = frame(TABLE, 40, 50, colour=False, show_user=False, title="Every 1s: ts -l")
    lines = visible_lines(screen)
    assert len(lines) == 6
    assert all(len(line) <= 40 for line in lines)
    assert lines[2] == TABLE.splitlines()[1][:40]


def test_redrawn_in_place_home_then_each_line_cleared_then_the_rest() -> None:
    screen = frame(TABLE, 120, 50, colour=False, show_user=False, title="t")
    assert screen.startswith("\x1b[H") and screen.endswith("\r\n\x1b[J")
    assert screen.count("\x1b[K") == 6
    # A line as wide as the screen leaves the cursor on its last character: no erase there.
    full = frame(TABLE, 40, 50, colour=False, show_user=False, title="t")
    assert full.count("\x1b[K") == 1  # only the short title
    assert "\x1b[2J" not in screen  # no full clear: no flicker


def test_colours_by_state_only_when_asked() -> None:
    plain = frame(TABLE, 120, 50, colour=False, show_user=False, title="t")
    assert "\x1b[3" not in plain
    screen = frame(TABLE, 120, 50, colour=True, show_user=False, title="t").split("\r\n")
    assert screen[2].startswith(COLOURS["running"])
    assert screen[3].startswith(COLOURS["queued"])
    assert screen[4].startswith(FAILED)  # E-Level 2
    assert not screen[5].startswith("\x1b[3")  # E-Level 0: plain
    assert not screen[1].startswith("\x1b[3")  # the header


def test_a_short_window_shows_what_fits_and_says_how_much_more() -> None:
    lines = visible_lines(frame(TABLE, 80, 4, colour=False, show_user=False, title="t"))
    assert len(lines) == 4
    assert lines[-1].startswith("... 3 more lines")


def test_watch_takes_an_interval_and_refuses_json_and_a_command() -> None:
    inv = invocation(["-l", "--watch", "2"])
    assert inv.action == "list" and inv.params["watch"] == 2.0
    assert invocation(["--watch"]).params["watch"] == 1.0
    assert invocation(["-A", "--watch=0.5"]).all_users
    with pytest.raises(UsageError, match="does not go with -M"):
        invocation(["--watch", "-M", "json"])
    with pytest.raises(UsageError, match="takes no command"):
        invocation(["--watch", "2", "sleep", "5"])
    with pytest.raises(UsageError, match="not a number of seconds"):
        invocation(["--watch", "sleep"])
    with pytest.raises(UsageError, match=re.escape("0.1<=x<=3600")):
        invocation(["--watch=0"])
