"""`ts -l --watch [sec]`: the job list, live.

On a terminal the list is redrawn in place (cursor home, each line cut to the
terminal's width and cleared to its end, the rest of the screen cleared) on
the terminal's alternate screen, so that quitting gives back the screen as it
was, like top or less. The keyboard is read without waiting for Enter; `q`
quits, Ctrl-C too, and the terminal's modes are restored whatever ends the
view. Lines are coloured by state unless NO_COLOR is set.

Not on a terminal (a pipe, a file) it prints the plain table every interval,
with no escape code at all, until the reader goes away or Ctrl-C.

The list is asked for every interval; a frame is written only when it
differs from the one on the screen, or the terminal was resized.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a few ms at import and is needed only by mypy
    from collections.abc import Iterator, Mapping
    from typing import Any, TextIO

    from tsd.client import Client

    Request = dict[str, Any]  # a request as it travels (tsd.cli_request.wire)

ESC = "\x1b["
ALT_SCREEN_ON, ALT_SCREEN_OFF = f"{ESC}?1049h", f"{ESC}?1049l"
CURSOR_OFF, CURSOR_ON = f"{ESC}?25l", f"{ESC}?25h"
WRAP_OFF, WRAP_ON = f"{ESC}?7l", f"{ESC}?7h"
HOME, CLEAR_LINE, CLEAR_BELOW = f"{ESC}H", f"{ESC}K", f"{ESC}J"
RESET = f"{ESC}0m"
# SGR colours by the State column's word.
COLOURS = {
    "running": f"{ESC}32m",  # green
    "running(idle)": f"{ESC}35m",  # magenta: GPUs held, not used
    "queued": f"{ESC}33m",  # yellow
    "allocating": f"{ESC}33m",
    "held": f"{ESC}36m",  # cyan
    "skipped": f"{ESC}2m",  # dim
}
FAILED = f"{ESC}31m"  # red: finished with a non-zero E-Level


def colour_of(line: str, show_user: bool) -> str:
    """The colour of one row of `ts -l`, from its State (and E-Level) column; "" for none."""
    words = line.split()
    at = 2 if show_user else 1
    if len(words) <= at:
        return ""
    state = words[at]
    if state == "finished":
        level = words[at + 2] if len(words) > at + 2 else ""
        return FAILED if level.lstrip("-").isdigit() and level != "0" else ""
    return COLOURS.get(state, "")


def frame(text: str, width: int, height: int, colour: bool, show_user: bool,
          title: str) -> str:
    """One screenful: `title`, then the table, every line cut to `width`, at most `height`."""
    lines = [title, *text.rstrip("\n").split("\n")]
    if len(lines) > height:
        more = len(lines) - height + 1
        lines = [*lines[: height - 1], f"... {more} more lines (a taller window shows them)"]
    out = [HOME]
    for i, line in enumerate(lines):
        cut = line[:width]
        paint = colour_of(line, show_user) if colour and i > 1 else ""
        # A full line leaves the cursor on its last character, which erasing to the end
        # of the line would take away: only shorter lines need the rest cleared.
        clear = CLEAR_LINE if len(cut) < width else ""
        out.append(f"{paint}{cut}{RESET if paint else ''}{clear}")
        out.append("\r\n" if i < len(lines) - 1 else "")
    if len(lines) < height:
        # From the start of the next line: the last line may be full (see above), and a
        # screen already filled to the bottom has nothing left below to clear.
        out.append("\r\n" + CLEAR_BELOW)
    return "".join(out)


@contextlib.contextmanager
def _keyboard(fd: int | None) -> Iterator[None]:
    """Keys without Enter (cbreak: Ctrl-C still interrupts), echo off; restored at the end."""
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _screen(out: TextIO) -> Iterator[None]:
    out.write(ALT_SCREEN_ON + CURSOR_OFF + WRAP_OFF)
    out.flush()
    try:
        yield
    finally:
        out.write(WRAP_ON + CURSOR_ON + ALT_SCREEN_OFF)
        out.flush()


def _listing(client: Client, request: Request, all_users: bool, width: int | None) -> str:
    from tsd.cli_output import listing_text

    return listing_text(client.call(request), "default", all_users, width=width)


def watch(client: Client, request: Request | None, all_users: bool, every: float,
          environ: Mapping[str, str]) -> int:
    """Show the list until q, Ctrl-C or a closed pipe; the exit code."""
    assert request is not None
    out = sys.stdout
    if not out.isatty():
        return _plain(client, request, all_users, every)
    colour = not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"
    key_fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    resized = [True]

    def on_resize(_sig: int, _frame: object) -> None:
        resized[0] = True

    old = signal.signal(signal.SIGWINCH, on_resize)
    shown = ""
    try:
        with _keyboard(key_fd), _screen(out):
            while True:
                size = os.get_terminal_size(out.fileno())
                title = f"Every {every:g}s: ts -l{' -A' if all_users else ''}" \
                        f"   {time.strftime('%H:%M:%S')}   (q quits)"
                text = _listing(client, request, all_users, size.columns)
                screen = frame(text, size.columns, size.lines, colour, all_users, title)
                if screen != shown or resized[0]:
                    out.write(screen)
                    out.flush()
                    shown, resized[0] = screen, False
                if _quit_pressed(key_fd, every):
                    return 0
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGWINCH, old)


def _quit_pressed(fd: int | None, timeout: float) -> bool:
    """Wait up to `timeout` for a key; True for q (or EOF). Other keys redraw at once."""
    if fd is None:
        time.sleep(timeout)
        return False
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return False
    key = os.read(fd, 32)
    return not key or b"q" in key.lower()


def _plain(client: Client, request: Request, all_users: bool, every: float) -> int:
    """Not a terminal: the plain table every interval, a blank line between two."""
    from tsd.cli_output import emit

    first = True
    try:
        while True:
            emit(("" if first else "\n") + _listing(client, request, all_users, None))
            first = False
            time.sleep(every)
    except KeyboardInterrupt:
        return 130
