"""ts's argv -> request mapping, for every flag, without a daemon.

Also the client-side pieces that need no daemon: following a (gzipped)
output file for -t/-c, the help text, the generated man page and shell
completion, and the shape of the client's modules (no click, no cycles).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsd import __version__, cli_options, cli_output, manpage, protocol
from tsd.cli_completion import SOURCE
from tsd.cli_options import OPTIONS, Kind, UsageError
from tsd.cli_request import Invocation, invocation, parse_argv
from tsd.client import Connection
from tsd.errors import BadRequest, ServerUnavailable, TsdError
from tsd.model import DependMode

ENV = {"HOME": "/home/alice", "PATH": "/usr/bin"}


def parse(*argv: str) -> Invocation:
    return parse_argv(list(argv), ENV, "/work/dir", 0o027)


def submit(*argv: str) -> protocol.Submit:
    inv = parse(*argv)
    assert inv.action == "submit"
    assert isinstance(inv.request, protocol.Submit)
    return inv.request


def usage_error(*argv: str) -> str:
    with pytest.raises(UsageError) as info:
        parse(*argv)
    return str(info.value)


# ---------------------------------------------------------------- submit


def test_bare_command_is_queued_with_cwd_env_umask_and_defaults() -> None:
    req = submit("python", "train.py")
    spec = req.spec
    assert spec.command == ("python", "train.py")
    assert spec.cwd == "/work/dir"
    assert dict(spec.env) == ENV
    assert spec.umask == 0o027
    assert (spec.slots, spec.gpus, spec.gpu_indices, spec.depends) == (1, 0, None, ())
    assert spec.store_output and not spec.gzip and not spec.stderr_apart and not spec.mail
    assert spec.label is None and spec.output_name is None and spec.timeout is None
    assert req.block and not req.depend_last


def test_parsing_stops_at_the_first_non_option_word() -> None:
    spec = submit("-L", "x", "python", "train.py", "--lr", "3", "-n").spec
    assert spec.command == ("python", "train.py", "--lr", "3", "-n")
    assert spec.label == "x"
    assert spec.store_output


def test_double_dash_ends_options() -> None:
    assert submit("--", "-weird").spec.command == ("-weird",)


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["-n"], "store_output", False),
        (["-E"], "stderr_apart", True),
        (["-z"], "gzip", True),
        (["-m"], "mail", True),
        (["-O", "run.log"], "output_name", "run.log"),
        (["-Orun.log"], "output_name", "run.log"),
        (["-L", "exp 1"], "label", "exp 1"),
        (["-L", "-dash"], "label", "-dash"),
        (["-N", "3"], "slots", 3),
        (["-N3"], "slots", 3),
        (["-G", "2"], "gpus", 2),
        (["--gpus", "2"], "gpus", 2),
        (["--gpus=2"], "gpus", 2),
        (["-G"], "gpus", 1),
        (["-G0"], "gpus", 0),
        (["--timeout", "90"], "timeout", 90.0),
        (["--timeout", "30m"], "timeout", 1800.0),
        (["--timeout=1.5h"], "timeout", 5400.0),
        (["--timeout", "2d"], "timeout", 172800.0),
    ],
)
def test_job_option_sets_spec_field(argv: list[str], field: str, value: object) -> None:
    spec = submit(*argv, "true").spec
    assert getattr(spec, field) == value


def test_gpu_indices_pin_gpus_and_imply_the_count() -> None:
    for argv in (["-g", "0,2"], ["-g0,2"], ["--gpu_indices", "0,2"], ["--gpu_indices=0,2"]):
        spec = submit(*argv, "python", "x.py").spec
        assert spec.gpu_indices == (0, 2)
        assert spec.gpus == 2


def test_optional_gpu_count_does_not_swallow_the_command() -> None:
    spec = submit("-G", "python", "x.py").spec
    assert spec.gpus == 1
    assert spec.command == ("python", "x.py")


def test_dependencies_after_and_success() -> None:
    after = submit("-D", "3,4", "true")
    assert after.spec.depends == (3, 4) and after.spec.depend_mode is DependMode.AFTER
    ok = submit("-W", "5", "true")
    assert ok.spec.depends == (5,) and ok.spec.depend_mode is DependMode.SUCCESS
    last = submit("-d", "true")
    assert last.depend_last and last.spec.depends == ()
    both = submit("-d", "-D", "1", "true")
    assert both.depend_last and both.spec.depends == (1,)


def test_no_block_and_foreground_flags() -> None:
    assert submit("-B", "true").block is False
    inv = parse("-f", "true")
    assert inv.foreground and inv.print_id
    transparent = parse("-nf", "true")
    assert transparent.foreground and not transparent.print_id
    assert parse("-n", "true").print_id


def test_clustered_short_flags_with_a_trailing_value() -> None:
    spec = submit("-nzEL", "lab", "true").spec
    flags = (spec.store_output, spec.gzip, spec.stderr_apart, spec.label)
    assert flags == (False, True, True, "lab")


def test_list_flags_followed_by_a_command_queue_it_like_task_spooler() -> None:
    assert submit("-l", "echo", "hi").spec.command == ("echo", "hi")


def test_undecodable_environment_variables_are_left_out() -> None:
    env = {"GOOD": "1", "BAD": "\udcff", "": "x"}
    inv = parse_argv(["true"], env, "/w", 0o022)
    assert isinstance(inv.request, protocol.Submit)
    assert dict(inv.request.spec.env) == {"GOOD": "1"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-N", "0", "true"], "-N"),
        (["-N", "x", "true"], "-N"),
        (["-D", "a,b", "true"], "-D"),
        (["-D", "0", "true"], "-D"),
        (["-W", "1", "-D", "2", "true"], "either -D or -W"),
        (["-O", "a/b", "true"], "without any path"),
        (["-m", "-n", "true"], "e-mail"),
        (["-m", "-z", "true"], "e-mail"),
        (["-g", "python"], "-g needs GPU indices"),
        (["-G", "3", "-g", "0,1", "true"], "disagrees"),
        (["--timeout", "0", "true"], "--timeout"),
        (["--timeout", "soon", "true"], "--timeout"),
        (["-L"], "requires a value"),
        (["-x", "true"], "unknown option -x"),
        (["--bogus", "true"], "unknown option --bogus"),
        (["--gpu", "1", "true"], "ambiguous"),
        (["--count_running=3"], "takes no value"),
    ],
)
def test_bad_job_options_are_usage_errors(argv: list[str], message: str) -> None:
    assert message in usage_error(*argv)


def test_unreadable_cwd_refuses_to_queue() -> None:
    with pytest.raises(UsageError, match="current directory"):
        parse_argv(["true"], ENV, None, 0o022)


def test_command_words_that_are_not_utf8_are_refused() -> None:
    assert "UTF-8" in usage_error("echo", "\udcff")


# --------------------------------------------------------------- actions


def test_no_arguments_lists_own_jobs() -> None:
    inv = parse()
    assert inv.action == "list"
    assert inv.request == protocol.ListJobs(all_users=False, rows=True)
    assert inv.list_format == "default"


def test_list_variants() -> None:
    assert parse("-l").request == protocol.ListJobs(rows=True)
    every = parse("-A")
    assert every.request == protocol.ListJobs(all_users=True, rows=True) and every.all_users
    assert parse("-M", "json").list_format == "json"
    assert parse("--serialize", "tab").list_format == "tab"
    assert parse("--serialize=json").list_format == "json"
    assert parse("-Mtab").list_format == "tab"
    assert parse("-M").list_format == "default"
    combined = parse("-l", "-A", "-M", "json")
    assert combined.list_format == "json" and combined.all_users
    assert "-M" in usage_error("-M", "yaml")


@pytest.mark.parametrize(
    ("flag", "action", "default"),
    [
        ("-i", "info", "run"),
        ("-p", "pid", "run"),
        ("-o", "output", "run"),
        ("-s", "state", "added"),
        ("-a", "get_label", "added"),
        ("--get_label", "get_label", "added"),
        ("-F", "full_cmd", "added"),
        ("--full_cmd", "full_cmd", "added"),
    ],
)
def test_job_queries_with_and_without_id(flag: str, action: str, default: str) -> None:
    bare = parse(flag)
    assert bare.action == action
    assert bare.request == protocol.GetJob(id=None, default=default)  # type: ignore[arg-type]
    assert parse(flag, "12").request == protocol.GetJob(id=12, default=default)  # type: ignore[arg-type]
    if flag.startswith("--"):
        assert parse(f"{flag}=12").request == protocol.GetJob(id=12, default=default)  # type: ignore[arg-type]
    else:
        assert parse(f"{flag}12").request == protocol.GetJob(id=12, default=default)  # type: ignore[arg-type]


def test_last_queue_id() -> None:
    for flag in ("-q", "--last_queue_id"):
        inv = parse(flag)
        assert inv.action == "last_queue_id"
        assert inv.request == protocol.GetJob(id=None, default="added")


@pytest.mark.parametrize(
    ("flag", "cls"),
    [("-r", protocol.Remove), ("-u", protocol.Urgent), ("-k", protocol.Kill)],
)
def test_queue_edits_take_an_optional_id(flag: str, cls: type) -> None:
    assert parse(flag).request == cls(id=None)
    assert parse(flag, "4").request == cls(id=4)


def test_wait_tail_and_cat() -> None:
    assert parse("-w").request == protocol.Wait(id=None, default="added")
    assert parse("-w", "3").request == protocol.Wait(id=3, default="added")
    for flag, action in (("-t", "tail"), ("-c", "cat")):
        inv = parse(flag)
        assert inv.action == action
        assert inv.request == protocol.Wait(id=None, default="run", notify_start=True)
        assert parse(flag, "9").request == protocol.Wait(id=9, default="run", notify_start=True)


def test_optional_id_takes_only_an_integer() -> None:
    assert "job ids are numbers" in usage_error("-t", "abc")
    assert "-t" in usage_error("-tx")
    assert "only one action" in usage_error("-i", "-l")


def test_swap() -> None:
    assert parse("-U", "2-5").request == protocol.Swap(a=2, b=5)
    assert "-U" in usage_error("-U", "2")
    assert "different" in usage_error("-U", "3-3")
    assert "requires a value" in usage_error("-U")


def test_simple_actions() -> None:
    assert parse("-T").request == protocol.KillAll()
    assert parse("-C").request == protocol.Clear()
    assert parse("-K").request == protocol.Shutdown()
    assert parse("-R").request == protocol.CountRunning()
    assert parse("--count_running").request == protocol.CountRunning()


def test_slots_get_set_and_drain() -> None:
    assert parse("-S").request == protocol.Slots(value=None)
    assert parse("-S", "4").request == protocol.Slots(value=4)
    assert parse("-S", "0").request == protocol.Slots(value=0)


def test_env_actions() -> None:
    assert parse("--getenv", "FOO").request == protocol.Env(action="get", name="FOO")
    assert parse("--setenv", "FOO=a=b").request == protocol.Env(
        action="set", name="FOO", value="a=b"
    )
    assert parse("--setenv=FOO=").request == protocol.Env(action="set", name="FOO", value="")
    assert parse("--unsetenv", "FOO").request == protocol.Env(action="unset", name="FOO")
    assert "VAR=VALUE" in usage_error("--setenv", "FOO")
    assert "without '='" in usage_error("--getenv", "A=B")


def test_logdir_and_gpu_free_percentage() -> None:
    assert parse("--get_logdir").request == protocol.LogDir(path=None)
    assert parse("--set_logdir", "/data/logs").request == protocol.LogDir(path="/data/logs")
    assert parse("--set_logdir", "logs/../out").request == protocol.LogDir(path="/work/dir/out")
    assert parse("--get_gpu_free_perc").request == protocol.GpuFreePerc(value=None)
    assert parse("--set_gpu_free_perc", "80").request == protocol.GpuFreePerc(value=80.0)
    assert "--set_gpu_free_perc" in usage_error("--set_gpu_free_perc", "101")


def test_gpu_listing_is_bare_g_without_a_command() -> None:
    inv = parse("-g")
    assert inv.action == "gpu_status"
    assert inv.request == protocol.GpuStatus()
    assert parse("--gpu_indices").action == "gpu_status"
    assert parse("-g", "-M", "json").action == "gpu_status"
    # --stats took -M for itself: two actions, said in one line (hypothesis found a crash)
    assert "only one action at a time (--stats, -g given)" in usage_error("--stats", "-g", "-M")


def test_help_and_version() -> None:
    assert parse("-h").action == "help"
    assert parse("--help").action == "help"
    assert parse("-l", "-h").action == "help"
    assert parse("-V").action == "version"
    assert parse("--version").action == "version"


def test_actions_take_no_command() -> None:
    assert "-k takes no command" in usage_error("-k", "echo", "hi")


def test_every_option_in_the_table_parses() -> None:
    # A guard for the table itself: each option, spelled each way it can be, parses.
    samples = {
        Kind.VALUE: {"swap": "1-2", "setenv": "A=1", "set_gpu_free_perc": "50",
                         "depend": "1", "depend_ok": "1", "num_slots": "2",
                         "timeout": "5", "begin": "+5s", "retry": "2", "array": "1-3",
                         "priority": "5", "gpu_mem": "20G", "since": "7d"},
    }  # fmt: skip
    for opt in OPTIONS:
        value = samples.get(opt.kind, {}).get(opt.dest, "x" if opt.kind == Kind.VALUE else None)
        spellings = [f"-{opt.short}"] if opt.short else []
        if opt.long:
            spellings.append(f"--{opt.long}")
        for spelled in spellings:
            argv = [spelled] + ([value] if value is not None else [])
            if opt.dest == "since":
                argv.append("--stats")  # it qualifies --stats, alone it is refused
            elif opt.action is None and opt.dest != "gpu_indices":
                argv.append("true")
            parse(*argv)


# ------------------------------------------------ the table is the parser

# Values that have the right shape for some option, the wrong shape for others,
# or a shape only Python's int()/float() read (signs, spaces, other scripts' digits).
VALUES = (
    "", "0", "1", "2", "5", "007", "+3", "-1", "-5", " 3", "3 ", "\u0663", "1_0", "1e2",
    "1,2", "0,1", "1,,2", ",1", "1,", "a", "x1", "json", "tab", "default", "yaml", "JSON",
    "-x", "--", "-", "-M", "1-2", "3-3", "2-", "-2", "90", "30m", "1.5h", "2d", " 2 h ",
    ".5", "5.", "50.5", "nan", "inf", "100", "101", "100.0", "1024", "1025", "65536",
    "65537", "9007199254740992", "9007199254740993", "A=1", "x y", "a/b",
)


def _spellings(opt: cli_options.Opt, value: str | None) -> list[list[str]]:
    """Every way to write `opt` with `value` (None: without one) as its own words."""
    out = []
    if opt.short:
        out.append([f"-{opt.short}"] + ([value] if value is not None else []))
        if value:
            out.append([f"-{opt.short}{value}"])
    if opt.long:
        out.append([f"--{opt.long}"] + ([value] if value is not None else []))
        if value is not None:
            out.append([f"--{opt.long}={value}"])
    return out


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    argv: list[str] = []
    for _ in range(draw(st.integers(0, 5))):
        opt = draw(st.sampled_from(OPTIONS))
        value = draw(st.none() | st.sampled_from(VALUES) | st.text(max_size=6))
        argv += draw(st.sampled_from(_spellings(opt, value)))
    argv += draw(st.lists(st.sampled_from(["true", "echo", "-n", "--", "5", "x"]), max_size=3))
    return argv


# A value of the right shape for each option that takes one, and what it stands for.
NEXT_YEAR = datetime.now().year + 1
GOOD_VALUES: dict[str, tuple[str, object]] = {
    "getenv": ("FOO", "FOO"), "setenv": ("A=1", "A=1"), "unsetenv": ("FOO", "FOO"),
    "get_label": ("3", 3), "full_cmd": ("4", 4), "set_logdir": ("/d", "/d"),
    "serialize": ("json", "json"), "set_gpu_free_perc": ("12.5", 12.5), "gpus": ("2", 2),
    "gpu_indices": ("0,3", (0, 3)), "timeout": ("2m", 120.0), "slots": ("0", 0),
    "tail": ("9", 9), "cat": ("8", 8), "pid": ("7", 7), "output": ("6", 6), "info": ("5", 5),
    "state": ("4", 4), "remove": ("3", 3), "wait": ("2", 2), "kill": ("1", 1),
    "urgent": ("11", 11), "swap": ("2-5", (2, 5)), "output_name": ("log", "log"),
    "depend": ("1,2", (1, 2)), "depend_ok": ("3", (3,)), "label": ("lab", "lab"),
    "num_slots": ("4", 4), "hold": ("12", 12), "release": ("13", 13),
    "begin": (f"{NEXT_YEAR}-01-01T00:00", datetime(NEXT_YEAR, 1, 1).timestamp()),
    "retry": ("3", 3),
    "array": ("1-9:2%3", "1-9:2%3"), "priority": ("-7", -7), "gpu_mem": ("1.5G", 1536),
    "since": ("2026-01-02T03:04", datetime(2026, 1, 2, 3, 4).timestamp()),
    "watch": ("2", 2.0),
}  # fmt: skip


@st.composite
def well_formed_lines(draw: st.DrawFn) -> tuple[list[str], dict[str, object], list[str]]:
    """A command line of options with good values in any spelling, what the table says
    each option's value is (the last occurrence wins), and the command."""
    argv: list[str] = []
    expected: dict[str, object] = {}
    for _ in range(draw(st.integers(0, 6))):
        opt = draw(st.sampled_from(OPTIONS))
        if opt.kind == Kind.FLAG:
            argv.append(draw(st.sampled_from(opt.names)))
            expected[opt.dest] = True
            continue
        text, value = GOOD_VALUES[opt.dest]
        argv += draw(st.sampled_from(_spellings(opt, text)))
        expected[opt.dest] = value
    command = draw(st.lists(st.sampled_from(["true", "-n", "x", "5", "--lr"]), max_size=3))
    if command and command[0].startswith("-"):
        argv.append("--")
    return argv + command, expected, command


