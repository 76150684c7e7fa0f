"""The click side of `ts`: the click command, its value types, help and completion.

`ts` is parsed by click, but importing click and building a command of some
fifty options costs more than everything else a `ts` call does, so this
module is imported only when it is needed: for `ts -h`, for shell completion
(`_TS_COMPLETE=...`), by the man page generator (tsd.manpage), and for any
command line the fast path in tsd.cli does not accept as it stands (every
bad value: click's message is the one users see). tsd.cli checks in its unit
tests that its fast path and `click_parse` here agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import click
from click.shell_completion import CompletionItem

from tsd import protocol
from tsd.cli import (
    FLAG_VALUES,
    OPTIONS,
    PROG,
    BadValue,
    Given,
    Kind,
    Opt,
    UsageError,
    duration_value,
    help_text,
    id_list_value,
    job_id_value,
    swap_value,
)
from tsd.client import Client
from tsd.errors import TsdError


class _JobIdType(click.ParamType):
    """A job id; empty (the option given without one) is ABSENT: 'the default job'."""

    name = "id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return job_id_value(str(value))
        except BadValue as exc:
            self.fail(str(exc), param, ctx)

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        """Complete with the ids of the caller's jobs, when a daemon is up."""
        try:
            resp = Client(may_start=False).call(protocol.ListJobs())
        except (TsdError, OSError):
            return []
        items = []
        for rec in resp.get("jobs", []):
            ident = str(rec.get("id"))
            if ident.startswith(incomplete):
                command = " ".join((rec.get("spec") or {}).get("command") or [])
                items.append(CompletionItem(ident, help=f"{rec.get('state')}: {command}"[:60]))
        return items


class _IdListType(click.ParamType):
    """Comma-separated integers; empty (given without a value) is the empty tuple."""

    name = "id,..."

    def __init__(self, lo: int = 0) -> None:
        self.lo = lo

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return id_list_value(str(value), self.lo)
        except BadValue as exc:
            self.fail(str(exc), param, ctx)


class _SwapType(click.ParamType):
    """`a-b`: two different job ids."""

    name = "id-id"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        try:
            return swap_value(str(value))
        except BadValue as exc:
            self.fail(str(exc), param, ctx)


class _DurationType(click.ParamType):
    """A positive duration in seconds, optionally with a unit s, m, h or d."""

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return duration_value(str(value))
        except BadValue as exc:
            self.fail(str(exc), param, ctx)


def click_type(opt: Opt) -> Any:
    """The click type of an option's value (tsd.cli's fast path mirrors these)."""
    types: dict[str, Any] = {
        "serialize": click.Choice(["default", "json", "tab"]),
        "gpus": click.IntRange(0, protocol.MAX_GPUS),
        "gpu_indices": _IdListType(0),
        "timeout": _DurationType(),
        "slots": _JobIdType(),
        "swap": _SwapType(),
        "set_gpu_free_perc": click.FloatRange(0.0, 100.0),
        "depend": _IdListType(1),
        "depend_ok": _IdListType(1),
        "num_slots": click.IntRange(1, protocol.MAX_SLOTS),
    }
    if opt.dest in types:
        return types[opt.dest]
    if opt.kind is Kind.OPT_INT:
        return _JobIdType()
    return click.STRING


class TsOption(click.Option):
    """A click option that remembers its ts table entry (for help and the man page)."""

    def __init__(self, opt: Opt) -> None:
        decls = [f"-{opt.short}"] if opt.short else []
        if opt.long:
            decls.append(f"--{opt.long}")
        decls.append(opt.dest)
        kwargs: dict[str, Any] = {"help": opt.help, "metavar": opt.metavar or None}
        if opt.kind is Kind.FLAG:
            kwargs["is_flag"] = True
            kwargs["default"] = False
        else:
            kwargs["type"] = click_type(opt)
            kwargs["default"] = None
            if opt.kind is not Kind.VALUE:
                kwargs["is_flag"] = False
                kwargs["flag_value"] = FLAG_VALUES.get(opt.dest, "")
        super().__init__(decls, **kwargs)
        self.ts_opt = opt


class TsCommand(click.Command):
    """The `ts` command; its help is task-spooler's layout."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Write task-spooler's help text (ts -h) instead of click's layout."""
        formatter.write(help_text())


def _complete_command(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    # The queued command is any program and its files: let the shell complete those.
    return [CompletionItem(incomplete, type="file")]


def _build_command() -> TsCommand:
    params: list[click.Parameter] = [TsOption(o) for o in OPTIONS]
    params.append(
        click.Argument(
            ["command"],
            nargs=-1,
            required=False,
            metavar="[command...]",
            shell_complete=_complete_command,
        )
    )
    return TsCommand(
        PROG,
        params=params,
        add_help_option=False,
        help="Queue jobs and manage the tsd job queue (GPU Task Spooler compatible).",
        context_settings={"help_option_names": []},
    )


COMMAND = _build_command()


def click_parse(given: Sequence[Given], command: Sequence[str]) -> dict[str, Any]:
    """Hand the scanned options to click in canonical form; it converts and checks values."""
    canonical: list[str] = []
    for g in given:
        decl = f"--{g.opt.long}" if g.opt.long else f"-{g.opt.short}"
        canonical.append(decl)
        if g.value is not None:
            canonical.append(g.value)
        elif g.opt.kind is Kind.VALUE:
            raise UsageError(f"option {g.opt.spelled} requires a value")
    canonical.append("--")
    canonical += command
    try:
        ctx = COMMAND.make_context(PROG, canonical, resilient_parsing=False)
    except click.BadParameter as exc:
        where = exc.param.opts[0] if exc.param is not None and exc.param.opts else "value"
        raise UsageError(f"invalid value for {where}: {exc.message}") from None
    except click.ClickException as exc:
        raise UsageError(exc.format_message()) from None
    return dict(ctx.params)


def help_page() -> str:
    """`ts -h` as click renders it (TsCommand.format_help: task-spooler's layout)."""
    with click.Context(COMMAND, info_name=PROG) as ctx:
        return COMMAND.get_help(ctx) + "\n"


def complete(args: Sequence[str]) -> NoReturn:
    """Shell completion: click reads the words from the environment and exits."""
    COMMAND.main(args=list(args), prog_name=PROG, complete_var="_TS_COMPLETE")
    raise SystemExit(0)  # click's main always exits; this is for the type checker
