"""What a `ts` command line asks for: the action, and the request that carries it out.

`parse` (tsd.cli_options) gives the options' values; here they pick
the action (`-l`, `-t`, ... or queueing a command) and become a request.

Every request has one path: it is built here as it travels (a plain dict),
and `ts` sends it as it is, so that no call (queueing a job above all) loads
the typed protocol; the daemon checks it with tsd.protocol.parse_request.
`parse_argv`, the pure form used by tests and tools, types it here with that
very function. Only what the command line alone can get wrong (`-D` with
`-W`, `-m` with `-n`) is checked in this module.
"""

from __future__ import annotations

from tsd import leanos
from tsd.cli_options import ABSENT, UsageError, parse
from tsd.errors import BadRequest
from tsd.framing import PROTOCOL_VERSION
from tsd.submitwire import submit_wire

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a few ms at import and is needed only by mypy
    from collections.abc import Mapping, Sequence
    from typing import Any

    from tsd import protocol
    from tsd.cli_options import ParsedLine


class Invocation:
    """What a command line asks for: an action, the request it sends, and display options.

    `wire` is the request as it travels (None for help and version): `ts` sends
    it as it is, without loading the typed protocol. `request` is the typed one,
    as the daemon reads it: set by parse_argv only (tests and tools).
    """

    __slots__ = (
        "action", "all_users", "foreground", "list_format", "option", "params", "print_id",
        "request", "wire",
    )  # fmt: skip

    def __init__(
        self,
        action: str,
        request: protocol.Request | None = None,
        *,
        wire: dict[str, Any] | None = None,
        list_format: str = "default",
        all_users: bool = False,
        foreground: bool = False,
        print_id: bool = True,
        option: str = "",
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.action = action
        self.request = request
        self.wire = wire
        self.list_format = list_format
        self.all_users = all_users
        self.foreground = foreground
        self.print_id = print_id
        self.option = option  # how the action was spelled, for messages
        self.params: Mapping[str, Any] = params or {}

    def __repr__(self) -> str:
        return f"Invocation({self.action!r}, {self.request!r})"


# Which job an action means when no id is given: the last one run, or the last added.
GET_DEFAULTS: dict[str, str] = {
    "info": "run",
    "pid": "run",
    "output": "run",
    "state": "added",
    "get_label": "added",
    "full_cmd": "added",
    "last_queue_id": "added",
}


def invocation(
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
    umask: int = 0o022,
) -> Invocation:
    """Turn ts's argv into an Invocation; a job to queue is left as it travels (`wire`).

    Pure: the environment, cwd and umask are arguments. Raises UsageError for
    anything wrong with the command line.
    """
    environ = {} if environ is None else environ
    line = parse(argv)
    params, command = line.values, line.command
    action, option = _action_of(line)
    if action == "help":
        return Invocation("help", option=option, params=params)
    if command:
        if params.get("watch"):
            raise UsageError(f"--watch takes no command (got {command[0]!r})")
        if action != "list":
            raise UsageError(
                f"{option} takes no command (got {command[0]!r}; job ids are numbers)"
            )
        foreground = bool(params["foreground"])
        return Invocation(
            "submit",
            wire=submit_wire(params, line.present, command, environ, cwd, umask),
            foreground=foreground,
            # -nf is task-spooler's "transparent" mode: nothing but the job's exit code.
            print_id=not (foreground and bool(params["no_output"])),
            option=option,
            params=params,
        )
    return _action(action, option, params, cwd)


def parse_argv(
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
    umask: int = 0o022,
) -> Invocation:
    """`invocation`, with its request checked and typed the way the daemon reads it."""
    inv = invocation(argv, environ, cwd, umask)
    if inv.wire is not None:
        from tsd import protocol

        try:
            inv.request = protocol.parse_request(inv.wire)
        except BadRequest as exc:
            raise UsageError(exc.message.removeprefix("bad request: ")) from None
    return inv


def _action_of(line: ParsedLine) -> tuple[str, str]:
    """The action and how it was spelled; `list` (spelled "") when none is given."""
    # -l, -A and -M all mean "list"; -g without ids and without a command is the
    # GPU listing; help wins over everything else.
    actions: dict[str, str] = {}
    for opt, value in line.given:
        if opt.action:
            actions.setdefault(opt.action, opt.spelled)
        elif opt.dest == "gpu_indices" and value is None and not line.command:
            actions.setdefault("gpu_status", "-g")
        elif opt.dest == "hold" and (value is not None or not line.command):
            # `ts --hold 12` holds job 12; `ts --hold CMD` queues CMD held.
            actions.setdefault("hold", "--hold")
    if "help" in actions:
        return "help", actions["help"]
    if "stats" in actions:
        # -A (everyone) and -M (format) qualify --stats rather than asking for a listing.
        listing = {o.spelled for o, _ in line.given if o.action == "list"}
        if listing <= {"-A", "-M"}:
            actions.pop("list", None)
    elif "since" in line.present:
        raise UsageError("--since goes with --stats")
    listing = {opt.dest for opt, _ in line.given if opt.action == "list"}
    if "gpu_status" in actions and listing == {"serialize"}:
        # ts -g -M json: the GPU view, as JSON (with --stats, "list" is gone already)
        actions.pop("list", None)
    if len(actions) > 1:
        spelled = ", ".join(actions.values())
        raise UsageError(f"only one action at a time ({spelled} given)")
    return next(iter(actions.items()), ("list", ""))


def _job_id(value: Any) -> int | None:
    return None if value is None or value == ABSENT else int(value)


def wire(op: str, **fields: Any) -> dict[str, Any]:
    """A request as it travels (tsd.protocol.request_to_wire's shape), built without
    the typed protocol: `ts` sends every request this way."""
    return {"v": PROTOCOL_VERSION, "op": op, **fields}


def _action(action: str, option: str, params: Mapping[str, Any], cwd: str | None) -> Invocation:
    """The Invocation of an action that queues nothing, its request as it travels."""
    inv = Invocation(action, option=option, params=params)
    req: dict[str, Any] | None
    value = params.get(action)
    match action:
        case "version":
            req = None
        case "list":
            inv.all_users = bool(params["all_users"])
            inv.list_format = params["serialize"] or "default"
            if params.get("watch") and inv.list_format != "default":
                raise UsageError("--watch shows the table of ts -l; it does not go with -M")
            req = wire("list", all_users=inv.all_users, rows=True)
        case "gpu_status":
            inv.list_format = params["serialize"] or "default"
            req = wire("gpu_status")
        case "stats":
            inv.all_users = bool(params["all_users"])
            inv.list_format = params["serialize"] or "default"
            since = params["since"]
            # Before the epoch means "everything kept".
            req = wire(
                "stats", since=None if since is None else max(0.0, since), all_users=inv.all_users
            )
        case "info" | "pid" | "output" | "state" | "get_label" | "full_cmd":
            req = wire("get", id=_job_id(value), default=GET_DEFAULTS[action])
        case "last_queue_id":
            req = wire("get", id=None, default="added")
        case "remove" | "urgent" | "kill":
            req = wire(action, id=_job_id(value))
        case "hold" | "release":
            req = wire("hold", id=_job_id(value), release=action == "release")
        case "swap":
            a, b = value or (0, 0)
            req = wire("swap", a=a, b=b)
        case "kill_all" | "clear" | "shutdown" | "count_running":
            req = wire(action)
        case "slots":
            req = wire("slots", value=_job_id(value))
        case "wait":
            req = wire("wait", id=_job_id(value), default="added", notify_start=False)
        case "tail" | "cat":
            req = wire("wait", id=_job_id(value), default="run", notify_start=True)
        case "getenv" | "unsetenv":
            name = str(value)
            if not name or "=" in name:
                raise UsageError(f"{option} needs a variable name without '='")
            req = wire("env", action="get" if action == "getenv" else "unset", name=name,
                       value=None)  # fmt: skip
        case "setenv":
            name, eq, val = str(value).partition("=")
            if not name or not eq:
                raise UsageError("--setenv needs VAR=VALUE")
            req = wire("env", action="set", name=name, value=val)
        case "get_logdir":
            req = wire("logdir", path=None)
        case "set_logdir":
            req = wire("logdir", path=_logdir(str(value), cwd))
        case "get_gpu_free_perc":
            req = wire("gpu_free_perc", value=None)
        case "set_gpu_free_perc":
            req = wire("gpu_free_perc", value=float(value or 0))
        case _:
            raise AssertionError(f"unhandled action {action}")
    inv.wire = req
    return inv


def _logdir(path: str, cwd: str | None) -> str:
    if not path:
        raise UsageError("--set_logdir needs a directory")
    if path.startswith("/"):
        return path
    # The daemon has its own cwd: a relative path means the caller's.
    if cwd is None:
        raise UsageError("--set_logdir: the current directory cannot be read")
    return leanos.normpath(leanos.join(cwd, path))