@settings(max_examples=400, deadline=None)
@given(well_formed_lines())
def test_any_spelling_of_well_formed_options_gives_the_values_the_table_says(
    line: tuple[list[str], dict[str, object], list[str]],
) -> None:
    argv, expected, command = line
    parsed = cli_options.parse(argv)
    assert parsed.command == command
    for opt in OPTIONS:
        default = False if opt.kind == Kind.FLAG else None
        assert parsed.values[opt.dest] == expected.get(opt.dest, default), opt


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([o for o in OPTIONS if o.kind == Kind.FLAG and o.short]),
                min_size=1, max_size=5))
def test_short_flags_bundle_like_getopt(flags: list[cli_options.Opt]) -> None:
    bundled = cli_options.parse(["-" + "".join(str(o.short) for o in flags), "true"])
    apart = cli_options.parse([f"-{o.short}" for o in flags] + ["true"])
    assert bundled.values == apart.values
    assert bundled.command == apart.command == ["true"]


@settings(max_examples=400, deadline=None)
@given(command_lines())
def test_any_command_line_parses_or_is_one_usage_error(argv: list[str]) -> None:
    try:
        inv = parse_argv(argv, ENV, "/work/dir", 0o027)
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert inv.action in {o.action for o in OPTIONS} | {"submit", "gpu_status", "hold"}
    assert inv.request is not None or inv.action in ("help", "version")


