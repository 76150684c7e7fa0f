"""`ts`'s options: one declarative table, and the one parser it drives.

The table (`OPTIONS`) says, for every option, how it is spelled, whether and
how it takes a value, what the value may be (`Opt.value` converts it), which
action it selects, and how `ts -h`, the man page (tsd.manpage) and shell
completion (tsd.cli_completion) show it. Nothing else describes `ts`'s options.

Parsing follows task-spooler (POSIX getopt with "+"): options come first and
the first word that is not an option starts the command, so
`ts -L x python train.py --lr 3` queues `python train.py --lr 3`. Short
options bundle (`-nf`, `-nzEL lab`); a value may be attached (`-N3`,
`--gpus=2`). Options whose value is optional (`-t [id]`, `-S [num]`,
`-G [num]`, `-g [id,...]`, `-M [format]`) take the next word only when it has
the value's shape (an integer, a list of integers, a word not starting with
`-`); anything else is left alone.

Kept fast to start (it runs on every `ts` call): no click, no dataclasses,
no enum, nothing from `typing` at run time.
"""

from __future__ import annotations

from tsd import __version__
from tsd.errors import UsageError as UsageError  # its home; imported from here too
from tsd.framing import MAX_GPU_MEM, MAX_GPUS, MAX_ID, MAX_SLOTS, MAX_TIMEOUT

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a few ms at import and is needed only by mypy
    from collections.abc import Callable, Sequence
    from typing import Any

PROG = "ts"

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

ABSENT = -1  # an optional id or number given without one (task-spooler's "-1")


class BadValue(ValueError):
    """An option's value has the wrong shape; the text says what is wrong with it."""


# ------------------------------------------------------------------ values
#
# Each converter turns the option's text into its value or raises BadValue.
# The messages of the number and choice values are the ones ts has always
# printed (they were click's, in click 8.1); they are spelled out here so that
# they no longer change with the click release installed.


def _is_int(word: str) -> bool:
    """`[0-9]+`: ASCII digits only (str.isdigit alone also takes other scripts' digits)."""
    return word.isascii() and word.isdigit()


def _is_ids(word: str) -> bool:
    """`int[,int...]`."""
    return all(_is_int(part) for part in word.split(","))


def text(value: str) -> str:
    """Any text, as given."""
    return value


def job_id(value: str) -> int:
    """A job id; empty (the option given without one) is ABSENT: 'the default job'."""
    if value == "":
        return ABSENT
    if not _is_int(value):
        raise BadValue(f"{value!r} is not a job id")
    number = int(value)
    if number > MAX_ID:
        raise BadValue(f"{value} is too large for a job id")
    return number


def id_list(lo: int) -> Callable[[str], tuple[int, ...]]:
    """Comma-separated integers, each at least `lo`; empty is the empty tuple."""

    def convert(value: str) -> tuple[int, ...]:
        if value == "":
            return ()
        if not _is_ids(value):
            raise BadValue(f"{value!r} is not a comma-separated list of numbers")
        ids = tuple(int(v) for v in value.split(","))
        if any(v < lo or v > MAX_ID for v in ids):
            raise BadValue(f"{value!r}: numbers must be at least {lo}")
        return ids

    return convert


def id_pair(value: str) -> tuple[int, int]:
    """`a-b`: two different job ids."""
    first, dash, second = value.partition("-")
    if not (dash and _is_int(first) and _is_int(second)):
        raise BadValue(f"{value!r} is not of the form <id-id>")
    a, b = int(first), int(second)
    if a == b:
        raise BadValue("use two different ids")
    return a, b


_DURATION_PATTERN = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([smhd]?)\Z"
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(value: str) -> float:
    """A positive duration in seconds, optionally with a unit s, m, h or d."""
    import re  # only for --timeout

    match = re.match(_DURATION_PATTERN, value.strip())
    if not match:
        raise BadValue(f"{value!r} is not a duration (e.g. 90, 90s, 30m, 2h, 1d)")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not 0 < seconds <= MAX_TIMEOUT:
        raise BadValue(f"{value!r} is out of range")
    return seconds


