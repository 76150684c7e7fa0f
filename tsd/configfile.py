"""The config file: YAML text -> a frozen `tsd.config.Config`.

Parsing walks the composed YAML node tree (not the constructed Python objects)
so that every error can name the file, the line and the key path, in one line:

    /etc/tsd/tsd.yaml: line 7: defaults.max_gpus: expected a non-negative integer, got 'lots'

Unknown keys are errors, with a did-you-mean hint, because a misspelt quota key
that is silently ignored leaves a shared server without the limit its admin
believes it has. The only I/O here is `load_config`, a convenience that reads a
file and hands its text to `parse_config`. Apart from tsd.config so that a daemon
with no config file (the personal one) never loads the YAML package.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import NoReturn

import yaml

from tsd.config import (
    DEFAULT_LIMITS,
    LIMIT_KEYS,
    UNMANAGED_MODES,
    ClusterConfig,
    Config,
    ConnectionConfig,
    GpuConfig,
    GpuUseConfig,
    LimitOverride,
)
from tsd.config_admin import (
    IDLE_KEYS,
    IdleConfig,
    accounting_section,
    idle_key,
    metrics_section,
    scheduler_section,
)
from tsd.errors import ConfigError
from tsd.model import JobLimits

__all__ = ["load_config", "parse_config"]

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"

_TOP_KEYS = (
    "slots",
    "gpus",
    "admins",
    "defaults",
    "groups",
    "users",
    "job",
    "max_finished",
    "kill_grace_seconds",
    "connections",
    "scheduler",
    "accounting",
    "cluster",
    "gpu",
    "metrics",
)
_GPU_USE_KEYS = ("unmanaged", *IDLE_KEYS)
_GPU_KEYS = ("visible", "free_memory_percent", "poll_seconds")
_JOB_KEYS = ("memory_max", "cpu_quota", "tasks_max")
_CONNECTION_KEYS = ("max", "per_user", "waiting_per_user")
_CLUSTER_KEYS = (
    "engine", "partition", "account", "qos", "extra_args", "gpu_type", "output_dir",
    "poll_seconds", "max_poll_seconds",
)
_ENGINES = ("local", "slurm")
# A Slurm name (partition, account, qos, GPU type): no spaces, commas or shell-ish quotes.
_SLURM_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
# What sbatch options tsd sets itself; an extra_args entry must not override them.
_TSD_SBATCH_OPTIONS = (
    "--parsable", "--wrap", "--output", "--error", "--chdir", "--job-name", "--dependency",
    "--comment", "--export", "--uid", "--gid",
)

# systemd's size suffixes: powers of 1024. "64G", "512M", "1.5T", "100KiB", "4096".
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([KMGTPE]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    unit: 1 << (10 * power) for power, unit in enumerate(("", "K", "M", "G", "T", "P", "E"))
}
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*%\s*$")


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Parser:
    """Walks the node tree of one file; every failure becomes a one-line ConfigError."""

    def __init__(self, source: str) -> None:
        self.source = source
        # Scalar constructors only; mappings and sequences are walked by hand so
        # that aliases can never expand beyond what the schema itself visits.
        self.constructor = yaml.constructor.SafeConstructor()
        self.merging: set[int] = set()  # ids of mappings whose merge keys are being read
        # Nested merges of aliases can expand exponentially (a "billion laughs").
        self.merge_budget = 100_000
        self.shares: dict[str, float] = {}  # `share:` by "defaults", "groups.X", "users.X"

    # -- errors

    def fail(self, node: yaml.Node, path: str, message: str) -> NoReturn:
        line = node.start_mark.line + 1
        where = f"{path}: " if path else ""
        raise ConfigError(_one_line(f"{self.source}: line {line}: {where}{message}"))

    @staticmethod
    def got(node: yaml.Node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        assert isinstance(node, yaml.ScalarNode)
        if node.tag == _NULL and node.value in ("", "~"):
            return "nothing"
        if node.tag == _STR or not node.tag.startswith("tag:yaml.org,2002:"):
            return repr(node.value)
        return str(node.value)

    # -- scalars

    def construct(self, node: yaml.ScalarNode, path: str) -> object:
        """The Python value of a scalar; unknown or local tags give their raw text."""
        if node.tag == _STR:
            return str(node.value)
        if node.tag not in (_INT, _FLOAT, _NULL, "tag:yaml.org,2002:bool"):
            return _Opaque(str(node.value))
        try:
            return self.constructor.construct_object(node)
        # An explicitly tagged malformed scalar (`!!int ""`, `!!float x`) makes
        # PyYAML's scalar constructors raise assorted built-in exceptions.
        except (yaml.YAMLError, ValueError, TypeError, IndexError, AttributeError):
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.fail(node, path, f"cannot read the value {node.value!r} as {tag}")

    def count(self, node: yaml.Node, path: str, *, minimum: int = 0) -> int:
        """An int >= minimum, never unlimited."""
        value = self.integer(node, path, minimum=minimum)
        assert value is not None
        return value

    def is_null(self, node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag == _NULL

    def integer(
        self, node: yaml.Node, path: str, *, minimum: int = 0, unlimited: bool = False
    ) -> int | None:
        """An int >= minimum; with `unlimited`, also null or `unlimited` -> None."""
        if minimum == 0:
            want = "a non-negative integer"
        elif minimum == 1:
            want = "a positive integer"
        else:
            want = f"an integer >= {minimum}"
        if unlimited:
            want += " or unlimited"
        if isinstance(node, yaml.ScalarNode):
            if unlimited and (
                self.is_null(node) or (node.tag == _STR and node.value == "unlimited")
            ):
                return None
            if node.tag == _INT:
                value = self.construct(node, path)
                if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
                    return value
        self.fail(node, path, f"expected {want}, got {self.got(node)}")

    def number(
        self,
        node: yaml.Node,
        path: str,
        *,
        positive: bool = False,
        percent: bool = False,
    ) -> float:
        """A finite float >= 0 (> 0 with `positive`); `percent` also takes '90%', at most 100."""
        if percent:
            want = "a percentage from 0 to 100"
        elif positive:
            want = "a positive number"
        else:
            want = "a non-negative number"
        value: float | None = None
        if isinstance(node, yaml.ScalarNode):
            if node.tag in (_INT, _FLOAT):
                raw = self.construct(node, path)
                if isinstance(raw, int | float) and not isinstance(raw, bool):
                    value = float(raw)
            elif percent and node.tag == _STR:
                match = _PERCENT_RE.match(node.value)
                if match:
                    value = float(match.group(1))
        if value is None or not math.isfinite(value) or value < 0:
            self.fail(node, path, f"expected {want}, got {self.got(node)}")
        if (positive and value <= 0) or (percent and value > 100):
            self.fail(node, path, f"expected {want}, got {self.got(node)}")
        return value

    def name(self, node: yaml.Node, path: str, what: str) -> str:
        """A non-empty string without whitespace (user, group or @group name)."""
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            text = str(node.value)
            if text and not any(c.isspace() for c in text) and text != "@":
                return text
        self.fail(node, path, f"expected {what}, got {self.got(node)}")

    # -- collections

    def mapping(
        self, node: yaml.Node, path: str, known: tuple[str, ...] | None
    ) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """(key, key node, value node) of a mapping; null counts as empty.

        With `known`, keys outside it are errors with a did-you-mean hint; with
        None the keys are names (users, groups) and any non-empty scalar is taken
        as written, so that a user called `1234` or `yes` keeps their name.
        """
        if self.is_null(node):
            return []
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, path, f"expected a mapping, got {self.got(node)}")
        if id(node) in self.merging:
            self.fail(node, path, "a merge key (<<) refers to the mapping it is in")
        seen: set[str] = set()
        out: dict[str, tuple[str, yaml.Node, yaml.Node]] = {}
        merged: dict[str, tuple[str, yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE:
                # `<<: *anchor` or `<<: [*a, *b]`: YAML merge keys; earlier
                # mappings win over later ones, the mapping's own keys over all.
                sources = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                self.merging.add(id(node))
                try:
                    for source in sources:
                        for entry in self.mapping(source, path, known):
                            self.merge_budget -= 1
                            if self.merge_budget < 0:
                                self.fail(key_node, path, "merge keys (<<) expand too much")
                            merged.setdefault(entry[0], entry)
                finally:
                    self.merging.discard(id(node))
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "":
                self.fail(key_node, path or "top level", "expected a plain key name")
            key = str(key_node.value)
            key_path = f"{path}.{key}" if path else key
            if known is not None and (key_node.tag != _STR or key not in known):
                hint = difflib.get_close_matches(key, known, n=1)
                extra = f" (did you mean {hint[0]}?)" if hint else ""
                self.fail(key_node, key_path, f"unknown key{extra}")
            if key in seen:
                self.fail(key_node, key_path, "duplicate key")
            seen.add(key)
            out[key] = (key, key_node, value_node)
        return [*(e for k, e in merged.items() if k not in out), *out.values()]

    def sequence(self, node: yaml.Node, path: str, want: str) -> list[yaml.Node]:
        if self.is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, path, f"expected {want}, got {self.got(node)}")
        return list(node.value)

    # -- sections

    def gpus(self, node: yaml.Node) -> GpuConfig:
        gpus = GpuConfig()
        for key, _, value in self.mapping(node, "gpus", _GPU_KEYS):
            path = f"gpus.{key}"
            if key == "visible":
                gpus = dataclasses.replace(gpus, visible=self.visible(value, path))
            elif key == "free_memory_percent":
                percent = self.number(value, path, percent=True)
                gpus = dataclasses.replace(gpus, free_memory_percent=percent)
            else:
                seconds = self.number(value, path, positive=True)
                gpus = dataclasses.replace(gpus, poll_seconds=seconds)
        return gpus

    def visible(self, node: yaml.Node, path: str) -> tuple[int, ...] | None:
        want = "'all' or a list of GPU indices"
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _STR and node.value == "all":
                return None
            self.fail(node, path, f"expected {want}, got {self.got(node)}")
        indices: list[int] = []
        for i, item in enumerate(self.sequence(node, path, want)):
            index = self.count(item, f"{path}[{i}]")
            if index in indices:
                self.fail(item, f"{path}[{i}]", f"GPU {index} is listed twice")
            indices.append(index)
        return tuple(sorted(indices))

    def limits(self, node: yaml.Node, path: str) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for key, _, value in self.mapping(node, path, (*LIMIT_KEYS, "share")):
            if key == "share":  # not a quota: kept apart (Config.share_for)
                self.shares[path] = self.number(value, f"{path}.share", positive=True)
                continue
            out[key] = self.integer(value, f"{path}.{key}", unlimited=True)
        return out


    def overrides(self, node: yaml.Node, section: str, noun: str) -> Mapping[str, LimitOverride]:
        out: dict[str, LimitOverride] = {}
        for name, key_node, value in self.mapping(node, section, None):
            path = f"{section}.{name}"
            if any(c.isspace() for c in name):
                self.fail(key_node, path, f"expected a {noun} name, got {name!r}")
            if name.startswith("@"):
                self.fail(key_node, path, f"write {noun} names without '@' here ({name[1:]!r})")
            out[name] = LimitOverride(**self.limits(value, path))
        return MappingProxyType(out)

    def admins(self, node: yaml.Node) -> tuple[str, ...]:
        want = "a list of user names and @groups"
        if isinstance(node, yaml.ScalarNode) and not self.is_null(node):
            self.fail(node, "admins", f"expected {want}, got {self.got(node)}")
        return tuple(
            self.name(item, f"admins[{i}]", "a user name or @group")
            for i, item in enumerate(self.sequence(node, "admins", want))
        )

    def job(self, node: yaml.Node) -> JobLimits:
        values: dict[str, int | None] = {}
        for key, _, value in self.mapping(node, "job", _JOB_KEYS):
            path = f"job.{key}"
            if key == "memory_max":
                values["memory_max"] = self.size(value, path)
            elif key == "cpu_quota":
                values["cpu_quota_percent"] = self.cpu_quota(value, path)
            elif not self.is_null(value):
                values["tasks_max"] = self.count(value, path, minimum=1)
        return JobLimits(**values)


    def cluster(self, node: yaml.Node) -> ClusterConfig:
        cluster = ClusterConfig()
        for key, _, value in self.mapping(node, "cluster", _CLUSTER_KEYS):
            path = f"cluster.{key}"
            if key == "engine":
                if not (isinstance(value, yaml.ScalarNode) and value.tag == _STR
                        and value.value in _ENGINES):
                    self.fail(value, path, f"expected local or slurm, got {self.got(value)}")
                cluster = dataclasses.replace(cluster, engine=str(value.value))
            elif key in ("partition", "account", "qos", "gpu_type"):
                names: dict[str, str | None] = {key: self.slurm_name(value, path)}
                cluster = dataclasses.replace(cluster, **names)  # type: ignore[arg-type]
            elif key == "extra_args":
                cluster = dataclasses.replace(cluster, extra_args=self.sbatch_args(value, path))
            elif key == "output_dir":
                cluster = dataclasses.replace(cluster, output_dir=self.directory(value, path))
            else:
                seconds: dict[str, float] = {key: self.number(value, path, positive=True)}
                cluster = dataclasses.replace(cluster, **seconds)  # type: ignore[arg-type]
        if cluster.max_poll_seconds < cluster.poll_seconds:
            self.fail(node, "cluster.max_poll_seconds",
                      f"expected at least poll_seconds ({cluster.poll_seconds:g}), "
                      f"got {cluster.max_poll_seconds:g}")
        return cluster

    def slurm_name(self, node: yaml.Node, path: str) -> str | None:
        if self.is_null(node):
            return None
        if isinstance(node, yaml.ScalarNode) and node.tag in (_STR, _INT):
            text = str(node.value)
            if _SLURM_NAME_RE.match(text):
                return text
        self.fail(node, path,
                  f"expected a Slurm name (letters, digits, _.+-), got {self.got(node)}")

    def sbatch_args(self, node: yaml.Node, path: str) -> tuple[str, ...]:
        want = "a list of sbatch options such as --mem=4G"
        out: list[str] = []
        for i, item in enumerate(self.sequence(node, path, want)):
            item_path = f"{path}[{i}]"
            if not (isinstance(item, yaml.ScalarNode) and item.tag == _STR
                    and item.value.startswith("-") and "\n" not in item.value):
                self.fail(item, item_path, f"expected an sbatch option such as --mem=4G, "
                          f"got {self.got(item)}")
            text = str(item.value)
            name = text.split("=", 1)[0]
            if name in _TSD_SBATCH_OPTIONS:
                self.fail(item, item_path, f"{name} is set by tsd itself")
            out.append(text)
        return tuple(out)

    def directory(self, node: yaml.Node, path: str) -> str | None:
        if self.is_null(node):
            return None
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR and node.value.startswith("/"):
            return str(node.value)
        self.fail(node, path, f"expected an absolute directory path, got {self.got(node)}")

    def size(self, node: yaml.Node, path: str) -> int | None:
        """Bytes from an int or a string with systemd's suffixes (K, M, G, T, P, E = 1024^n)."""
        if self.is_null(node):
            return None
        want = "a size such as 64G, 512M or a number of bytes"
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _INT:
                value = self.construct(node, path)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
            elif node.tag == _STR:
                match = _SIZE_RE.match(node.value)
                if match:
                    bytes_ = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
                    if bytes_ > 0:
                        return bytes_
        self.fail(node, path, f"expected {want}, got {self.got(node)}")

    def cpu_quota(self, node: yaml.Node, path: str) -> int | None:
        """Whole percent of one CPU: '400%' or 400 -> 400 (four CPUs)."""
        if self.is_null(node):
            return None
        want = "a whole percentage above 0 such as 400%"
        if isinstance(node, yaml.ScalarNode):
            value: object = None
            if node.tag == _INT:
                value = self.construct(node, path)
            elif node.tag == _STR:
                match = re.fullmatch(r"\s*(\d+)\s*%\s*", node.value)
                value = int(match.group(1)) if match else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        self.fail(node, path, f"expected {want}, got {self.got(node)}")

    def config(self, root: yaml.Node | None) -> Config:
        if root is None or self.is_null(root):
            return Config()
        if not isinstance(root, yaml.MappingNode):
            self.fail(root, "top level", f"expected a mapping of settings, got {self.got(root)}")
        cfg = Config()
        for key, _, value in self.mapping(root, "", _TOP_KEYS):
            if key == "slots":
                cfg = dataclasses.replace(cfg, slots=self.count(value, key))
            elif key == "gpus":
                cfg = dataclasses.replace(cfg, gpus=self.gpus(value))
            elif key == "admins":
                cfg = dataclasses.replace(cfg, admins=self.admins(value))
            elif key == "defaults":
                limits = dataclasses.replace(DEFAULT_LIMITS, **self.limits(value, key))
                cfg = dataclasses.replace(cfg, defaults=limits)
            elif key == "groups":
                cfg = dataclasses.replace(cfg, groups=self.overrides(value, key, "group"))
            elif key == "users":
                cfg = dataclasses.replace(cfg, users=self.overrides(value, key, "user"))
            elif key == "job":
                cfg = dataclasses.replace(cfg, job=self.job(value))
            elif key == "connections":
                cfg = dataclasses.replace(cfg, connections=_connections(self, value))
            elif key == "gpu":
                use, idle = _gpu_section(self, value)
                cfg = dataclasses.replace(cfg, gpu=use, idle=idle)
            elif key == "max_finished":
                cfg = dataclasses.replace(cfg, max_finished=self.count(value, key))
            elif key == "scheduler":
                cfg = dataclasses.replace(cfg, fair_share=scheduler_section(self, value))
            elif key == "accounting":
                days = accounting_section(self, value, Config.keep_days)
                cfg = dataclasses.replace(cfg, keep_days=days)
            elif key == "metrics":
                cfg = dataclasses.replace(cfg, metrics=metrics_section(self, value))
            elif key == "cluster":
                cfg = dataclasses.replace(cfg, cluster=self.cluster(value))
            else:
                grace = self.number(value, key)
                cfg = dataclasses.replace(cfg, kill_grace_seconds=grace)
        return _with_shares(self, cfg)