def test_a_value_is_checked_only_in_its_last_occurrence() -> None:
    # ts has always let a later occurrence of an option replace an earlier one.
    assert submit("-N", "x", "-N", "2", "true").spec.slots == 2
    assert usage_error("-N", "2", "-N", "x", "true").startswith("invalid value for -N")


def test_an_optional_value_that_looks_like_an_option_is_read_as_options() -> None:
    assert usage_error("-t-5") == "No such option: -5"
    assert parse("-M-A").all_users and parse("-M-A").list_format == "default"
    assert "only one action" in usage_error("-t-l")


COMMON_COMMAND_LINES = [
    [], ["-l"], ["-A"], ["-l", "-A"], ["-M", "json"], ["-Mtab"], ["-M"], ["--serialize=json"],
    ["-s"], ["-s", "4"], ["-p", "3"], ["-o"], ["-i", "12"], ["-w"], ["-w", "7"], ["-k"],
    ["-r", "2"], ["-c"], ["-t", "9"], ["-t"], ["-q"], ["-R"], ["-S"], ["-S", "4"], ["-S0"],
    ["-T"], ["-C"], ["-K"], ["-u", "3"], ["-U", "2-5"], ["-a"], ["-F", "4"], ["-g"], ["-V"],
    ["--getenv", "FOO"], ["--setenv", "A=1"], ["--set_gpu_free_perc", "80"],
    ["--set_gpu_free_perc", "12.5"], ["--get_gpu_free_perc"], ["--set_logdir", "/tmp"],
    ["true"], ["-n", "true"], ["-L", "x", "python", "t.py", "--lr", "3"], ["-N", "2", "true"],
    ["-N2", "true"], ["-G", "true"], ["-G", "2", "true"], ["-G0", "true"], ["--gpus=3", "true"],
    ["-g", "0,1", "true"], ["-g0", "true"], ["-d", "true"], ["-D", "1,2", "true"],
    ["-W", "3", "true"], ["-O", "log", "true"], ["-zEB", "true"], ["-nf", "true"], ["-m", "x"],
    ["--timeout", "90", "true"], ["--timeout=1.5h", "true"], ["--timeout", "30m", "true"],
    ["-n", "-L", "lab", "-N", "1", "-G", "1", "-D", "4", "-O", "o", "-z", "-E", "-B", "true"],
    ["--hold", "3"], ["--release", "3"], ["--stats"], ["--stats", "-A", "-M", "json"],
    ["--unsetenv", "FOO"], ["--get_logdir"], ["-l", "--watch"],
]