_SINCE_PATTERN = r"([0-9]+(?:\.[0-9]*)?)\s*([smhdw])\Z"
_SINCE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def since(value: str) -> float:
    """--since: `7d`, `24h`, `30m`, `2w` ago, or an ISO time (`2026-12-01`,
    `2026-12-01T08:00`, local time unless it names its zone): epoch seconds."""
    import re  # only for --stats
    import time

    text = value.strip()
    match = re.match(_SINCE_PATTERN, text)
    if match:
        return time.time() - float(match.group(1)) * _SINCE_UNITS[match.group(2)]
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError, OSError):
        raise BadValue(
            f"{value!r} is not a time: use 7d, 24h, 30m or an ISO time such as 2026-12-01T08:00"
        ) from None


_SIZE_UNITS_MIB = {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}


def gpu_mem_size(value: str) -> int:
    """--gpu-mem: a size in MiB from `20G`, `512M`, `1.5T`, `20GiB` or a bare number (MiB)."""
    import re  # only for --gpu-mem

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([MGT]?)(?:i?B)?\s*", value, re.I)
    if not match:
        raise BadValue(f"{value!r} is not a size (e.g. 20G, 512M, or MiB as a bare number)")
    mib = float(match.group(1)) * _SIZE_UNITS_MIB[match.group(2).upper()]
    if mib < 1:
        raise BadValue(f"{value!r}: a job needs at least 1 MiB of GPU memory")
    if mib > MAX_GPU_MEM:
        raise BadValue(f"{value!r} is too large")
    return int(mib)


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """An integer from lo to hi; Python's int() reads it (so `+2` and ` 3` are numbers too)."""

    def convert(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise BadValue(f"{value!r} is not a valid integer range.") from None
        if not lo <= number <= hi:
            raise BadValue(f"{number} is not in the range {lo}<=x<={hi}.")
        return number

    return convert


def float_range(lo: float, hi: float) -> Callable[[str], float]:
    """A number from lo to hi; Python's float() reads it."""

    def convert(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise BadValue(f"{value!r} is not a valid float range.") from None
        # Written as two comparisons on purpose: NaN passes here (as it always
        # has) and the daemon refuses it with its own message.
        if number < lo or number > hi:
            raise BadValue(f"{number} is not in the range {lo}<=x<={hi}.")
        return number

    return convert


def begin_time(value: str) -> float:
    """--begin WHEN (tsd.jobcontrols.parse_when) as epoch seconds, from now."""
    import time

    from tsd.jobcontrols import parse_when

    try:
        return parse_when(value, time.time())
    except ValueError as exc:
        raise BadValue(str(exc)) from None


def array_spec(value: str) -> str:
    """--array SPEC, checked here (tsd.jobcontrols.parse_array); it travels as written."""
    from tsd.jobcontrols import parse_array

    try:
        parse_array(value)
    except ValueError as exc:
        raise BadValue(str(exc)) from None
    return value


class Choice:
    """One of a few words; the words are also what shell completion offers."""

    __slots__ = ("choices",)

    def __init__(self, *choices: str) -> None:
        self.choices = choices

    def __call__(self, value: str) -> str:
        if value not in self.choices:
            listed = ", ".join(map(repr, self.choices))
            raise BadValue(f"{value!r} is not one of {listed}.")
        return value


_CHOICE_FORMAT = Choice("default", "json", "tab")

WATCH_SECONDS = "1"  # --watch without a value: redraw every second


def interval(value: str) -> float:
    """--watch's refresh interval: seconds from 0.1 to 3600 (`2`, `0.5`)."""
    try:
        seconds = float(value)
    except ValueError:
        raise BadValue(f"{value!r} is not a number of seconds") from None
    if not 0.1 <= seconds <= 3600:
        raise BadValue(f"{value} is not in the range 0.1<=x<=3600.")
    return seconds


# ------------------------------------------------------------ option table


class Kind:
    """How an option takes its value (the values are plain strings: no enum at start-up)."""

    FLAG = "flag"  # no value
    VALUE = "value"  # a value is required: attached or the next word
    OPT_INT = "opt_int"  # optional; the next word only if it is an integer
    OPT_IDS = "opt_ids"  # optional; the next word only if it is `int[,int...]`
    OPT_WORD = "opt_word"  # optional; the next word unless it looks like an option


class Opt:
    """One ts option: how it is spelled, parsed, converted, documented and what it selects."""

    __slots__ = (
        "action", "dest", "flag_value", "help", "kind", "long", "metavar", "section",
        "short", "value",
    )  # fmt: skip

    def __init__(
        self,
        dest: str,
        short: str | None,
        long: str | None,
        kind: str,
        section: str,
        action: str | None,
        metavar: str,
        help: str,
        value: Callable[[str], Any] | None = None,
        flag_value: str = "",
    ) -> None:
        self.dest = dest
        self.short = short
        self.long = long
        self.kind = kind
        self.section = section  # where ts -h and the man page list it
        self.action = action  # the action it selects, if any
        self.metavar = metavar
        self.help = help
        # What turns the option's text into its value (flags have none).
        self.value: Callable[[str], Any] = value or (job_id if kind == Kind.OPT_INT else text)
        # The text an optional-value option stands for when given without a value.
        self.flag_value = flag_value

    @property
    def spelled(self) -> str:
        """The name used in messages: `-t` or `--getenv`."""
        return f"-{self.short}" if self.short else f"--{self.long}"

    @property
    def names(self) -> tuple[str, ...]:
        """Every spelling: the short one first, then the long one."""
        out = (f"-{self.short}",) if self.short else ()
        return out + ((f"--{self.long}",) if self.long else ())

    def convert(self, value: str | None) -> Any:
        """The option's value, from its text (None: given without one); UsageError if bad."""
        if self.kind == Kind.FLAG:
            return True
        try:
            return self.value(self.flag_value if value is None else value)
        except BadValue as exc:
            raise UsageError(f"invalid value for {self.spelled}: {exc}") from None

    def __repr__(self) -> str:
        return f"Opt({self.spelled})"


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
        "serialize the job list to the specified format. Choices: {default, json, tab}.",
        value=_CHOICE_FORMAT, flag_value="default"),
    Opt("watch", None, "watch", OW, LA, "list", "[sec]",
        "show the job list (with -A: everyone's) live, redrawn in place every sec seconds "
        "(1 by default) on a terminal; q or Ctrl-C quits.",
        value=interval, flag_value=WATCH_SECONDS),
    Opt("set_gpu_free_perc", None, "set_gpu_free_perc", VAL, LA, "set_gpu_free_perc", "<num>",
        "set the value of GPU memory threshold above which GPUs are considered available "
        "(90 by default).",
        value=float_range(0.0, 100.0)),
    Opt("get_gpu_free_perc", None, "get_gpu_free_perc", FL, LA, "get_gpu_free_perc", "",
        "get the value of GPU memory threshold above which GPUs are considered available."),
    Opt("stats", None, "stats", FL, LA, "stats", "",
        "accounting per user: jobs, failed, slot-hours, GPU-hours, mean wait. Yours;"
        " every user's with -A (admins). With -M json: a JSON list."),
    Opt("since", None, "since", VAL, LA, None, "<when>",
        "with --stats: only jobs that ended since WHEN (7d, 24h, 30m, or an ISO time).",
        value=since),
    Opt("release", None, "release", OI, LA, "release", "[id]",
        "queue a held job again, at its place. The last added, if not specified."),
    # long option adding jobs
    Opt("gpus", "G", "gpus", OI, LJ, None, "[num]",
        "number of GPUs required by the job (1 if no number is given).",
        value=int_range(0, MAX_GPUS), flag_value="1"),
    Opt("gpu_indices", "g", "gpu_indices", IDS, LJ, None, "[id,...]",
        "the job will be on these GPU indices without checking whether they are free. "
        "Without ids and without a command: list all jobs running on GPUs and the "
        "corresponding GPU IDs, and the GPUs.",
        value=id_list(0)),
    Opt("gpu_mem", None, "gpu-mem", VAL, LJ, None, "<size>",
        "GPU memory the job needs on each of its GPUs (20G, 512M; MiB when bare). It may "
        "share its GPUs with other --gpu-mem jobs while their sizes fit. Implies -G 1.",
        value=gpu_mem_size),
    Opt("timeout", None, "timeout", VAL, LJ, None, "<seconds>",
        "kill the job if it runs longer than this (seconds, or with a unit: 90s, 30m, 2h,"
        " 1d).",
        value=duration),
    Opt("hold", None, "hold", OI, LJ, None, "[id]",
        "queue the job held: it never starts until ts --release. With an id and no"
        " command: hold that queued job.",
        flag_value=""),
    Opt("begin", None, "begin", VAL, LJ, None, "<when>",
        "do not start the job before WHEN: +90s, +30m, +2h, HH:MM (the next such time)"
        " or 2026-12-03T08:00.",
        value=begin_time),
    Opt("retry", None, "retry", VAL, LJ, None, "<num>",
        "queue the job again (same id) when it exits non-zero, up to num more times"
        " (0-100; not after -k or --timeout).",
        value=int_range(0, 100)),
    Opt("array", None, "array", VAL, LJ, None, "<spec>",
        "queue one job per index: A-B, A-B:STEP or A,B,C, with %K to run at most K at"
        " once; each gets TS_ARRAY_TASK_ID and TS_ARRAY_JOB_ID. Prints every id.",
        value=array_spec),
    Opt("priority", None, "priority", VAL, LJ, None, "<num>",
        "place the job among your own queued jobs: higher first (-100 to 100, default 0).",
        value=int_range(-100, 100)),
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
        "swap two jobs in the queue.",
        value=id_pair),
    Opt("help", "h", "help", FL, A, "help", "",
        "show this help"),
    Opt("version", "V", "version", FL, A, "version", "",
        "show the program version"),
    # options adding jobs
    Opt("no_block", "B", None, FL, J, None, "",
        "in case of full queue on the server, quit (2) instead of waiting."),
    Opt("no_output", "n", None, FL, J, None, "",
        "don't store the output of the command: it goes to this ts's stdout and stderr."),
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
        "the job will be run after the job of given IDs ends.",
        value=id_list(1)),
    Opt("depend_ok", "W", None, VAL, J, None, "<id,...>",
        "the job will be run after the job of given IDs ends well (exit code 0).",
        value=id_list(1)),
    Opt("label", "L", None, VAL, J, None, "<lab>",
        "name this task with a label, to be distinguished on listing."),
    Opt("num_slots", "N", None, VAL, J, None, "<num>",
        "number of slots required by the job (1 default).",
        value=int_range(1, MAX_SLOTS)),
)

