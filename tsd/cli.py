"""`ts`: GPU Task Spooler's command line on top of the tsd daemon.

Option parsing follows task-spooler (POSIX getopt with "+"): options come
first and the first word that is not an option starts the command, so
`ts -L x python train.py --lr 3` queues `python train.py --lr 3`. Options
whose value is optional (`-t [id]`, `-S [num]`, `-G [num]`, `-g [id,...]`)
take the next word only when it has the value's shape (an integer, a list
of integers); anything else is left alone.

click is the framework: the click command in tsd.cli_click gives `ts -h`,
the man page (tsd.manpage) and shell completion (`_TS_COMPLETE=bash_source
ts`), and its types are the reference for what each value may be. But `ts`
must start fast (the issue asks for at most about 3x `python -c pass`), and
importing click and building that command costs more than all the rest of a
call. So `parse_argv` first scans argv the getopt way (click cannot express
"take the next word only if it is an id"), then converts the values itself
(`fast_params`, which mirrors the click types for well-formed values; a unit
test checks that the two agree) and hands anything it is unsure of, every bad
value included, to click (`tsd.cli_click.click_parse`), whose conversions and
messages stay the reference. The values then become one protocol request;
queueing a job, the call that must start fastest, builds that request as it
travels without loading the typed protocol at all (see "quick submit").

Kept fast to start: only the standard library and tsd's light modules are
imported here, and nothing from `typing` at run time.
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import sys
import time
import types
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a few ms at import and is needed only by mypy
    from typing import IO, Any, NoReturn


class _Deferred(types.ModuleType):
    """Stands in for a module until something uses it, then forwards to the real one.

    Importing is most of what a `ts` call costs. The typed protocol, the job
    model and the renderers (some thirty dataclasses, created at import) are
    needed by most actions but not to queue a job, so they load on first use.
    This changes when a module loads, never what it does.
    """

    def __getattr__(self, name: str) -> Any:
        __import__(self.__name__)
        real = sys.modules[self.__name__]
        self.__dict__.update(real.__dict__)
        return getattr(real, name)


from dataclasses import dataclass, field, replace  # noqa: E402

from tsd import __version__  # noqa: E402
from tsd.client import Client, Connection, choose_socket  # noqa: E402
from tsd.errors import BadRequest, ServerUnavailable, TsdError, from_wire  # noqa: E402

if TYPE_CHECKING:
    from tsd import model, protocol, render
    from tsd.model import Job
else:
    model = _Deferred("tsd.model")
    protocol = _Deferred("tsd.protocol")
    render = _Deferred("tsd.render")

# tsd.protocol's limits and version, here too so that queueing a job need not
# import it (tests check that they are the same).
from tsd.framing import (  # noqa: E402
    MAX_ARGS,
    MAX_DEPENDS,
    MAX_ENV,
    MAX_FRAME,
    MAX_GPUS,
    MAX_ID,
    MAX_SLOTS,
    MAX_TEXT,
    MAX_TIMEOUT,
    PROTOCOL_VERSION,
)

PROG = "ts"
TAIL_LINES = 10
POLL_SECONDS = 0.2
TS_ENV_TIMEOUT = 30.0

VERSION_TEXT = (
    f"Task Spooler v{__version__} (tsd) - a task queue system for the unix user.\n"
    "Compatible with GPU Task Spooler v2 by Duc Nguyen and Lluis Batlle i Rossell.\n"
)

SYNOPSIS = "[action] [-ngfmdEBz] [-L <lab>] [-D <id,...>] [-N <num>] [-G [num]] [command...]"

ENV_VARS: tuple[tuple[str, str], ...] = (
    (
        "TS_VISIBLE_DEVICES",
        "the GPU IDs that are visible to ts. Jobs will be run on these GPUs only.",
    ),
    ("TS_SOCKET", "the path to the unix socket used by the ts command."),
    ("TS_MAILTO", "where to mail the result (on -m). Local user by default."),
    ("TS_MAXFINISHED", "maximum finished jobs in the queue."),
    ("TS_MAXCONN", "maximum number of ts connections at once."),
    ("TS_ONFINISH", "binary called on job end (passes jobid, error, outfile, command)."),
    ("TS_ENV", "command called on enqueue. Its output determines the job information."),
    ("TS_SAVELIST", "filename which will store the list, if the server dies."),
    ("TS_SLOTS", "amount of jobs which can run at once, read on server start."),
    ("TMPDIR", "directory where to place the output files and the default socket."),
)


class UsageError(Exception):
    """A bad command line; printed as one `ts: ...` line, exit 1."""


# ------------------------------------------------------------ option table


class Kind(enum.Enum):
    """How an option takes its value."""

    FLAG = "flag"  # no value
    VALUE = "value"  # a value is required: attached or the next word
    OPT_INT = "opt_int"  # optional; the next word only if it is an integer
    OPT_IDS = "opt_ids"  # optional; the next word only if it is `int[,int...]`
    OPT_WORD = "opt_word"  # optional; the next word unless it looks like an option


@dataclass(frozen=True)
class Opt:
    """One ts option: how it is spelled, parsed, documented and what it selects."""

    dest: str
    short: str | None
    long: str | None
    kind: Kind
    section: str  # where ts -h and the man page list it
    action: str | None  # the action it selects, if any
    metavar: str
    help: str

    @property
    def spelled(self) -> str:
        """The name used in messages: `-t` or `--getenv`."""
        return f"-{self.short}" if self.short else f"--{self.long}"


SECTION_LONG_ACTIONS = "Long option actions"
SECTION_LONG_JOB = "Long option adding jobs"
SECTION_ACTIONS = "Actions (can be performed only one at a time)"
SECTION_JOB = "Options adding jobs"
SECTIONS = (SECTION_LONG_ACTIONS, SECTION_LONG_JOB, SECTION_ACTIONS, SECTION_JOB)

FL, VAL, OI, IDS, OW = Kind.FLAG, Kind.VALUE, Kind.OPT_INT, Kind.OPT_IDS, Kind.OPT_WORD
LA, LJ, A, J = SECTION_LONG_ACTIONS, SECTION_LONG_JOB, SECTION_ACTIONS, SECTION_JOB

OPTIONS: tuple[Opt, ...] = (
    # long option actions
    Opt("getenv", None, "getenv", VAL, LA, "getenv", "<var>",
        "get the value of the specified variable in server environment."),
    Opt("setenv", None, "setenv", VAL, LA, "setenv", "<var=value>",
        "set the specified flag to server environment (VAR=VALUE); your next jobs get it."),
    Opt("unsetenv", None, "unsetenv", VAL, LA, "unsetenv", "<var>",
        "remove the specified flag from server environment."),
    Opt("get_label", "a", "get_label", OI, LA, "get_label", "[id]",
        "show the job label. Of the last added, if not specified."),
    Opt("full_cmd", "F", "full_cmd", OI, LA, "full_cmd", "[id]",
        "show full command. Of the last added, if not specified."),
    Opt("count_running", "R", "count_running", FL, LA, "count_running", "",
        "return the number of running jobs"),
    Opt("last_queue_id", "q", "last_queue_id", FL, LA, "last_queue_id", "",
        "show the job ID of the last added."),
    Opt("get_logdir", None, "get_logdir", FL, LA, "get_logdir", "",
        "get the path containing log files."),
    Opt("set_logdir", None, "set_logdir", VAL, LA, "set_logdir", "<path>",
        "set the path containing log files."),
    Opt("serialize", "M", "serialize", OW, LA, "list", "[format]",
        "serialize the job list to the specified format. Choices: {default, json, tab}."),
    Opt("set_gpu_free_perc", None, "set_gpu_free_perc", VAL, LA, "set_gpu_free_perc", "<num>",
        "set the value of GPU memory threshold above which GPUs are considered available "
        "(90 by default)."),
    Opt("get_gpu_free_perc", None, "get_gpu_free_perc", FL, LA, "get_gpu_free_perc", "",
        "get the value of GPU memory threshold above which GPUs are considered available."),
    # long option adding jobs
    Opt("gpus", "G", "gpus", OI, LJ, None, "[num]",
        "number of GPUs required by the job (1 if no number is given)."),
    Opt("gpu_indices", "g", "gpu_indices", IDS, LJ, None, "[id,...]",
        "the job will be on these GPU indices without checking whether they are free. "
        "Without ids and without a command: list all jobs running on GPUs and the "
        "corresponding GPU IDs, and the GPUs."),
    Opt("timeout", None, "timeout", VAL, LJ, None, "<seconds>",
        "kill the job if it runs longer than this (seconds, or with a unit: 90s, 30m, 2h,"
        " 1d)."),
    # actions
    Opt("shutdown", "K", None, FL, A, "shutdown", "",
        "kill the task spooler server"),
    Opt("clear", "C", None, FL, A, "clear", "",
        "clear the list of finished jobs"),
    Opt("list", "l", None, FL, A, "list", "",
        "show the job list (default action)"),
    Opt("all_users", "A", None, FL, A, "list", "",
        "show the job list of every user, with a User column."),
    Opt("slots", "S", None, OI, A, "slots", "[num]",
        "get/set the number of max simultaneous jobs of the server (0 drains the queue)."),
    Opt("tail", "t", None, OI, A, "tail", "[id]",
        '"tail -n 10 -f" the output of the job. Last run if not specified.'),
    Opt("cat", "c", None, OI, A, "cat", "[id]",
        "like -t, but shows all the lines. Last run if not specified."),
    Opt("pid", "p", None, OI, A, "pid", "[id]",
        "show the PID of the job. Last run if not specified."),
    Opt("output", "o", None, OI, A, "output", "[id]",
        "show the output file. Of last job run, if not specified."),
    Opt("info", "i", None, OI, A, "info", "[id]",
        "show job information. Of last job run, if not specified."),
    Opt("state", "s", None, OI, A, "state", "[id]",
        "show the job state. Of the last added, if not specified."),
    Opt("remove", "r", None, OI, A, "remove", "[id]",
        "remove a job. The last added, if not specified."),
    Opt("wait", "w", None, OI, A, "wait", "[id]",
        "wait for a job. The last added, if not specified."),
    Opt("kill", "k", None, OI, A, "kill", "[id]",
        "kill the job and everything it started. The last run, if not specified."),
    Opt("kill_all", "T", None, FL, A, "kill_all", "",
        "kill all running jobs."),
    Opt("urgent", "u", None, OI, A, "urgent", "[id]",
        "put that job first. The last added, if not specified."),
    Opt("swap", "U", None, VAL, A, "swap", "<id-id>",
        "swap two jobs in the queue."),
    Opt("help", "h", "help", FL, A, "help", "",
        "show this help"),
    Opt("version", "V", "version", FL, A, "version", "",
        "show the program version"),
    # options adding jobs
    Opt("no_block", "B", None, FL, J, None, "",
        "in case of full queue on the server, quit (2) instead of waiting."),
    Opt("no_output", "n", None, FL, J, None, "",
        "don't store the output of the command."),
    Opt("stderr_apart", "E", None, FL, J, None, "",
        "Keep stderr apart, in a name like the output file, but adding '.e'."),
    Opt("gzip", "z", None, FL, J, None, "",
        "gzip the stored output (if not -n)."),
    Opt("foreground", "f", None, FL, J, None, "",
        "don't fork into background: wait for the job and exit with its exit code."),
    Opt("mail", "m", None, FL, J, None, "",
        "send the output by e-mail (uses sendmail)."),
    Opt("depend_last", "d", None, FL, J, None, "",
        "the job will be run after the last job ends."),
    Opt("output_name", "O", None, VAL, J, None, "<name>",
        "set name of the log file (without any path)."),
    Opt("depend", "D", None, VAL, J, None, "<id,...>",
        "the job will be run after the job of given IDs ends."),
    Opt("depend_ok", "W", None, VAL, J, None, "<id,...>",
        "the job will be run after the job of given IDs ends well (exit code 0)."),
    Opt("label", "L", None, VAL, J, None, "<lab>",
        "name this task with a label, to be distinguished on listing."),
    Opt("num_slots", "N", None, VAL, J, None, "<num>",
        "number of slots required by the job (1 default)."),
)

BY_SHORT = {o.short: o for o in OPTIONS if o.short}
BY_LONG = {o.long: o for o in OPTIONS if o.long}
BY_DEST = {o.dest: o for o in OPTIONS}

# ts -h lists `-g` twice in task-spooler: as a job option and as an action.
GPU_LIST_HELP = ("-g", "list all jobs running on GPUs and the corresponding GPU IDs, and the GPUs.")

_DURATION_PATTERN = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([smhd]?)\Z"
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

ABSENT = -1  # an optional id or number given without one (task-spooler's "-1")


# ---------------------------------------------------------------- scanning


@dataclass(frozen=True)
class Given:
    """One option occurrence on the command line, with its value if it had one."""

    opt: Opt
    value: str | None


def _find_long(name: str) -> Opt:
    key = name.replace("-", "_")
    if key in BY_LONG:
        return BY_LONG[key]
    # getopt_long accepts any unambiguous prefix.
    hits = [o for n, o in BY_LONG.items() if n.startswith(key)] if key else []
    if len(hits) == 1:
        return hits[0]
    if hits:
        names = ", ".join("--" + str(o.long) for o in hits)
        raise UsageError(f"option --{name} is ambiguous ({names})")
    raise UsageError(f"unknown option --{name} (see ts -h)")


def _takes(kind: Kind, word: str) -> bool:
    """Whether an optional value may be `word` (the word after the option)."""
    if kind is Kind.OPT_INT:
        return _is_int(word)
    if kind is Kind.OPT_IDS:
        return _is_ids(word)
    if kind is Kind.OPT_WORD:
        return not word.startswith("-")
    return False


def scan(argv: Sequence[str]) -> tuple[list[Given], list[str]]:
    """Split argv getopt-style ("+": stop at the first non-option) into options and command."""
    given: list[Given] = []
    i = 0
    n = len(argv)

    def next_word(opt: Opt) -> str:
        nonlocal i
        if i + 1 >= n:
            raise UsageError(f"option {opt.spelled} requires a value {opt.metavar}".rstrip())
        i += 1
        return argv[i]

    def peek(opt: Opt) -> str | None:
        nonlocal i
        if i + 1 < n and _takes(opt.kind, argv[i + 1]):
            i += 1
            return argv[i]
        return None

    while i < n:
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            name, eq, val = arg[2:].partition("=")
            opt = _find_long(name)
            if opt.kind is Kind.FLAG:
                if eq:
                    raise UsageError(f"option --{opt.long} takes no value")
                given.append(Given(opt, None))
            elif opt.kind is Kind.VALUE:
                given.append(Given(opt, val if eq else next_word(opt)))
            else:
                given.append(Given(opt, val if eq else peek(opt)))
            i += 1
            continue
        if arg.startswith("-") and len(arg) > 1:
            j = 1
            while j < len(arg):
                ch = arg[j]
                opt_or_none = BY_SHORT.get(ch)
                if opt_or_none is None:
                    raise UsageError(f"unknown option -{ch} (see ts -h)")
                opt = opt_or_none
                rest = arg[j + 1 :]
                if opt.kind is Kind.FLAG:
                    given.append(Given(opt, None))
                    j += 1
                    continue
                if opt.kind is Kind.VALUE:
                    given.append(Given(opt, rest if rest else next_word(opt)))
                elif rest:
                    # Attached (`-t5`): it must be the value, so it must have its shape.
                    given.append(Given(opt, rest))
                else:
                    given.append(Given(opt, peek(opt)))
                break
            i += 1
            continue
        break
    return given, list(argv[i:])


# ------------------------------------------------------------ values


class BadValue(ValueError):
    """An option's value has the wrong shape; the message is the one click reports."""