def _with_shares(p: _Parser, cfg: Config) -> Config:
    """`cfg` with the `share:` values the parser collected."""
    by: dict[str, dict[str, float]] = {"groups": {}, "users": {}}
    for path, share in p.shares.items():
        section, _, name = path.partition(".")
        if section == "defaults":
            cfg = dataclasses.replace(cfg, share=share)
        else:
            by[section][name] = share
    groups, users = (MappingProxyType(by[k]) for k in ("groups", "users"))
    return dataclasses.replace(cfg, group_shares=groups, user_shares=users)



def _connections(p: _Parser, node: yaml.Node) -> ConnectionConfig:
    """The `connections:` section."""
    conns = ConnectionConfig()
    for key, _, value in p.mapping(node, "connections", _CONNECTION_KEYS):
        path = f"connections.{key}"
        if key == "max":
            conns = dataclasses.replace(conns, max=p.count(value, path, minimum=1))
        elif key == "per_user":
            limit = p.integer(value, path, minimum=1, unlimited=True)
            conns = dataclasses.replace(conns, per_user=limit)
        else:
            limit = p.integer(value, path, minimum=1, unlimited=True)
            conns = dataclasses.replace(conns, waiting_per_user=limit)
    return conns

def _gpu_section(p: _Parser, node: yaml.Node) -> tuple[GpuUseConfig, IdleConfig]:
    """The `gpu:` section: unmanaged GPU use, and idle GPUs (`idle_*`, tsd.idle)."""
    use, idle = GpuUseConfig(), IdleConfig()
    for key, _, value in p.mapping(node, "gpu", _GPU_USE_KEYS):
        if key != "unmanaged":
            idle = idle_key(p, idle, key, value)
            continue
        if not (
            isinstance(value, yaml.ScalarNode)
            and value.tag == _STR
            and value.value in UNMANAGED_MODES
        ):
            p.fail(value, f"gpu.{key}", f"expected show or hold, got {p.got(value)}")
        use = dataclasses.replace(use, unmanaged=value.value)
    return use, idle


class _Opaque(str):
    """A scalar with a tag tsd does not interpret; it matches no expected type."""


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse config text; `source` names the file in errors. Raises ConfigError.

    An empty file (or one with only comments) gives every default.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "unreadable"
        if exc.context and problem.startswith("but "):  # "expected X" ... "but found Y"
            problem = f"{exc.context}, {problem}"
        raise ConfigError(_one_line(f"{source}: {line}YAML syntax error: {problem}")) from None
    except yaml.reader.ReaderError as exc:
        line_no = text.count("\n", 0, max(exc.position, 0)) + 1
        if isinstance(exc.character, int):
            problem = f"unacceptable character #x{exc.character:04x}"
        else:
            problem = _one_line(str(exc.reason))
        raise ConfigError(f"{source}: line {line_no}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(_one_line(f"{source}: YAML syntax error: {exc}")) from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML syntax error: nested too deeply") from None
    return _Parser(source).config(root)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a config file; read errors are ConfigErrors naming the file too."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{name}: line {line}: not UTF-8 text") from None
    return parse_config(text, name)