BY_SHORT = {o.short: o for o in OPTIONS if o.short}
BY_LONG = {o.long: o for o in OPTIONS if o.long}
BY_DEST = {o.dest: o for o in OPTIONS}

# ts -h lists `-g` twice in task-spooler: as a job option and as an action.
GPU_LIST_HELP = ("-g", "list all jobs running on GPUs and the corresponding GPU IDs, and the GPUs "
                 "(memory, utilisation, temperature, power, who holds each); -M json: as JSON.")


# ----------------------------------------------------------------- parsing


class ParsedLine:
    """A command line split by the table: the options given, their values, the command."""

    __slots__ = ("command", "given", "values")

    def __init__(
        self, given: list[tuple[Opt, str | None]], values: dict[str, Any], command: list[str]
    ) -> None:
        self.given = given  # every option occurrence in order, with its text if it had one
        self.values = values  # dest -> value for every option (False/None when not given)
        self.command = command

    @property
    def present(self) -> set[str]:
        """The dests of the options given."""
        return {opt.dest for opt, _ in self.given}


def _find_long(name: str, exact: bool) -> Opt:
    if name in BY_LONG:  # spelled with a dash in the table (--gpu-mem)
        return BY_LONG[name]
    key = name.replace("-", "_")
    if key in BY_LONG:
        return BY_LONG[key]
    key = name.replace("_", "-")
    if key in BY_LONG:
        return BY_LONG[key]
    if exact:
        raise UsageError(f"No such option: --{name}")
    # getopt_long accepts any unambiguous prefix.
    key = name.replace("-", "_")
    hits = [o for n, o in BY_LONG.items() if n.replace("-", "_").startswith(key)] if key else []
    if len(hits) == 1:
        return hits[0]
    if hits:
        names = ", ".join("--" + str(o.long) for o in hits)
        raise UsageError(f"option --{name} is ambiguous ({names})")
    raise UsageError(f"unknown option --{name} (see ts -h)")


