"""Generate the `ts(1)` man page (roff) from ts's option table, and `tsd(8)`.

Run `python -m tsd.manpage > ts.1` and `python -m tsd.manpage tsd > tsd.8`.
ts(1)'s options, their value shapes and help texts come from the table
`tsd.cli_options.OPTIONS` that `ts` parses with, so the page cannot drift from
what `ts` accepts. SOURCE_DATE_EPOCH, when set, fixes the date for reproducible
builds.
"""

from __future__ import annotations

import os
import sys
import time

from tsd import __version__
from tsd.cli_options import (
    ENV_VARS,
    GPU_LIST_HELP,
    OPTIONS,
    PROG,
    SECTION_ACTIONS,
    SECTION_JOB,
    SECTION_LONG_ACTIONS,
    SECTION_LONG_JOB,
    SYNOPSIS,
    Opt,
)
from tsd.paths import SYSTEM_CONFIG as CONFIG
from tsd.paths import SYSTEM_SOCKET

DESCRIPTION = (
    "ts queues commands to run later, one after another or a few at once, "
    "on a shared server. It is flag-compatible with GPU Task Spooler (task-spooler v2): "
    "the same options, the same job list, the same exit codes.",
    "A command is queued with the environment, working directory and umask it was "
    "queued from, and runs as the user who queued it once its dependencies allow, "
    "enough slots (-N) and GPUs (-G, -g) are free, and the user is within the "
    "server's quotas. ts prints the new job's id and returns at once.",
    "Options come first: the first word that is not an option starts the command, "
    "so options meant for the command itself need no quoting. Options in brackets "
    "take their value only if the next word has its shape (a job id, a number, a "
    "list of ids); otherwise they act on the default job.",
    "On a server where the tsd service runs, ts talks to it through " + SYSTEM_SOCKET + "; "
    "elsewhere the first ts call starts a personal daemon for the user, "
    "as task-spooler does.",
)

EXIT_STATUS = (
    ("0", "success; for a queued command, the job was accepted (its id is printed)."),
    (
        "N",
        "with -w, -t, -c and -f: the job's own exit code; 255 when it was skipped "
        "(a -W dependency failed), killed by a signal, or hit its time limit.",
    ),
    ("1", "any error, reported on standard error as one line starting with 'ts: '."),
    ("2", "with -B, the queue was full and the job was not queued."),
)

JOB_CONTROLS = (
    "--hold queues a job in state held: it keeps its place in the queue but never starts "
    "until ts --release ID queues it again; ts --hold ID holds a queued job. Only the "
    "job's owner and admins may hold or release it. A hold survives restarts of the daemon.",
    "--begin WHEN keeps a job queued until WHEN (+90s, +30m, +2h, HH:MM for the next such "
    "local time, or an ISO time such as 2026-12-03T08:00); the daemon wakes up then.",
    "--retry N queues a job again under the same id when it exits with a non-zero code, "
    "up to N more times; a job ended by ts -k or by its --timeout is not retried. ts -i "
    "shows Attempts, and ts -w waits for the last attempt and exits with its code.",
    "--array SPEC queues one job per index (A-B, A-B:STEP or A,B,C; at most 10000), "
    "stored together, and prints every id, one per line. Each gets TS_ARRAY_TASK_ID (its "
    "index) and TS_ARRAY_JOB_ID (the first element's id); with %K at most K of them run "
    "at once.",
    "--priority N (-100 to 100, default 0) places a job among its owner's queued jobs, "
    "higher first, ties in queue order. It never moves a job ahead of another user's.",
    "Why a job waits is in ts -i (Wait reason), in ts -M json (Wait_Reason) and, in "
    "parentheses in place of the Output, E-Level and Time columns, in ts -l. A job "
    "that could never start (more slots or GPUs than the server or the quota has, GPUs "
    "where there is no NVIDIA driver) is refused when it is queued.",
)

FILES = (
    (SYSTEM_SOCKET, "the system service's socket (group tsd may use it)."),
    (CONFIG, "the system service's configuration: slots, GPUs, quotas, admins."),
    ("$XDG_RUNTIME_DIR/tsd/tsd.sock", "the personal daemon's socket."),
    ("$TMPDIR/ts-out.<id>.XXXXXX", "job output files (unless -O or --set_logdir)."),
)


