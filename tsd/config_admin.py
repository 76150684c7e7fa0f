"""The config keys of the admin's view: `gpu.idle_*` (tsd.idle) and `metrics.textfile`.

Part of tsd.config (which re-exports these names; tsd.configfile drives the parsing): the
records, and how their YAML values are read. Every error is the parser's
one-line error naming the file, the line and the key path. No I/O.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Final, NoReturn, Protocol

from tsd.usage import FairShareSettings, parse_duration

TYPE_CHECKING = False
if TYPE_CHECKING:
    import yaml

IDLE_ACTIONS: Final = ("none", "kill", "requeue")
IDLE_KEYS: Final = ("idle_after", "idle_threshold", "idle_action", "idle_grace", "idle_notify")
_METRICS_KEYS = ("textfile",)
_SCHEDULER_KEYS = ("fair_share",)
_FAIR_SHARE_KEYS = ("half_life", "gpu_weight")
_ACCOUNTING_KEYS = ("keep_days",)
_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"

# Where node_exporter's textfile collector looks (Debian's prometheus-node-exporter).
DEFAULT_METRICS_TEXTFILE: Final = "/var/lib/prometheus/node-exporter/tsd.prom"


@dataclass(frozen=True)
class IdleConfig:
    """The `gpu:` section's `idle_*` keys: what happens to jobs that hold GPUs without
    using them (tsd.idle)."""

    after: float | None = None  # seconds of continuous idleness before a job is flagged; None: off
    threshold: float = 5.0  # a GPU at or below this utilisation (percent) is idle
    action: str = "none"  # then, after `grace`: "none", "kill" or "requeue"
    grace: float = 600.0  # seconds between the flag (and notice) and the action
    notify: str | None = None  # a command run as the job's user when the job is flagged


@dataclass(frozen=True)
class MetricsConfig:
    """The `metrics:` section: the Prometheus textfile the daemon keeps up to date."""

    # None: not set (the system service writes DEFAULT_METRICS_TEXTFILE, a personal
    # daemon nothing); "": off; else the absolute path of a *.prom file.
    textfile: str | None = None

    def path(self, system: bool) -> str | None:
        """The file to write, None when metrics are off."""
        if self.textfile is None:
            return DEFAULT_METRICS_TEXTFILE if system else None
        return self.textfile or None


class Parser(Protocol):
    """What these readers need of tsd.configfile's parser."""

    def fail(self, node: yaml.Node, path: str, message: str) -> NoReturn: ...

    def got(self, node: yaml.Node) -> str: ...

    def is_null(self, node: yaml.Node) -> bool: ...

    def construct(self, node: yaml.ScalarNode, path: str) -> object: ...

    def number(
        self, node: yaml.Node, path: str, *, positive: bool = False, percent: bool = False
    ) -> float: ...

    def mapping(
        self, node: yaml.Node, path: str, known: tuple[str, ...] | None
    ) -> list[tuple[str, yaml.Node, yaml.Node]]: ...

    def count(self, node: yaml.Node, path: str, *, minimum: int = 0) -> int: ...


def idle_key(p: Parser, idle: IdleConfig, key: str, value: yaml.Node) -> IdleConfig:
    """One `gpu.idle_*` key applied to `idle`."""
    import yaml  # only while parsing (tsd.configfile): these records load without it

    path = f"gpu.{key}"
    if key == "idle_after":
        return dataclasses.replace(idle, after=duration(p, value, path, off=True))
    if key == "idle_threshold":
        return dataclasses.replace(idle, threshold=p.number(value, path, percent=True))
    if key == "idle_action":
        if isinstance(value, yaml.ScalarNode) and value.tag == _STR and value.value in IDLE_ACTIONS:
            return dataclasses.replace(idle, action=str(value.value))
        if p.is_null(value):
            return dataclasses.replace(idle, action="none")
        p.fail(value, path, f"expected one of none, kill, requeue, got {p.got(value)}")
    if key == "idle_grace":
        grace = duration(p, value, path, off=False)
        assert grace is not None
        return dataclasses.replace(idle, grace=grace)
    # idle_notify: a shell command line (run with /bin/sh -c); null or empty for none.
    if p.is_null(value):
        return dataclasses.replace(idle, notify=None)
    if isinstance(value, yaml.ScalarNode) and value.tag == _STR:
        text = str(value.value)
        if "\0" not in text and "\n" not in text:
            return dataclasses.replace(idle, notify=text.strip() or None)
    p.fail(value, path, f"expected a command line, got {p.got(value)}")


def duration(p: Parser, node: yaml.Node, path: str, *, off: bool) -> float | None:
    """Seconds from a number or `90s`, `30m`, `2h`, `1d`, `2w` (tsd.usage.parse_duration);
    with `off`, null/`off` -> None."""
    import yaml  # only while parsing (tsd.configfile): these records load without it

    want = "a duration such as 90s, 30m, 2h or 7d" + (", or off" if off else "")
    if isinstance(node, yaml.ScalarNode):
        # YAML 1.1 reads a bare `off` as false.
        if off and (p.is_null(node) or node.value in ("off", "false", "False")):
            return None
        seconds: float | None = None
        if node.tag in (_INT, _FLOAT):
            raw = p.construct(node, path)
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                seconds = float(raw)
        elif node.tag == _STR:
            seconds = parse_duration(node.value)
        if seconds is not None and math.isfinite(seconds) and seconds > 0:
            return seconds
    p.fail(node, path, f"expected {want}, got {p.got(node)}")


def metrics_section(p: Parser, node: yaml.Node) -> MetricsConfig:
    """The `metrics:` section."""
    import yaml  # only while parsing (tsd.configfile): these records load without it

    metrics = MetricsConfig()
    for _, _, value in p.mapping(node, "metrics", _METRICS_KEYS):
        if p.is_null(value):  # `textfile:` with nothing: off, as ""
            metrics = MetricsConfig(textfile="")
            continue
        text = str(value.value) if isinstance(value, yaml.ScalarNode) else ""
        if not (isinstance(value, yaml.ScalarNode) and value.tag == _STR) or (
            text and not re.fullmatch(r"/[^\0]*[^/]\.prom", text)
        ):
            want = 'an absolute path ending in .prom, or "" for no metrics'
            p.fail(value, "metrics.textfile", f"expected {want}, got {p.got(value)}")
        metrics = MetricsConfig(textfile=text)
    return metrics


def scheduler_section(p: Parser, node: yaml.Node) -> FairShareSettings:
    """The `scheduler:` section (fair share by decayed usage, tsd.usage)."""
    fair = FairShareSettings()
    for _, _, section in p.mapping(node, "scheduler", _SCHEDULER_KEYS):
        for key, _, value in p.mapping(section, "scheduler.fair_share", _FAIR_SHARE_KEYS):
            path = f"scheduler.fair_share.{key}"
            if key == "half_life":
                half_life = duration(p, value, path, off=False)
                assert half_life is not None
                fair = dataclasses.replace(fair, half_life=half_life)
            else:
                fair = dataclasses.replace(fair, gpu_weight=p.number(value, path))
    return fair


def accounting_section(p: Parser, node: yaml.Node, days: int) -> int:
    """The `accounting:` section: its one key, keep_days (`days` when absent)."""
    for key, _, value in p.mapping(node, "accounting", _ACCOUNTING_KEYS):
        days = p.count(value, f"accounting.{key}", minimum=1)
    return days