def _is_int(word: str) -> bool:
    """`[0-9]+`: ASCII digits only (str.isdigit alone also takes other scripts' digits)."""
    return word.isascii() and word.isdigit()


def _is_ids(word: str) -> bool:
    """`int[,int...]`."""
    return all(_is_int(part) for part in word.split(","))


def job_id_value(value: str) -> int:
    """A job id; empty (the option given without one) is ABSENT: 'the default job'."""
    if value == "":
        return ABSENT
    if not _is_int(value):
        raise BadValue(f"{value!r} is not a job id")
    number = int(value)
    if number > MAX_ID:
        raise BadValue(f"{value} is too large for a job id")
    return number


def id_list_value(value: str, lo: int) -> tuple[int, ...]:
    """Comma-separated integers, each at least `lo`; empty is the empty tuple."""
    if value == "":
        return ()
    if not _is_ids(value):
        raise BadValue(f"{value!r} is not a comma-separated list of numbers")
    ids = tuple(int(v) for v in value.split(","))
    if any(v < lo or v > MAX_ID for v in ids):
        raise BadValue(f"{value!r}: numbers must be at least {lo}")
    return ids


def swap_value(value: str) -> tuple[int, int]:
    """`a-b`: two different job ids."""
    first, dash, second = value.partition("-")
    if not (dash and _is_int(first) and _is_int(second)):
        raise BadValue(f"{value!r} is not of the form <id-id>")
    a, b = int(first), int(second)
    if a == b:
        raise BadValue("use two different ids")
    return a, b