def escape(text: str) -> str:
    """Text safe for roff: backslashes, hyphens and leading control characters."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = [("\\&" + ln) if ln.startswith((".", "'")) else ln for ln in text.split("\n")]
    return "\n".join(lines)


def _metavar(meta: str) -> str:
    """`[id]` -> `[\\fIid\\fR]`, `<id-id>` -> `\\fIid\\-id\\fR`."""
    if not meta:
        return ""
    if meta.startswith("[") and meta.endswith("]"):
        return " [\\fI" + escape(meta[1:-1]) + "\\fR]"
    return " \\fI" + escape(meta.strip("<>")) + "\\fR"


def _option_heading(opt: Opt) -> str:
    return ", ".join(f"\\fB{escape(n)}\\fR{_metavar(opt.metavar)}" for n in opt.names)


def _date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    stamp = float(epoch) if epoch and epoch.isdigit() else time.time()
    return time.strftime("%Y-%m-%d", time.gmtime(stamp))


def render() -> str:
    """The whole man page for ts as roff text."""
    out = [
        '.\\" Generated by python -m tsd.manpage; do not edit.',
        f'.TH TS 1 "{_date()}" "tsd {escape(__version__)}" "User Commands"',
        ".SH NAME",
        "ts \\- queue jobs on a tsd task spooler (GPU Task Spooler compatible)",
        ".SH SYNOPSIS",
        f".B {escape(PROG)}",
        escape(SYNOPSIS),
        ".SH DESCRIPTION",
    ]
    for i, paragraph in enumerate(DESCRIPTION):
        if i:
            out.append(".PP")
        out.append(escape(paragraph))

    sections = (
        ("ACTIONS", "Only one action at a time; without one, ts lists the jobs (-l).",
         (SECTION_ACTIONS, SECTION_LONG_ACTIONS)),
        ("OPTIONS ADDING JOBS", "These apply to the command being queued.",
         (SECTION_JOB, SECTION_LONG_JOB)),
    )  # fmt: skip
    for title, intro, names in sections:
        out.append(f'.SH "{title}"')
        out.append(escape(intro))
        for section in names:
            for opt in OPTIONS:
                if opt.section != section:
                    continue
                out += [".TP", _option_heading(opt), escape(opt.help)]
                if opt.dest == "list":
                    flag, text = GPU_LIST_HELP
                    out += [".TP", f"\\fB{escape(flag)}\\fR", escape(text)]

    out.append('.SH "JOB CONTROLS"')
    for i, paragraph in enumerate(JOB_CONTROLS):
        if i:
            out.append(".PP")
        out.append(escape(paragraph))

    out.append(".SH ENVIRONMENT")
    out.append(
        escape(
            "TS_SOCKET, TS_PERSONAL (1: use your personal daemon even where the system "
            "service is installed), TS_ENV and TMPDIR are read by ts itself; the others "
            "are read by "
            "the personal daemon when the first ts call starts it (the system service "
            "takes its settings from " + CONFIG + " instead)."
        )
    )
    for name, text in ENV_VARS:
        out += [".TP", f"\\fB{escape(name)}\\fR", escape(text)]

    out.append('.SH "EXIT STATUS"')
    for code, text in EXIT_STATUS:
        out += [".TP", f"\\fB{escape(code)}\\fR", escape(text)]

    out.append(".SH FILES")
    for path, text in FILES:
        out += [".TP", f"\\fI{escape(path)}\\fR", escape(text)]

    out += [
        '.SH "SEE ALSO"',
        "\\fBtsd\\fR(8), \\fBsystemctl\\fR(1)",
        ".SH AUTHORS",
        escape(
            "tsd authors. The interface is GPU Task Spooler's, by Duc Nguyen, "
            "after Task Spooler by Lluis Batlle i Rossell."
        ),
    ]
    return "\n".join(out) + "\n"


TSD_OPTIONS = (
    ("--system", "Run as the root service for the whole server (what tsd.service runs). "
     "Jobs run as their owners in transient systemd scopes under tsd.slice."),
    ("--user", "Run a personal daemon for the calling user (the default; the first ts "
     "call starts one when no system service is installed)."),
    ("--config PATH", "Read the configuration from PATH instead of " + CONFIG + "."),
    ("--socket PATH", "Listen on PATH when not socket-activated."),
    ("--check-config [FILE]", "Check FILE (default " + CONFIG + ") as the daemon would and "
     "exit: 0 and one line when it would be accepted, 1 and the error (file, line, key) "
     "when not. Users, groups and admins it names that do not exist on this machine are "
     "warnings on standard error; the exit status stays 0. systemctl reload tsd runs "
     "this first and fails, keeping the configuration in force, when the file is broken."),
    ("-V, --version", "Print the version and exit."),
    ("-h, --help", "Print a short help and exit."),
)  # fmt: skip

TSD_FILES = (
    (CONFIG, "the configuration: slots, GPUs, per-user and per-group quotas, admins, job "
     "limits; every key is explained in the installed example."),
    ("/var/lib/tsd/state.db", "the jobs (SQLite); readable by root only."),
    (SYSTEM_SOCKET, "the socket, made by tsd.socket: group tsd, mode 0660."),
    ("$XDG_STATE_HOME/tsd/", "a personal daemon's state and its log, tsd.log; past 8 MiB "
     "(TSD_LOG_MAX_BYTES) that file becomes tsd.log.1 (and .1 becomes .2)."),
)  # fmt: skip

TSD_SIGNALS = (
    ("SIGHUP", "Re-read the configuration (systemctl reload tsd). A broken file is "
     "logged and the old configuration stays in force."),
    ("SIGTERM, SIGINT", "Stop serving and exit. Running jobs keep running; the next "
     "daemon re-adopts them and records how they ended."),
)  # fmt: skip


def render_tsd() -> str:
    """The tsd(8) man page as roff text."""
    out = [
        '.\\" Generated by python -m tsd.manpage tsd; do not edit.',
        f'.TH TSD 8 "{_date()}" "tsd {escape(__version__)}" "System Administration"',
        ".SH NAME",
        "tsd \\- the tsd task spooler daemon (multi-user, GPU aware)",
        ".SH SYNOPSIS",
        ".B tsd",
        "[\\fB\\-\\-system\\fR | \\fB\\-\\-user\\fR] [\\fB\\-\\-config\\fR "
        "\\fIPATH\\fR] [\\fB\\-\\-socket\\fR \\fIPATH\\fR]",
        ".br",
        ".B tsd \\-\\-check\\-config",
        "[\\fIFILE\\fR]",
        ".SH DESCRIPTION",
        escape(
            "tsd runs the jobs that ts(1) queues. On a shared server it is the system "
            "service tsd.service, started by tsd.socket: it runs every user's jobs as that "
            "user, each in its own systemd scope tsd-job-<id>.scope, within the slots, GPUs "
            "and quotas its configuration allows, fairly between users. Members of group tsd "
            "may submit; root and the configured admins may act on every job."
        ),
        ".PP",
        escape(
            "Between users, fair share by decayed usage: the user whose slot-seconds plus "
            "gpu_weight x GPU-seconds, halved every half_life, divided by their share, is "
            "least goes first. The job first in the queue among those waiting for room holds "
            "a reservation of what it needs; jobs queued after it start first only if their "
            "--timeout ends before that frees up, or they take only what it will not need. "
            "Every ended job leaves a row in an accounting history (ts --stats)."
        ),
        ".PP",
        escape(
            "Without a system service, the first ts call starts a personal daemon for its "
            "user (tsd --user), configured by task-spooler's environment variables."
        ),
        ".SH OPTIONS",
    ]
    for flags, text in TSD_OPTIONS:
        out += [".TP", f"\\fB{escape(flags)}\\fR", escape(text)]
    out.append(".SH CONFIGURATION")
    out.append(
        escape(
            CONFIG + " is YAML: slots, gpus (visible, free_memory_percent, poll_seconds), "
            "admins, defaults (per-user quotas), groups and users (overrides), job (memory, "
            "CPU and task limits of each scope), max_finished, kill_grace_seconds, "
            "connections, cluster (engine: slurm hands every job to Slurm with sbatch, as its "
            "owner: partition, account, qos, gpu_type, extra_args, output_dir, poll_seconds, "
            "max_poll_seconds), gpu (unmanaged: show or hold, what GPU use outside tsd does), "
            "scheduler (fair_share: half_life, gpu_weight), share (in defaults, groups, "
            "users), accounting (keep_days). Every key, its unit and its default are "
            "described in the installed example file. Unknown keys are errors."
        )
    )
    out.append(".SH SIGNALS")
    for name, text in TSD_SIGNALS:
        out += [".TP", f"\\fB{escape(name)}\\fR", escape(text)]
    out.append(".SH FILES")
    for path, text in TSD_FILES:
        out += [".TP", f"\\fI{escape(path)}\\fR", escape(text)]
    out += [
        '.SH "SEE ALSO"',
        "\\fBts\\fR(1), \\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), "
        "\\fBsystemd.scope\\fR(5)",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    """Print a man page on standard output: ts(1), or tsd(8) with the argument `tsd`."""
    sys.stdout.write(render_tsd() if sys.argv[1:] == ["tsd"] else render())


if __name__ == "__main__":
    main()
