"""`ts COMMAND...` on its light path (tsd.plainsubmit): the very request tsd.cli builds."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tsd import plainsubmit
from tsd.cli_options import parse
from tsd.cli_request import invocation
from tsd.errors import UsageError
from tsd.submitwire import PLAIN_PARAMS, submit_wire


class Recording(dict):  # type: ignore[type-arg]
    """Option values that remember which were read."""

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


def test_the_plain_defaults_are_the_option_tables_for_every_value_a_submit_reads() -> None:
    line = parse(["true"])
    values = Recording(dict(line.values))
    submit_wire(values, set(line.present), line.command, {}, "/", 0o022)
    assert values.read <= set(PLAIN_PARAMS)  # nothing a plain line would lack
    assert {key: line.values[key] for key in PLAIN_PARAMS} == PLAIN_PARAMS
    assert line.present == set() and line.command == ["true"]


words = st.text(st.characters(), max_size=8)


def outcome(make: Any) -> Any:
    try:
        return make()
    except UsageError as exc:
        return ("UsageError", str(exc))


@settings(max_examples=300)
@given(
    st.lists(words, min_size=1, max_size=5).filter(lambda c: not c[0].startswith("-")),
    st.dictionaries(words, words, max_size=6), st.none() | st.sampled_from(["/", "/home/é"]),
    st.integers(0, 0o777),
)  # fmt: skip
def test_a_plain_command_line_makes_the_request_the_full_command_line_does(
    command: list[str], environ: dict[str, str], cwd: str | None, umask: int
) -> None:
    light = outcome(lambda: plainsubmit.request(command, environ, cwd, umask))
    full = outcome(lambda: invocation(command, environ, cwd, umask).wire)
    assert light == full


def test_only_a_plain_command_line_takes_the_light_path() -> None:
    assert plainsubmit.applies(["sleep", "1"], {"PATH": "/bin"})
    assert plainsubmit.applies(["5"], {})  # a command named 5, as tsd.cli reads it
    assert not plainsubmit.applies([], {})
    assert not plainsubmit.applies(["-n", "true"], {})
    assert not plainsubmit.applies(["--", "true"], {})
    assert not plainsubmit.applies(["true"], {"TS_ENV": "hostname"})  # runs a script first
    assert not plainsubmit.applies(["true"], {"_TS_COMPLETE": "bash_source"})
