"""Shell completion for `ts`, from the option table (tsd.cli_options).

The shells' scripts (`SOURCE`, printed by `_TS_COMPLETE=bash_source ts` and so
on; packaging/install.sh and build-deb.sh install what the installed `ts`
prints, so this module is their one source) ask `ts` itself for the candidates:
they run it with `_TS_COMPLETE=<shell>_complete` and the words typed so far in
COMP_WORDS and COMP_CWORD, and `ts` answers one candidate per line. This is
the protocol of click's shell completion (which `ts` used before), kept so
that installed scripts go on working; it is implemented here from the table,
without click. What is offered: option names for a word starting with `-`
(those not given yet), an option's values after it (the `-M` formats, the
caller's job ids), and files for the command.
"""

from __future__ import annotations

import os
import sys

from tsd.cli_options import OPTIONS, Choice, Kind, Opt, UsageError, job_id, scan

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a few ms at import and is needed only by mypy
    from collections.abc import Mapping, Sequence

VAR = "_TS_COMPLETE"
FUNC = "_ts_completion"

SOURCE = {
    "bash": """\
_ts_completion() {
    local IFS=$'\\n'
    local response

    response=$(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD \
_TS_COMPLETE=bash_complete $1)

    for completion in $response; do
        IFS=',' read type value <<< "$completion"

        if [[ $type == 'dir' ]]; then
            COMPREPLY=()
            compopt -o dirnames
        elif [[ $type == 'file' ]]; then
            COMPREPLY=()
            compopt -o default
        elif [[ $type == 'plain' ]]; then
            COMPREPLY+=($value)
        fi
    done

    return 0
}

_ts_completion_setup() {
    complete -o nosort -F _ts_completion ts
}

_ts_completion_setup;
""",
    "zsh": """\
#compdef ts

_ts_completion() {
    local -a completions
    local -a completions_with_descriptions
    local -a response
    (( ! $+commands[ts] )) && return 1

    response=("${(@f)$(env COMP_WORDS="${words[*]}" COMP_CWORD=$((CURRENT-1)) \
_TS_COMPLETE=zsh_complete ts)}")

    for type key descr in ${response}; do
        if [[ "$type" == "plain" ]]; then
            if [[ "$descr" == "_" ]]; then
                completions+=("$key")
            else
                completions_with_descriptions+=("$key":"$descr")
            fi
        elif [[ "$type" == "dir" ]]; then
            _path_files -/
        elif [[ "$type" == "file" ]]; then
            _path_files -f
        fi
    done

    if [ -n "$completions_with_descriptions" ]; then
        _describe -V unsorted completions_with_descriptions -U
    fi

    if [ -n "$completions" ]; then
        compadd -U -V unsorted -a completions
    fi
}

compdef _ts_completion ts;
""",
    "fish": """\
function _ts_completion;
    set -l response;

    for value in (env _TS_COMPLETE=fish_complete COMP_WORDS=(commandline -cp) \
COMP_CWORD=(commandline -t) ts);
        set response $response $value;
    end;

    for completion in $response;
        set -l metadata (string split "," $completion);

        if test $metadata[1] = "dir";
            __fish_complete_directories $metadata[2];
        else if test $metadata[1] = "file";
            __fish_complete_path $metadata[2];
        else if test $metadata[1] = "plain";
            echo $metadata[2];
        end;
    end;
end;

complete --no-files --command ts --arguments \
"(_ts_completion)";
""",
}


class Item:
    """One candidate: its kind for the shell script (`plain` or `file`), value and help."""

    __slots__ = ("help", "kind", "value")

    def __init__(self, kind: str, value: str, help: str | None = None) -> None:
        self.kind = kind
        self.value = value
        self.help = help

    def line(self, shell: str) -> str:
        """The candidate as the shell's script reads it."""
        if shell == "zsh":
            return f"{self.kind}\n{self.value}\n{self.help or '_'}"
        if shell == "fish" and self.help:
            return f"{self.kind},{self.value}\t{self.help}"
        return f"{self.kind},{self.value}"


def split_words(line: str) -> list[str]:
    """Split the typed line like the shell; an unclosed quote keeps its partial word."""
    import shlex

    lex = shlex.shlex(line, posix=True)
    lex.whitespace_split = True
    lex.commenters = ""
    out: list[str] = []
    try:
        out.extend(lex)
    except ValueError:
        out.append(lex.token)
    return out


def _given(args: Sequence[str]) -> set[str]:
    """The options already on the line (each is offered once), as far as it parses."""
    for end in range(len(args), -1, -1):
        try:
            return {opt.dest for opt, _ in scan(args[:end])[0]}
        except UsageError:
            continue
    return set()


def _job_ids(incomplete: str) -> list[Item]:
    """The caller's job ids, when a daemon is up (never starts one)."""
    from tsd import protocol
    from tsd.client import Client
    from tsd.errors import TsdError

    try:
        resp = Client(may_start=False).call(protocol.ListJobs())
    except (TsdError, OSError):
        return []
    items = []
    for rec in resp.get("jobs", []):
        ident = str(rec.get("id"))
        if ident.startswith(incomplete):
            command = " ".join((rec.get("spec") or {}).get("command") or [])
            items.append(Item("plain", ident, f"{rec.get('state')}: {command}"[:60]))
    return items


def _values(opt: Opt, incomplete: str) -> list[Item]:
    if isinstance(opt.value, Choice):
        return [Item("plain", c) for c in opt.value.choices if c.startswith(incomplete)]
    if opt.value is job_id:
        return _job_ids(incomplete)
    return []


def candidates(args: list[str], incomplete: str) -> list[Item]:
    """What may come next, after the complete words `args`, for the word being typed."""
    if incomplete == "=":
        incomplete = ""
    elif "=" in incomplete and incomplete.startswith("-"):
        name, _, incomplete = incomplete.partition("=")
        args = [*args, name]
    if "--" not in args and incomplete.startswith("-"):
        given = _given(args)
        return [
            Item("plain", name, opt.help)
            for opt in OPTIONS
            if opt.dest not in given
            for name in opt.names
            if name.startswith(incomplete)
        ]
    if args and args[-1].startswith("-"):
        for opt in OPTIONS:
            if opt.kind != Kind.FLAG and args[-1] in opt.names:
                return _values(opt, incomplete)
    # The queued command is any program and its files: let the shell complete those.
    return [Item("file", incomplete)]


def answer(instruction: str, environ: Mapping[str, str]) -> tuple[int, str]:
    """The exit code and output for `_TS_COMPLETE=<instruction>`."""
    shell, _, what = instruction.partition("_")
    if shell not in SOURCE:
        return 1, ""
    if what == "source":
        return 0, SOURCE[shell] + "\n"
    if what != "complete":
        return 1, ""
    words = split_words(environ.get("COMP_WORDS", ""))
    if shell == "fish":
        incomplete = environ.get("COMP_CWORD", "")
        args = words[1:]
        if incomplete and args and args[-1] == incomplete:
            args.pop()
    else:
        cword = int(environ.get("COMP_CWORD", "0") or 0)
        args = words[1:cword]
        incomplete = words[cword] if cword < len(words) else ""
    items = candidates(args, incomplete)
    return 0, "\n".join(item.line(shell) for item in items) + "\n"


def complete(environ: Mapping[str, str] | None = None) -> int:
    """Answer the shell's completion request on stdout; the exit code."""
    environ = os.environ if environ is None else environ
    code, text = answer(environ.get(VAR, ""), environ)
    sys.stdout.write(text)
    sys.stdout.flush()
    return code


__all__ = ["SOURCE", "answer", "candidates", "complete"]