def _takes(kind: str, word: str) -> bool:
    """Whether an optional value may be `word` (the word after the option)."""
    if kind == Kind.OPT_INT:
        return _is_int(word)
    if kind == Kind.OPT_IDS:
        return _is_ids(word)
    if kind == Kind.OPT_WORD:
        return not word.startswith("-")
    return False


def _looks_like_option(word: str) -> bool:
    return len(word) > 1 and word[0] == "-"


def scan(argv: Sequence[str]) -> tuple[list[tuple[Opt, str | None]], list[str]]:
    """Split argv getopt-style ("+": stop at the first non-option) into options and command.

    An optional value written onto its option (`-t5`, `--serialize=json`)
    is the value, whatever it is, except one that looks like an option
    itself (`-t-5`): ts has always read that as the option without a value
    followed by those options, and says "No such option" for unknown ones.
    """
    words = list(argv)
    given: list[tuple[Opt, str | None]] = []
    inserted = -1  # index of a word put back from an optional value (see above)
    i = 0

    def next_word(opt: Opt) -> str:
        nonlocal i
        if i + 1 >= len(words):
            raise UsageError(f"option {opt.spelled} requires a value {opt.metavar}".rstrip())
        i += 1
        return words[i]

    def optional(opt: Opt, attached: str | None) -> None:
        nonlocal inserted
        if attached is None:
            # A separate word is the value only if it has the value's shape.
            if i + 1 < len(words) and _takes(opt.kind, words[i + 1]):
                given.append((opt, next_word(opt)))
            else:
                given.append((opt, None))
        elif _looks_like_option(attached):
            given.append((opt, None))
            words.insert(i + 1, attached)
            inserted = i + 1
        else:
            given.append((opt, attached))

    while i < len(words):
        arg = words[i]
        put_back = i == inserted
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            name, eq, val = arg[2:].partition("=")
            opt = _find_long(name, exact=put_back)
            if opt.kind == Kind.FLAG:
                if eq:
                    raise UsageError(f"option --{opt.long} takes no value")
                given.append((opt, None))
            elif opt.kind == Kind.VALUE:
                given.append((opt, val if eq else next_word(opt)))
            else:
                optional(opt, val if eq else None)
            i += 1
            continue
        if arg.startswith("-") and len(arg) > 1:
            j = 1
            while j < len(arg):
                ch = arg[j]
                found = BY_SHORT.get(ch)
                if found is None:
                    if put_back:
                        raise UsageError(f"No such option: -{ch}")
                    raise UsageError(f"unknown option -{ch} (see ts -h)")
                rest = arg[j + 1 :]
                if found.kind == Kind.FLAG:
                    given.append((found, None))
                    j += 1
                    continue
                if found.kind == Kind.VALUE:
                    given.append((found, rest if rest else next_word(found)))
                else:
                    optional(found, rest if rest else None)
                break
            i += 1
            continue
        break
    return given, words[i:]


def parse(argv: Sequence[str]) -> ParsedLine:
    """Parse ts's argv by the table: options, their converted values, and the command.

    When an option is given more than once, its last occurrence wins; values
    are checked in the order the options first appear. Raises UsageError.
    """
    given, command = scan(argv)
    last: dict[str, tuple[Opt, str | None]] = {}
    for opt, value in given:
        last[opt.dest] = (opt, value)
    values: dict[str, Any] = {o.dest: False if o.kind == Kind.FLAG else None for o in OPTIONS}
    for dest, (opt, value) in last.items():
        values[dest] = opt.convert(value)
    return ParsedLine(given, values, command)


# -------------------------------------------------------------------- help


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
    out += [f"  {name:<19} {about}" for name, about in ENV_VARS]
    for section in SECTIONS:
        out.append(f"{section}:")
        rows = [(left(o), o.help) for o in OPTIONS if o.section == section]
        if section == SECTION_ACTIONS:
            rows.insert(3, GPU_LIST_HELP)
        width = max(len(r[0]) for r in rows) + 2
        out += [f"  {a:<{width}} {b}" for a, b in rows]
    return "\n".join(out) + "\n"