def duration_value(value: str) -> float:
    """A positive duration in seconds, optionally with a unit s, m, h or d."""
    import re  # only for --timeout

    match = re.match(_DURATION_PATTERN, value.strip())
    if not match:
        raise BadValue(f"{value!r} is not a duration (e.g. 90, 90s, 30m, 2h, 1d)")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not 0 < seconds <= MAX_TIMEOUT:
        raise BadValue(f"{value!r} is out of range")
    return seconds


def _int_in(value: str, lo: int, hi: int) -> int:
    # click.IntRange, for plain digits; anything else goes to click itself.
    if not _is_int(value) or not lo <= int(value) <= hi:
        raise BadValue(value)
    return int(value)


def _float_in(value: str, lo: float, hi: float) -> float:
    # click.FloatRange, for plain decimals; anything else goes to click itself.
    whole, _, frac = value.partition(".")
    if not (_is_int(whole) and (not frac or _is_int(frac))) or not lo <= float(value) <= hi:
        raise BadValue(value)
    return float(value)


def _choice(value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise BadValue(value)
    return value


# How the fast path converts each option's value, mirroring tsd.cli_click.click_type.
_CONVERT: dict[str, Callable[[str], Any]] = {
    "serialize": lambda v: _choice(v, ("default", "json", "tab")),
    "gpus": lambda v: _int_in(v, 0, MAX_GPUS),
    "gpu_indices": lambda v: id_list_value(v, 0),
    "timeout": duration_value,
    "slots": job_id_value,
    "swap": swap_value,
    "set_gpu_free_perc": lambda v: _float_in(v, 0.0, 100.0),
    "depend": lambda v: id_list_value(v, 1),
    "depend_ok": lambda v: id_list_value(v, 1),
    "num_slots": lambda v: _int_in(v, 1, MAX_SLOTS),
}

# The value an optional-value option stands for when given without one (click's flag_value).
FLAG_VALUES: dict[str, str] = {"serialize": "default", "gpus": "1", "gpu_indices": ""}


def fast_params(given: Sequence[Given], command: Sequence[str]) -> dict[str, Any] | None:
    """click's `ctx.params` for this command line, without click; None if unsure.

    Covers every well-formed command line; anything else (a bad value, a
    number click would read but that is not plain digits, an optional value
    that click would take for an option) is None, and the caller asks click,
    so click's conversions and messages stay the reference.
    """
    raw: dict[str, str | None] = {}
    for g in given:
        optional = g.opt.kind not in (Kind.FLAG, Kind.VALUE)
        if optional and g.value is not None and len(g.value) > 1 and g.value[0] == "-":
            # click's parser would read an option there and use the flag value.
            return None
        # click keeps the last occurrence of an option and converts only that one.
        raw[g.opt.dest] = g.value
    params: dict[str, Any] = {
        o.dest: False if o.kind is Kind.FLAG else None for o in OPTIONS
    }
    for dest, value in raw.items():
        opt = BY_DEST[dest]
        if opt.kind is Kind.FLAG:
            params[dest] = True
            continue
        if value is None:
            if opt.kind is Kind.VALUE:
                return None
            value = FLAG_VALUES.get(dest, "")
        convert = _CONVERT.get(dest) or (job_id_value if opt.kind is Kind.OPT_INT else str)
        try:
            params[dest] = convert(value)
        except BadValue:
            return None
    params["command"] = tuple(command)
    return params


def _parse_params(given: Sequence[Given], command: Sequence[str]) -> dict[str, Any]:
    params = fast_params(given, command)
    if params is None:
        from tsd.cli_click import click_parse  # click only when the fast path is unsure

        params = click_parse(given, command)
    return params


def help_text() -> str:
    """`ts -h`: task-spooler's help, sections in its order, built from the option table."""

    def left(opt: Opt) -> str:
        if opt.short and opt.section in (SECTION_ACTIONS, SECTION_JOB):
            also = f", --{opt.long}" if opt.long else ""
            return f"-{opt.short}{also} {opt.metavar}"
        if opt.long and opt.short:
            return f"--{opt.long:<20} || -{opt.short} {opt.metavar}"
        if opt.long:
            return f"--{opt.long} {opt.metavar}"
        return f"-{opt.short} {opt.metavar}"

    out = [VERSION_TEXT.rstrip("\n"), f"usage: {PROG} {SYNOPSIS}"]
    out.append("Env vars:")
    out += [f"  {name:<19} {text}" for name, text in ENV_VARS]
    for section in SECTIONS:
        out.append(f"{section}:")
        rows = [(left(o), o.help) for o in OPTIONS if o.section == section]
        if section == SECTION_ACTIONS:
            rows.insert(3, GPU_LIST_HELP)
        width = max(len(r[0]) for r in rows) + 2
        out += [f"  {a:<{width}} {b}" for a, b in rows]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------ invocation


@dataclass(frozen=True)
class Invocation:
    """What a command line asks for: an action, the request it sends, and display options."""

    action: str
    request: protocol.Request | None = None
    list_format: str = "default"
    all_users: bool = False
    foreground: bool = False
    print_id: bool = True
    option: str = ""  # how the action was spelled, for messages
    params: Mapping[str, Any] = field(default_factory=dict)


GET_DEFAULTS: dict[str, protocol.Default] = {
    "info": "run",
    "pid": "run",
    "output": "run",
    "state": "added",
    "get_label": "added",
    "full_cmd": "added",
    "last_queue_id": "added",
}


def _job_id(value: Any) -> int | None:
    return None if value is None or value == ABSENT else int(value)


def parse_argv(
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
    umask: int = 0o022,
) -> Invocation:
    """Turn ts's argv into an Invocation. Pure: the environment, cwd and umask are arguments.

    Raises UsageError for anything wrong with the command line.
    """
    environ = {} if environ is None else environ
    action, option, params, present, command = _classify(argv)
    if action == "help":
        return Invocation("help", option=option, params=params)
    if action == "submit":
        return _submit(params, present, command, environ, cwd, umask)
    return _action(action, option, params, cwd)


def _classify(
    argv: Sequence[str],
) -> tuple[str, str, dict[str, Any], set[str], list[str]]:
    """The action (`submit` when a command is queued), how it was spelled, the values,
    which options were given, and the command."""
    given, command = scan(argv)
    params = _parse_params(given, command)
    present = {g.opt.dest for g in given}

    # Which action? -l, -A and -M all mean "list"; -g without ids and without a
    # command is the GPU listing; help wins over everything else.
    actions: dict[str, str] = {}
    for g in given:
        if g.opt.action:
            actions.setdefault(g.opt.action, g.opt.spelled)
        elif g.opt.dest == "gpu_indices" and g.value is None and not command:
            actions.setdefault("gpu_status", "-g")
    if "help" in actions:
        return "help", actions["help"], params, present, command
    if len(actions) > 1:
        spelled = ", ".join(actions.values())
        raise UsageError(f"only one action at a time ({spelled} given)")
    action, option = next(iter(actions.items()), ("list", ""))

    if command:
        if action != "list":
            raise UsageError(
                f"{option} takes no command (got {command[0]!r}; job ids are numbers)"
            )
        return "submit", option, params, present, command
    return action, option, params, present, command


def _action(
    action: str, option: str, params: Mapping[str, Any], cwd: str | None = None
) -> Invocation:
    """The Invocation of an action that queues nothing."""
    inv = Invocation(action, option=option, params=params)
    req: protocol.Request | None
    value = params.get(action)
    match action:
        case "version":
            req = None
        case "list":
            return replace(
                inv,
                request=protocol.ListJobs(all_users=bool(params.get("all_users"))),
                list_format=params.get("serialize") or "default",
                all_users=bool(params.get("all_users")),
            )
        case "gpu_status":
            req = protocol.GpuStatus()
        case "info" | "pid" | "output" | "state" | "get_label" | "full_cmd":
            req = protocol.GetJob(id=_job_id(value), default=GET_DEFAULTS[action])
        case "last_queue_id":
            req = protocol.GetJob(id=None, default="added")
        case "remove":
            req = protocol.Remove(id=_job_id(value))
        case "urgent":
            req = protocol.Urgent(id=_job_id(value))
        case "swap":
            a, b = value or (0, 0)
            req = protocol.Swap(a=a, b=b)
        case "kill":
            req = protocol.Kill(id=_job_id(value))
        case "kill_all":
            req = protocol.KillAll()
        case "clear":
            req = protocol.Clear()
        case "shutdown":
            req = protocol.Shutdown()
        case "slots":
            req = protocol.Slots(value=_job_id(value))
        case "count_running":
            req = protocol.CountRunning()
        case "wait":
            req = protocol.Wait(id=_job_id(value), default="added")
        case "tail" | "cat":
            req = protocol.Wait(id=_job_id(value), default="run", notify_start=True)
        case "getenv" | "unsetenv":
            name = str(value)
            if not name or "=" in name:
                raise UsageError(f"{option} needs a variable name without '='")
            req = protocol.Env(action="get" if action == "getenv" else "unset", name=name)
        case "setenv":
            name, eq, val = str(value).partition("=")
            if not name or not eq:
                raise UsageError("--setenv needs VAR=VALUE")
            req = protocol.Env(action="set", name=name, value=val)
        case "get_logdir":
            req = protocol.LogDir(path=None)
        case "set_logdir":
            path = str(value)
            if not path:
                raise UsageError("--set_logdir needs a directory")
            if not path.startswith("/"):
                # The daemon has its own cwd: a relative path means the caller's.
                if cwd is None:
                    raise UsageError("--set_logdir: the current directory cannot be read")
                path = os.path.normpath(os.path.join(cwd, path))
            req = protocol.LogDir(path=path)
        case "get_gpu_free_perc":
            req = protocol.GpuFreePerc(value=None)
        case "set_gpu_free_perc":
            req = protocol.GpuFreePerc(value=float(value or 0))
        case _:
            raise AssertionError(f"unhandled action {action}")
    return replace(inv, request=req)


def _clean_env(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    # Variables that cannot travel as UTF-8 JSON (undecodable bytes, odd names)
    # are left out rather than refusing the whole job.
    out = []
    for name, value in environ.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            continue
        try:
            name.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            continue
        out.append((name, value))
    return tuple(out)


def _spec_fields(
    params: Mapping[str, Any],
    present: set[str],
    command: Sequence[str],
    environ: Mapping[str, str],
    cwd: str | None,
    umask: int,
) -> dict[str, Any]:
    """The job spec to queue, as it travels (tsd.protocol.spec_to_wire's shape and order).

    Checks what only the command line can get wrong; the spec's own rules are
    tsd.protocol.parse_spec's.
    """
    if cwd is None:
        raise UsageError("cannot queue a job: the current directory cannot be read")
    for word in command:
        try:
            word.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"the command word {word!r} is not valid UTF-8") from None
    if "depend" in present and "depend_ok" in present:
        raise UsageError("use either -D or -W, not both")
    no_output = bool(params.get("no_output"))
    gzip = bool(params.get("gzip"))
    if params.get("mail") and (no_output or gzip):
        raise UsageError("for e-mail (-m), you should store the output (not -n, not -z)")
    gpu_indices = params.get("gpu_indices")
    if "gpu_indices" in present and not gpu_indices:
        raise UsageError("-g needs GPU indices (e.g. -g 0,1) to queue a command")
    gpus = params.get("gpus")
    if gpu_indices and gpus is not None and gpus != len(gpu_indices):
        raise UsageError(f"-G {gpus} disagrees with -g {','.join(map(str, gpu_indices))}")
    depends = params.get("depend_ok") or params.get("depend") or ()
    return {
        "command": list(command),
        "cwd": cwd,
        "env": [list(kv) for kv in _clean_env(environ)],
        "umask": umask,
        "label": params.get("label"),
        "slots": params.get("num_slots") or 1,
        "gpus": len(gpu_indices) if gpu_indices else (gpus or 0),
        "gpu_indices": list(gpu_indices) if gpu_indices else None,
        "depends": list(depends),
        "depend_mode": "success" if "depend_ok" in present else "after",
        "store_output": not no_output,
        "gzip": gzip,
        "stderr_apart": bool(params.get("stderr_apart")),
        "output_name": params.get("output_name"),
        "mail": bool(params.get("mail")),
        "timeout": params.get("timeout"),
        "env_info": None,
    }


def _submit(
    params: Mapping[str, Any],
    present: set[str],
    command: Sequence[str],
    environ: Mapping[str, str],
    cwd: str | None,
    umask: int,
) -> Invocation:
    """The Invocation that queues `command` with the job options given."""
    fields = _spec_fields(params, present, command, environ, cwd, umask)
    try:
        # The daemon checks the same way; checking here gives the message before connecting.
        spec = protocol.parse_spec(fields)
    except BadRequest as exc:
        raise UsageError(exc.message.removeprefix("bad request: ")) from None
    foreground = bool(params.get("foreground"))
    return Invocation(
        "submit",
        request=protocol.Submit(
            spec=spec,
            depend_last=bool(params.get("depend_last")),
            block=not params.get("no_block"),
        ),
        foreground=foreground,
        # -nf is task-spooler's "transparent" mode: nothing but the job's exit code.
        print_id=not (foreground and bool(params.get("no_output"))),
        params=params,
    )


# ------------------------------------------------------------ quick submit
#
# Queueing a job is what `ts` does most and what must start fastest, so it
# skips the typed protocol: the request is built as it travels, framed here,
# and sent. Only specs that tsd.protocol.parse_spec surely accepts go this way
# (`surely_valid`); any other goes through parse_argv, which gives the exact
# message (and should the daemon still refuse the spec, its message is shown
# the way parse_argv shows it). Tests check that both ways send the same request.


QUICK_COMMAND_CHARS = 1 << 16


def _text_ok(value: Any, max_len: int) -> bool:
    if not isinstance(value, str) or len(value) > max_len or "\0" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def surely_valid(spec: Mapping[str, Any]) -> bool:
    """A sufficient (not necessary) condition for tsd.protocol.parse_spec to accept `spec`."""
    command, env = spec["command"], spec["env"]
    label, name, timeout = spec["label"], spec["output_name"], spec["timeout"]
    indices, depends = spec["gpu_indices"], spec["depends"]
    return (
        0 < len(command) <= MAX_ARGS
        # Well under any limit on a command's length, the frame's included.
        and sum(len(arg) + 1 for arg in command) <= QUICK_COMMAND_CHARS
        and all(_text_ok(arg, MAX_FRAME) for arg in command)
        and bool("".join(command).strip())
        and _text_ok(spec["cwd"], 4096)
        and spec["cwd"].startswith("/")
        and len(env) <= MAX_ENV
        and all(n and "=" not in n and _text_ok(n, MAX_FRAME) and _text_ok(v, MAX_FRAME)
                for n, v in env)
        and 0 <= spec["umask"] <= 0o777
        and (label is None or _text_ok(label, 1024))
        and 1 <= spec["slots"] <= MAX_SLOTS
        and 0 <= spec["gpus"] <= MAX_GPUS
        and (indices is None or (0 < len(indices) == len(set(indices)) <= MAX_GPUS
                                 and all(0 <= i < MAX_GPUS for i in indices)))
        and len(depends) <= MAX_DEPENDS
        and all(1 <= d <= MAX_ID for d in depends)
        and (name is None or (_text_ok(name, 255) and "/" not in name
                              and name not in ("", ".", "..")))
        and (timeout is None or 0 < timeout <= MAX_TIMEOUT)
        and (spec["env_info"] is None or _text_ok(spec["env_info"], MAX_TEXT))
    )  # fmt: skip


def quick_submit_request(
    argv: Sequence[str], environ: Mapping[str, str], cwd: str | None, umask: int
) -> dict[str, Any] | None:
    """The submit request for argv as it travels, if it can skip the typed protocol.

    None when argv is not a plain submit (an action, -f) or its spec is not
    surely valid: parse_argv and run then handle it.
    """
    action, _, params, present, command = _classify(argv)
    if action != "submit" or params.get("foreground"):
        return None
    spec = _spec_fields(params, present, command, environ, cwd, umask)
    if not surely_valid(spec):
        return None
    return {
        "v": PROTOCOL_VERSION,
        "op": "submit",
        "spec": spec,
        "depend_last": bool(params.get("depend_last")),
        "block": not params.get("no_block"),
    }


def quick_submit(request: dict[str, Any], environ: Mapping[str, str]) -> int:
    """run() for a quick_submit_request: queue it and print the job id."""
    request["spec"]["env_info"] = _ts_env_info(environ)
    conn = Client().connect()
    try:
        conn.send_wire(request)
        while True:
            frame = conn.recv()
            if "event" not in frame:
                break
    finally:
        conn.close()
    try:
        job_id = _check(frame).get("id")
    except BadRequest as exc:
        # A spec rule newer than surely_valid: the message parse_argv would have given.
        raise UsageError(exc.message.removeprefix("bad request: ")) from None
    if not isinstance(job_id, int):
        raise TsdError("malformed response from the daemon: no job id")
    _emit(f"{job_id}\n")
    return 0


# ------------------------------------------------------------------ output


class _StdoutGone(Exception):
    """stdout was closed under us (`ts -c | head`)."""


def _emit(text: str | bytes) -> None:
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        raise _StdoutGone() from None


def _warn(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def _terminal_width() -> int | None:
    try:
        if sys.stdout.isatty():
            return os.get_terminal_size(sys.stdout.fileno()).columns
    except OSError:
        pass
    return None


def wait_code(job: Job) -> int:
    """What -w/-t/-c/-f exit with: the job's code; 255 when skipped, killed or lost."""
    if job.state is model.JobState.FINISHED and job.exit is not None:
        return job.exit.wait_code
    return 255


def _check(frame: Mapping[str, Any]) -> dict[str, Any]:
    if frame.get("ok") is True:
        return dict(frame)
    if frame.get("ok") is False:
        raise from_wire(str(frame.get("code", "error")), str(frame.get("error", "unknown error")))
    raise TsdError("malformed response from the daemon")


def _job(resp: Mapping[str, Any]) -> Job:
    rec = resp.get("job")
    if not isinstance(rec, dict):
        raise TsdError("malformed response from the daemon: no job record")
    return protocol.job_from_wire(rec)


def _ts_env_info(environ: Mapping[str, str]) -> str | None:
    """TS_ENV: run it with sh at submit time; its output is the job's information (-i)."""
    script = environ.get("TS_ENV")
    if not script:
        return None
    import subprocess  # only with TS_ENV: keep it off every other start

    try:
        proc = subprocess.run(
            ["/bin/sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            timeout=TS_ENV_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TsdError(f"TS_ENV did not finish within {TS_ENV_TIMEOUT:g}s") from None
    except OSError as exc:
        raise TsdError(f"cannot run TS_ENV: {exc.strerror}") from None
    text = proc.stdout.decode("utf-8", "replace").replace("\0", "")
    return text[: MAX_TEXT] or None


# ------------------------------------------------------------ -t and -c


class OutputFollower:
    """Copies a job's output file to a stream as it grows; gunzips -z output on the fly."""

    def __init__(self, path: str, gzipped: bool, out: IO[bytes], tail_lines: int | None) -> None:
        self.path = path
        self.gzipped = gzipped
        self.out = out
        self.tail_lines = tail_lines  # None: everything (-c); N: start with the last N lines (-t)
        self.file: IO[bytes] | None = None
        self.inflater = zlib.decompressobj(wbits=31) if gzipped else None

    def _open(self) -> bool:
        if self.file is not None:
            return True
        try:
            self.file = open(self.path, "rb")  # noqa: SIM115 (kept open while following)
        except FileNotFoundError:
            return False
        if self.tail_lines is not None:
            self._start_at_tail(self.tail_lines)
        return True

    def _start_at_tail(self, lines: int) -> None:
        assert self.file is not None
        if self.gzipped:
            data = self._inflate(self.file.read())
            self._write(_last_lines(data, lines))
            return
        # Plain file: read backwards from the end only as far as needed.
        end = self.file.seek(0, os.SEEK_END)
        pos, chunk, buf = end, 1 << 16, b""
        while pos > 0 and buf.count(b"\n") <= lines:
            step = min(chunk, pos)
            pos -= step
            self.file.seek(pos)
            buf = self.file.read(step) + buf
        self.file.seek(end)
        self._write(_last_lines(buf, lines))

    def _inflate(self, data: bytes) -> bytes:
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
                self.inflater = zlib.decompressobj(wbits=31)
            else:
                data = b""
        return b"".join(out)

    def _write(self, data: bytes) -> None:
        if data:
            try:
                self.out.write(data)
                self.out.flush()
            except BrokenPipeError:
                raise _StdoutGone() from None

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


def _last_lines(data: bytes, n: int) -> bytes:
    """The last n lines of `data`, as `tail -n` prints them."""
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-n:]) if n > 0 else b""


def follow_output(
    conn: Connection, inv: Invocation, out: IO[bytes], poll: float = POLL_SECONDS
) -> int:
    """-t/-c: copy the job's output until the daemon's final frame; the job's wait code."""
    tail = TAIL_LINES if inv.action == "tail" else None
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
                follower = _follower_for(_job(frame), out, tail)
                continue
            if "event" in frame:
                continue
            job = _job(_check(frame))
            break
        if not started:
            # It ended before it could be followed (or never ran): show what it left.
            follower = _follower_for(job, out, tail)
        if follower is not None and not follower.poll():
            _warn(f"job {job.id}: output file {follower.path} does not exist")
        return wait_code(job)
    finally:
        if follower is not None:
            follower.close()


def _follower_for(job: Job, out: IO[bytes], tail: int | None) -> OutputFollower | None:
    if not job.spec.store_output:
        _warn(f"job {job.id} does not store its output (-n)")
        return None
    if not job.output_path:
        if job.state is not model.JobState.SKIPPED:
            _warn(f"job {job.id} has no output file")
        return None
    return OutputFollower(job.output_path, job.spec.gzip, out, tail)


# ------------------------------------------------------------------ running


def _print_list(inv: Invocation, resp: Mapping[str, Any]) -> None:
    jobs = [protocol.job_from_wire(r) for r in resp.get("jobs", [])]
    now = time.time()
    if inv.list_format == "json":
        _emit(render.list_json(jobs, now=now))
    elif inv.list_format == "tab":
        _emit(render.list_tab(jobs, show_user=inv.all_users, now=now))
    else:
        _emit(
            render.list_text(
                jobs,
                int(resp.get("slots", 0)),
                int(resp.get("running", 0)),
                show_user=inv.all_users,
                now=now,
                width=_terminal_width(),
            )
        )


def _stream_final(client: Client, req: protocol.Request) -> dict[str, Any]:
    final: dict[str, Any] = {}
    for frame in client.stream(req):
        if "event" not in frame:
            final = frame
    return final


def _submit_run(client: Client, inv: Invocation, environ: Mapping[str, str]) -> int:
    req = inv.request
    assert isinstance(req, protocol.Submit)
    info = _ts_env_info(environ)
    if info is not None:
        req = replace(req, spec=replace(req.spec, env_info=info))
    resp = client.call(req)
    job_id = resp.get("id")
    if not isinstance(job_id, int):
        raise TsdError("malformed response from the daemon: no job id")
    if inv.print_id:
        _emit(f"{job_id}\n")
    if not inv.foreground:
        return 0
    try:
        return wait_code(_job(_stream_final(client, protocol.Wait(id=job_id))))
    except KeyboardInterrupt:
        # task-spooler's -f runs the job in the foreground: Ctrl-C ends it.
        with contextlib.suppress(TsdError, OSError):
            client.call(protocol.Kill(id=job_id))
        return 130


def run(inv: Invocation, environ: Mapping[str, str] | None = None) -> int:
    """Carry out an Invocation against the daemon; returns the exit code."""
    environ = os.environ if environ is None else environ
    if inv.action == "help":
        from tsd.cli_click import help_page  # click renders the help

        _emit(help_page())
        return 0
    if inv.action == "version":
        _emit(VERSION_TEXT)
        return 0
    if inv.action == "shutdown":
        client = Client(may_start=False)
        try:
            client.call(protocol.Shutdown())
        except ServerUnavailable:
            if choose_socket(environ)[1]:
                return 0  # no personal daemon running: nothing to shut down
            raise
        return 0
    client = Client()
    if inv.action == "submit":
        return _submit_run(client, inv, environ)
    assert inv.request is not None
    if inv.action in ("tail", "cat"):
        conn = client.connect()
        try:
            conn.send(inv.request)
            return follow_output(conn, inv, sys.stdout.buffer)
        finally:
            conn.close()
    if inv.action == "wait":
        return wait_code(_job(_stream_final(client, inv.request)))
    resp = client.call(inv.request)
    return _show(inv, resp)


def _show(inv: Invocation, resp: Mapping[str, Any]) -> int:
    """Print the answer to a one-shot request; the exit code."""
    action = inv.action
    if action == "list":
        _print_list(inv, resp)
    elif action == "gpu_status":
        jobs = [protocol.job_from_wire(r) for r in resp.get("jobs", [])]
        _emit(render.gpu_status_text(resp, jobs))
    elif action in GET_DEFAULTS:
        return _show_job(action, _job(resp))
    elif action == "slots":
        if inv.params.get("slots") in (None, ABSENT):
            _emit(f"{resp.get('slots')}\n")
    elif action == "count_running":
        _emit(f"{resp.get('count')}\n")
    elif action == "getenv":
        value = resp.get("value")
        if value is not None:
            _emit(f"{value}\n")
    elif action == "get_logdir":
        _emit(f"{resp.get('path')}\n")
    elif action == "get_gpu_free_perc":
        _emit(f"{float(resp.get('value', 0)):g}\n")
    return 0


def _show_job(action: str, job: Job) -> int:
    if action == "info":
        _emit(render.info_text(job, time.time()))
    elif action == "state":
        _emit(f"{job.state.value}\n")
    elif action == "last_queue_id":
        _emit(f"{job.id}\n")
    elif action == "get_label":
        _emit(f"{job.spec.label or ''}\n")
    elif action == "full_cmd":
        _emit(f"{job.spec.command_line}\n")
    elif action == "pid":
        if job.pid is None:
            raise TsdError(f"job {job.id} has no process ({job.state.value})")
        _emit(f"{job.pid}\n")
    elif action == "output":
        if not job.spec.store_output:
            raise TsdError(f"job {job.id} does not store its output (-n)")
        if not job.output_path:
            raise TsdError(f"job {job.id} has no output file yet ({job.state.value})")
        _emit(f"{job.output_path}\n")
    return 0


def _current_umask() -> int:
    # Reading the umask means setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


@contextlib.contextmanager
def _edge() -> Iterator[None]:
    """Where every failure becomes one `ts: ...` line and an exit code."""
    try:
        yield
    except UsageError as exc:
        _warn(str(exc))
        sys.exit(1)
    except TsdError as exc:
        _warn(exc.message)
        sys.exit(exc.exit_code)
    except _StdoutGone:
        # Like any filter whose reader went away: stop quietly.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        _warn(f"lost the connection to the daemon: {exc.strerror or exc}")
        sys.exit(1)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of `ts`. Without argv it is the program: it ends the process itself."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "_TS_COMPLETE" in os.environ:
        # Shell completion is click's: it reads the words from the environment.
        from tsd.cli_click import complete

        complete(args)
    code = 1
    with _edge():
        cwd, umask = _cwd(), _current_umask()
        quick = quick_submit_request(args, os.environ, cwd, umask)
        if quick is not None:
            code = quick_submit(quick, os.environ)
        else:
            code = run(parse_argv(args, os.environ, cwd, umask))
    if argv is None:
        # Run as the program and done: all output was flushed as it was written
        # and every connection and file is closed, so skip tearing the
        # interpreter down module by module (a tenth of a quick `ts` call).
        # Failures leave through sys.exit in _edge, the usual way.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