def test_common_command_lines_import_neither_click_nor_typing() -> None:
    script = (
        "import sys\n"
        "from tsd.cli_request import parse_argv\n"
        f"for argv in {COMMON_COMMAND_LINES!r}:\n"
        "    parse_argv(argv, {}, '/w')\n"
        "print(sorted(m for m in ('click', 'typing') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_a_bad_value_gets_the_message_ts_has_always_given() -> None:
    # These were click 8.1's words; ts now says them itself, whatever click is installed.
    assert usage_error("-N", "x", "true") == (
        "invalid value for -N: 'x' is not a valid integer range."
    )
    assert usage_error("-M", "yaml") == (
        "invalid value for -M: 'yaml' is not one of 'default', 'json', 'tab'."
    )
    assert usage_error("-N", "0", "true") == (
        "invalid value for -N: 0 is not in the range 1<=x<=65536."
    )
    assert usage_error("--set_gpu_free_perc", "101") == (
        "invalid value for --set_gpu_free_perc: 101.0 is not in the range 0.0<=x<=100.0."
    )
    assert usage_error("-t-5") == "No such option: -5"
    assert submit("-N", "+2", "true").spec.slots == 2  # Python's int() reads it; so does ts


def test_ts_works_without_click_installed() -> None:
    script = (
        "import sys\n"
        "sys.modules['click'] = None  # any import of click now fails\n"
        "from tsd import cli, cli_completion, cli_options, manpage\n"
        "from tsd.cli_request import parse_argv\n"
        f"for argv in {COMMON_COMMAND_LINES!r}:\n"
        "    parse_argv(argv, {}, '/w')\n"
        "assert cli_options.help_text() and manpage.render()\n"
        "words = {'COMP_WORDS': 'ts -M ', 'COMP_CWORD': '2'}\n"
        "assert cli_completion.answer('bash_complete', words)[1] == 'plain,default\\n"
        "plain,json\\nplain,tab\\n'\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "ok"


# --------------------------------------------------- the one submit path

def _typed_wire(
    argv: list[str], env: dict[str, str] = ENV, cwd: str = "/work/dir"
) -> dict[str, object] | None:
    """The submit request as the daemon reads it back (None for anything else)."""
    inv = parse_argv(argv, env, cwd, 0o027)
    if inv.action != "submit" or inv.request is None:
        return None
    return protocol.request_to_wire(inv.request)


def _read_back(argv: list[str]) -> dict[str, object] | None:
    """Any request as the daemon reads it back (None for help and version)."""
    inv = parse_argv(argv, ENV, "/work/dir", 0o027)
    return None if inv.request is None else protocol.request_to_wire(inv.request)


SUBMIT_LINES = [line for line in COMMON_COMMAND_LINES if _typed_wire(line) is not None]


@pytest.mark.parametrize("argv", SUBMIT_LINES, ids=" ".join)
def test_the_submit_ts_sends_is_what_the_daemon_reads(argv: list[str]) -> None:
    inv = invocation(argv, ENV, "/work/dir", 0o027)
    assert inv.wire is not None
    assert inv.wire == _typed_wire(argv)


@pytest.mark.parametrize("argv", COMMON_COMMAND_LINES, ids=" ".join)
def test_every_request_ts_sends_is_what_the_daemon_reads(argv: list[str]) -> None:
    # ts builds every request as it travels (no typed protocol on its path); the
    # daemon's parse_request must read back exactly that, field for field.
    try:
        inv = invocation(argv, ENV, "/work/dir", 0o027)
    except UsageError:
        return
    assert inv.wire == _read_back(argv)


def test_actions_send_their_requests_untyped_and_foreground_jobs_the_same_submit() -> None:
    assert invocation(["-h", "true"], ENV, "/work/dir", 0o027).wire is None
    for argv in (["-l"], ["-t", "3"]):
        inv = invocation(argv, ENV, "/work/dir", 0o027)
        assert inv.wire is not None and inv.request is None
    for argv in (["-f", "true"], ["-nf", "true"]):
        inv = invocation(argv, ENV, "/work/dir", 0o027)
        assert inv.wire is not None and inv.foreground
        assert inv.wire == _typed_wire(argv)


@pytest.mark.parametrize(
    ("argv", "env", "cwd"),
    [
        (["", " "], ENV, "/w"),  # an empty command
        (["-O", "a/b", "true"], ENV, "/w"),
        (["-O", "..", "true"], ENV, "/w"),
        (["-L", "x" * 1025, "true"], ENV, "/w"),
        (["-L", "\udcff", "true"], ENV, "/w"),
        (["-g", "1024", "true"], ENV, "/w"),
        (["-g", "1,1", "true"], ENV, "/w"),
        (["true"], ENV, "relative"),
        (["true"], ENV, "/\udcff"),
        (["echo", "x" * 200_000], ENV, "/w"),
    ],
)
def test_specs_the_protocol_refuses_get_the_daemons_message_as_a_usage_error(
    argv: list[str], env: dict[str, str], cwd: str
) -> None:
    # ts sends these as they are; the daemon refuses them with protocol.parse_request,
    # and ts shows that message the way parse_argv (the same function) gives it here.
    inv = invocation(argv, env, cwd, 0o022)
    assert inv.wire is not None
    with pytest.raises(BadRequest) as refused:
        protocol.parse_request(inv.wire)
    with pytest.raises(UsageError) as usage:
        parse_argv(argv, env, cwd, 0o022)
    assert str(usage.value) == refused.value.message.removeprefix("bad request: ")


@settings(max_examples=300, deadline=None)
@given(
    command_lines(),
    st.dictionaries(st.text(max_size=4), st.text(max_size=8), max_size=3),
    st.sampled_from(["/w", "/work/dir", "rel", "/\udcff", "/" + "d" * 5000]),
)
def test_what_ts_sends_and_what_parse_argv_checks_agree(
    argv: list[str], env: dict[str, str], cwd: str
) -> None:
    try:
        sent = invocation(argv, env, cwd, 0o027)
    except UsageError as exc:
        with pytest.raises(UsageError) as again:
            parse_argv(argv, env, cwd, 0o027)
        assert str(again.value) == str(exc)  # the same command-line error either way
        return
    if sent.wire is None:
        return
    try:
        typed = parse_argv(argv, env, cwd, 0o027).request
    except UsageError:
        with pytest.raises(BadRequest):
            protocol.parse_request(sent.wire)  # the daemon refuses it too
        return
    assert typed is not None
    assert sent.wire == protocol.request_to_wire(typed)


def test_connections_read_frames_and_refuse_bad_ones() -> None:
    import socket

    a, b = socket.socketpair()
    with a, b:
        conn = Connection(b)
        obj = {"ok": True, "id": 7, "text": "é\u2603"}
        a.sendall(protocol.encode(obj))
        assert conn.recv() == obj
        a.sendall((protocol.MAX_FRAME + 1).to_bytes(4, "big"))
        with pytest.raises(protocol.ProtocolError, match="over the"):
            conn.recv()
        a.sendall((2).to_bytes(4, "big") + b"[]")
        with pytest.raises(protocol.ProtocolError, match="expected a JSON object"):
            conn.recv()
        a.sendall((1).to_bytes(4, "big") + b"{")
        with pytest.raises(protocol.ProtocolError, match="malformed frame"):
            conn.recv()
        a.close()
        with pytest.raises(ServerUnavailable):
            conn.recv()


def test_queueing_a_job_imports_no_protocol_model_click_typing_or_dataclasses() -> None:
    script = (
        "import sys\n"
        "from tsd import cli\n"
        "from tsd.cli_request import invocation\n"
        f"for argv in {SUBMIT_LINES!r}:\n"
        "    assert invocation(argv, {'A': '1'}, '/w', 18).wire is not None\n"
        "loaded = ('click', 'typing', 'dataclasses', 'tsd.protocol', 'tsd.model', 'tsd.render')\n"
        "print(sorted(m for m in loaded if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


FAKE_DAEMON = """
import os, socket, sys, threading
from tsd import framing
path = os.path.join(SOCKDIR, "tsd.sock")
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
seen = []

def serve():
    conn, _ = server.accept()
    n = framing.frame_length(conn.recv(4))
    body = b""
    while len(body) < n:
        body += conn.recv(n - len(body))
    seen.append(framing.decode(body))
    conn.sendall(framing.encode(ANSWER))
    conn.close()

threading.Thread(target=serve, daemon=True).start()
os.environ["TS_SOCKET"] = path
from tsd import cli
try:
    cli.main(ARGV)
except SystemExit as exc:
    code = exc.code
loaded = ("click", "typing", "dataclasses", "tsd.protocol", "tsd.model", "tsd.render")
print(code, seen[0]["op"], seen[0]["spec"]["command"], [m for m in loaded if m in sys.modules])
"""


def _ts_against_a_fake_daemon(argv: list[str], answer: dict[str, object]) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as sockdir:  # the socket's, gone afterwards
        script = (FAKE_DAEMON.replace("ANSWER", repr(answer)).replace("ARGV", repr(argv))
                  .replace("SOCKDIR", repr(sockdir)))  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60, check=True)  # fmt: skip
    return proc.stdout, proc.stderr


def test_ts_queues_a_job_with_one_frame_and_no_typed_protocol() -> None:
    out, err = _ts_against_a_fake_daemon(["-L", "x", "echo", "hi"], {"ok": True, "id": 5})
    assert out == "5\n0 submit ['echo', 'hi'] []\n"
    assert err == ""


def test_a_spec_the_daemon_refuses_is_one_usage_line_and_exit_1() -> None:
    refusal = {"ok": False, "code": "bad_request",
               "error": "bad request: spec.output_name: a file name without any path"}  # fmt: skip
    out, err = _ts_against_a_fake_daemon(["-O", "a/b", "true"], refusal)
    assert out == "1 submit ['true'] []\n"
    assert err == "ts: spec.output_name: a file name without any path\n"


# ------------------------------------------------------ module structure

TSD = Path(__file__).parents[2] / "tsd"


def _imports(path: Path) -> set[str]:
    """The tsd modules a module imports, at the top or inside functions."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "tsd":
                found |= {f"tsd.{a.name}" for a in node.names}
            elif node.module.startswith("tsd."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tsd.")}
    return found - {"tsd.__version__"}


def test_no_import_cycles_between_tsd_modules_lazy_imports_included() -> None:
    graph = {f"tsd.{p.stem}": _imports(p) for p in TSD.glob("*.py") if p.stem != "__init__"}
    done: set[str] = set()

    def visit(mod: str, path: tuple[str, ...]) -> None:
        assert mod not in path, " -> ".join((*path, mod))
        if mod in done:
            return
        for dep in sorted(graph.get(mod, ())):
            visit(dep, (*path, mod))
        done.add(mod)

    for mod in sorted(graph):
        visit(mod, ())


CLIENT_MODULES = ("cli", "cli_options", "cli_request", "cli_output", "cli_completion", "manpage")


@pytest.mark.parametrize("name", CLIENT_MODULES)
def test_client_modules_stay_small(name: str) -> None:
    import ast

    source = (TSD / f"{name}.py").read_text()
    assert source.count("\n") <= 800
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            assert (node.end_lineno or 0) - node.lineno < 400, node.name

# ------------------------------------------------------------ followers


def test_follower_cat_copies_everything_as_the_file_grows(tmp_path: Path) -> None:
    path = tmp_path / "out"
    out = io.BytesIO()
    follower = cli_output.OutputFollower(str(path), gzipped=False, out=out, tail_lines=None)
    assert follower.poll() is False  # not created yet
    path.write_bytes(b"a\nb\n")
    assert follower.poll() is True
    with path.open("ab") as f:
        f.write(b"c\n")
    follower.poll()
    follower.close()
    assert out.getvalue() == b"a\nb\nc\n"


def test_follower_tail_starts_with_the_last_ten_lines(tmp_path: Path) -> None:
    path = tmp_path / "out"
    path.write_bytes(b"".join(b"line%d\n" % i for i in range(200_000)))
    out = io.BytesIO()
    follower = cli_output.OutputFollower(str(path), gzipped=False, out=out, tail_lines=10)
    follower.poll()
    with path.open("ab") as f:
        f.write(b"new\n")
    follower.poll()
    follower.close()
    expected = b"".join(b"line%d\n" % i for i in range(199_990, 200_000)) + b"new\n"
    assert out.getvalue() == expected


def test_follower_gunzips_partial_and_multi_member_output(tmp_path: Path) -> None:
    path = tmp_path / "out.gz"
    whole = gzip.compress(b"".join(b"row %d\n" % i for i in range(50))) + gzip.compress(b"end\n")
    out = io.BytesIO()
    follower = cli_output.OutputFollower(str(path), gzipped=True, out=out, tail_lines=3)
    half = len(whole) // 2
    path.write_bytes(whole[:half])
    follower.poll()
    with path.open("ab") as f:
        f.write(whole[half:])
    follower.poll()
    follower.close()
    text = out.getvalue()
    assert text.endswith(b"row 49\nend\n")
    assert b"row 10\n" not in text  # started near the end, not at the beginning


def test_follower_reports_a_broken_gzip_file(tmp_path: Path) -> None:
    path = tmp_path / "out.gz"
    path.write_bytes(b"this is not gzip at all")
    follower = cli_output.OutputFollower(str(path), gzipped=True, out=io.BytesIO(), tail_lines=None)
    with pytest.raises(TsdError, match="not readable as gzip"):
        follower.poll()
    follower.close()


def test_last_lines_like_tail() -> None:
    assert cli_output.last_lines(b"a\nb\nc", 2) == b"b\nc"
    assert cli_output.last_lines(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert cli_output.last_lines(b"", 10) == b""


# -------------------------------------------------------- help and man


def test_help_has_task_spoolers_sections_and_every_option() -> None:
    text = cli_options.help_text()
    assert text.startswith(f"Task Spooler v{__version__} (tsd)")
    for section in ("Env vars:", "Long option actions:", "Long option adding jobs:",
                    "Actions (can be performed only one at a time):", "Options adding jobs:"):
        assert section in text
    for opt in OPTIONS:
        assert (f"--{opt.long}" if opt.long else f"-{opt.short}") in text
    for name, _ in cli_options.ENV_VARS:
        assert f"  {name} " in text


def test_version_string_contains_the_package_version() -> None:
    assert __version__ in cli_options.VERSION_TEXT


def test_man_page_has_the_sections_and_every_option() -> None:
    page = manpage.render()
    assert "\n.TH TS 1 " in page
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "ACTIONS", "OPTIONS ADDING JOBS",
                    "ENVIRONMENT", "EXIT STATUS", "FILES"):
        assert f'.SH "{section}"' in page or f".SH {section}" in page
    assert "/run/tsd/tsd.sock" in page and "/etc/tsd/tsd.yaml" in page
    for opt in OPTIONS:
        assert manpage.escape(f"-{opt.short}" if opt.short else f"--{opt.long}") in page
    for name, _ in cli_options.ENV_VARS:
        assert name in page


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_man_page_renders_without_warnings(tmp_path: Path) -> None:
    page = tmp_path / "ts.1"
    page.write_text(manpage.render())
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert proc.stderr == ""
    out = subprocess.run(
        ["groff", "-man", "-Tascii", "-P-cbou", str(page)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "TS_SOCKET" in out and "EXIT STATUS" in out


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_tsd_8_man_page_renders_without_warnings_and_documents_the_daemon(
    tmp_path: Path,
) -> None:
    page = tmp_path / "tsd.8"
    page.write_text(manpage.render_tsd())
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    out = subprocess.run(
        ["groff", "-man", "-Tascii", "-P-cbou", str(page)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out.startswith("TSD(8)")
    for words in ("--system", "--check-config [FILE]", "SIGHUP", "/etc/tsd/tsd.yaml",
                  "/var/lib/tsd/state.db", "CONFIGURATION", "ts(1)"):
        assert words in out, words


def test_ts_man_page_refers_to_tsd_8() -> None:
    see_also = manpage.render().split('.SH "SEE ALSO"', 1)[1]
    assert "\\fBtsd\\fR(8)" in see_also


def test_man_page_module_prints_the_page() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tsd.manpage"], capture_output=True, text=True, check=True,
        env={**os.environ, "SOURCE_DATE_EPOCH": "0"},
    )
    assert '\n.TH TS 1 "1970-01-01" ' in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "tsd.manpage", "tsd"], capture_output=True, text=True,
        check=True, env={**os.environ, "SOURCE_DATE_EPOCH": "0"},
    )
    assert '\n.TH TSD 8 "1970-01-01" ' in proc.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_have_one_source_which_the_installers_print_with_ts(
    shell: str,
) -> None:
    # No copy in the checkout to drift: install.sh and build-deb.sh install what ts
    # prints (tests/system test_install.py and test_deb.py compare the installed files).
    repo = Path(__file__).parents[2]
    assert not (repo / "packaging" / "completion").exists()
    for script in ("install.sh", "build-deb.sh"):
        text = (repo / "packaging" / script).read_text()
        assert "for shell in bash zsh fish; do" in text and '_TS_COMPLETE="${shell}_source"' in text
    proc = subprocess.run(
        [sys.executable, "-c", "from tsd.cli import main; main()"],
        capture_output=True, text=True, env={**os.environ, "_TS_COMPLETE": f"{shell}_source"},
    )
    assert proc.returncode == 0
    assert proc.stdout == SOURCE[shell] + "\n"
    assert "_ts_completion" in proc.stdout


def test_completion_offers_options_and_formats() -> None:
    def complete(words: str, cword: int) -> list[str]:
        env = {**os.environ, "_TS_COMPLETE": "bash_complete", "COMP_WORDS": words,
               "COMP_CWORD": str(cword), "TS_SOCKET": "/nonexistent/tsd.sock"}
        proc = subprocess.run(
            [sys.executable, "-c", "from tsd.cli import main; main()"],
            capture_output=True, text=True, env=env, check=True,
        )
        return proc.stdout.split()

    assert "plain,--get_label" in complete("ts --get", 1)
    assert complete("ts -M ", 2) == ["plain,default", "plain,json", "plain,tab"]
    assert complete("ts -L x py", 3) == ["file,py"]


def test_an_unknown_option_holding_a_newline_is_still_one_line() -> None:
    # Found by the property above: `ts -$'\n'` once printed a two-line error.
    for argv in (["-\n"], ["--x\ny"], ["-N", "2", "-\x1b"]):
        message = usage_error(*argv)
        assert "\n" not in message and "\x1b" not in message and "unknown option" in message
