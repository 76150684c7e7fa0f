"""Config parsing: the example file, defaults, one-line errors with file/line/key, quotas."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsd.config import (
    LIMIT_KEYS,
    UNSET,
    Config,
    ConnectionConfig,
    GpuConfig,
    LimitOverride,
)
from tsd.configfile import load_config, parse_config
from tsd.errors import ConfigError
from tsd.model import JobLimits, UserLimits

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "tsd.yaml"
SRC = "/etc/tsd/tsd.yaml"

# Every key of the schema, as (section or "", key).
LEAVES = [
    ("", "slots"),
    ("gpus", "visible"),
    ("gpus", "free_memory_percent"),
    ("gpus", "poll_seconds"),
    ("", "admins"),
    ("defaults", "max_running_slots"),
    ("defaults", "max_gpus"),
    ("defaults", "max_queued"),
    ("job", "memory_max"),
    ("job", "cpu_quota"),
    ("job", "tasks_max"),
    ("", "max_finished"),
    ("", "kill_grace_seconds"),
    ("connections", "max"),
    ("connections", "per_user"),
    ("connections", "waiting_per_user"),
]
SECTIONS = ["gpus", "defaults", "groups", "users", "job", "connections"]

# The stored-byte caps every user gets unless the config says otherwise.
BYTE_CAPS = {"max_job_bytes": 256 * 1024, "max_stored_bytes": 64 * 1024 * 1024}


def error_of(text: str, source: str = SRC) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(text, source)
    return str(err.value)


# --- defaults and the example file ------------------------------------------------------


def test_every_key_has_its_documented_default() -> None:
    cfg = Config()
    assert cfg.slots == 4
    assert cfg.gpus == GpuConfig(visible=None, free_memory_percent=90.0, poll_seconds=5.0)
    assert cfg.admins == ("root",)
    assert cfg.defaults == UserLimits(
        max_running_slots=None, max_gpus=None, max_queued=1000, **BYTE_CAPS
    )
    assert dict(cfg.groups) == {}
    assert dict(cfg.users) == {}
    assert cfg.job == JobLimits(memory_max=None, cpu_quota_percent=None, tasks_max=None)
    assert cfg.max_finished == 1000
    assert cfg.kill_grace_seconds == 10.0


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "---\n...\n"])
def test_empty_file_means_every_default(text: str) -> None:
    assert parse_config(text) == Config()


def test_example_file_parses_to_exactly_the_defaults_with_no_live_example_users() -> None:
    # A fresh install must not give a real "alice" or "students" a quota of its own.
    assert load_config(EXAMPLE) == Config()


def test_example_file_keeps_its_user_and_group_examples_as_comments() -> None:
    text = EXAMPLE.read_text()
    assert "#   students: {max_gpus: 1}" in text
    assert "#   alice: {max_gpus: 4, max_running_slots: 4}" in text


def comment_above(lines: list[str], line_no: int) -> str:
    """The block of comment lines right above 1-based `line_no`, joined."""
    block: list[str] = []
    i = line_no - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        block.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    return " ".join(block)


def key_lines() -> dict[str, int]:
    """1-based line of every key in the example, by path ("slots", "gpus.visible")."""
    root = yaml.compose(EXAMPLE.read_text(), Loader=yaml.SafeLoader)
    assert isinstance(root, yaml.MappingNode)
    out: dict[str, int] = {}
    for key, value in root.value:
        out[key.value] = key.start_mark.line + 1
        sections = ("gpus", "defaults", "job", "connections")
        if key.value in sections and isinstance(value, yaml.MappingNode):
            for sub, _ in value.value:
                out[f"{key.value}.{sub.value}"] = sub.start_mark.line + 1
    return out


@pytest.mark.parametrize(("section", "key"), LEAVES)
def test_example_file_documents_every_key_with_its_unit_and_true_default(
    section: str, key: str
) -> None:
    lines = EXAMPLE.read_text().splitlines()
    path = f"{section}.{key}" if section else key
    where = key_lines()
    assert path in where, f"{path} missing from etc/tsd.yaml"
    comment = comment_above(lines, where[path])
    assert "Unit" in comment, f"{path}: no unit in {comment!r}"
    match = re.search(r"Default: (.+?)(?:\.\s|\.$|\s\(|$)", comment)
    assert match, f"{path}: no default in {comment!r}"
    # The default the comment states, written in the file, gives the built-in default.
    text = f"{section}:\n  {key}: {match.group(1)}\n" if section else f"{key}: {match.group(1)}\n"
    assert parse_config(text) == Config()


@pytest.mark.parametrize("section", SECTIONS)
def test_example_file_explains_every_section(section: str) -> None:
    lines = EXAMPLE.read_text().splitlines()
    assert comment_above(lines, key_lines()[section])


# --- values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("64G", 64 << 30),
        ("512M", 512 << 20),
        ("1.5G", 3 << 29),
        ("100K", 100 << 10),
        ("100KiB", 100 << 10),
        ("2T", 2 << 40),
        ("4096", 4096),
        ("'4096'", 4096),
        ("8g", 8 << 30),
        ("null", None),
    ],
)
def test_memory_max_takes_bytes_or_systemd_sizes(written: str, size: int | None) -> None:
    assert parse_config(f"job:\n  memory_max: {written}\n").job.memory_max == size


@pytest.mark.parametrize(("written", "percent"), [("400%", 400), ("400", 400), ("50 %", 50)])
def test_cpu_quota_takes_percent_of_one_cpu(written: str, percent: int) -> None:
    assert parse_config(f"job:\n  cpu_quota: {written}\n").job.cpu_quota_percent == percent


@pytest.mark.parametrize(
    ("written", "value"),
    [("90", 90.0), ("'75%'", 75.0), ("0", 0.0), ("100", 100.0), ("12.5", 12.5)],
)
def test_free_memory_percent_takes_numbers_and_percent_strings(written: str, value: float) -> None:
    assert (
        parse_config(f"gpus:\n  free_memory_percent: {written}\n").gpus.free_memory_percent == value
    )


def test_visible_gpus_are_all_or_a_sorted_list() -> None:
    assert parse_config("gpus: {visible: all}").gpus.visible is None
    assert parse_config("gpus: {visible: [3, 0, 1]}").gpus.visible == (0, 1, 3)
    assert parse_config("gpus: {visible: []}").gpus.visible == ()


def test_connection_caps_take_counts_and_per_user_ones_take_unlimited() -> None:
    cfg = parse_config("connections:\n  max: 100\n  per_user: 8\n  waiting_per_user: unlimited\n")
    assert cfg.connections == ConnectionConfig(max=100, per_user=8, waiting_per_user=None)
    assert Config().connections == ConnectionConfig(max=4096, per_user=64, waiting_per_user=32)
    assert "connections.max: expected a positive integer" in error_of("connections: {max: 0}\n")
    assert "connections.per_user" in error_of("connections: {per_user: lots}\n")


def test_zero_slots_is_allowed_to_drain_the_server() -> None:
    assert parse_config("slots: 0").slots == 0


@pytest.mark.parametrize("written", ["unlimited", "null", "~", ""])
def test_quota_keys_take_unlimited(written: str) -> None:
    cfg = parse_config(
        f"defaults:\n  max_queued: {written}\nusers:\n  bob: {{max_gpus: {written or 'null'}}}\n"
    )
    assert cfg.defaults.max_queued is None
    assert cfg.users["bob"] == LimitOverride(max_gpus=None)


def test_user_and_group_names_are_kept_as_written() -> None:
    cfg = parse_config("users:\n  1234: {max_gpus: 1}\n  yes: {}\ngroups:\n  null_group: {}\n")
    assert set(cfg.users) == {"1234", "yes"}
    assert cfg.users["yes"] == LimitOverride()
    assert set(cfg.groups) == {"null_group"}


def test_anchors_and_merge_keys_share_quota_entries() -> None:
    text = (
        "users:\n"
        "  alice: &big {max_gpus: 4, max_queued: 5}\n"
        "  bob: {<<: *big, max_gpus: 2}\n"
        "  carol: *big\n"
        "defaults: {<<: [{max_gpus: 1}, {max_gpus: 2, max_queued: 3}]}\n"
    )
    cfg = parse_config(text)
    assert cfg.users["bob"] == LimitOverride(max_gpus=2, max_queued=5)
    assert cfg.users["carol"] == cfg.users["alice"] == LimitOverride(max_gpus=4, max_queued=5)
    assert cfg.defaults == UserLimits(
        max_running_slots=None, max_gpus=1, max_queued=3, **BYTE_CAPS
    )


def test_merged_keys_are_checked_like_written_ones() -> None:
    assert error_of("defaults: {<<: {max_gpu: 3}}") == (
        f"{SRC}: line 1: defaults.max_gpu: unknown key (did you mean max_gpus?)"
    )
    assert error_of("defaults: &a {<<: *a, max_gpus: 1}") == (
        f"{SRC}: line 1: defaults: a merge key (<<) refers to the mapping it is in"
    )


def test_exponential_merge_keys_are_refused() -> None:
    lines = ["groups:", "  g0: &g0 {max_gpus: 1}"]
    for i in range(1, 12):
        lines.append(f"  g{i}: &g{i} {{<<: [{', '.join([f'*g{i - 1}'] * 4)}]}}")
    assert error_of("\n".join(lines)).endswith("merge keys (<<) expand too much")


def test_empty_sections_mean_their_defaults() -> None:
    assert parse_config("gpus:\ndefaults:\ngroups:\nusers:\njob:\nadmins:\n") == replace(
        Config(), admins=()
    )


# --- errors: one line, naming file, line and key -----------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # YAML syntax
        (
            "slots: 4\ngpus:\n  visible: [0, 1\n",
            "line 4: YAML syntax error: expected ',' or ']', but got '<stream end>'",
        ),
        (
            "slots: 4\n\tgpus: 1\n",
            "line 2: YAML syntax error: found character '\\t' that cannot start any token",
        ),
        (
            "a: 1\n---\nb: 2\n",
            "line 2: YAML syntax error: expected a single document in the stream,"
            " but found another document",
        ),
        ("slots: *x\n", "line 1: YAML syntax error: found undefined alias 'x'"),
        ("slots: 4\nx: \x07\n", "line 2: YAML syntax error: unacceptable character #x0007"),
        # shape
        ("- 1\n- 2\n", "line 1: top level: expected a mapping of settings, got a list"),
        ("slots: 4\n\ngpus: [1]\n", "line 3: gpus: expected a mapping, got a list"),
        ("users:\n  alice: 4\n", "line 2: users.alice: expected a mapping, got 4"),
        ("? [a]\n: 1\n", "line 1: top level: expected a plain key name"),
        # unknown and duplicate keys
        ("slots: 4\nslot: 3\n", "line 2: slot: unknown key (did you mean slots?)"),
        ("\nfoo: 1\n", "line 2: foo: unknown key"),
        (
            "defaults:\n  max_gpu: 2\n",
            "line 2: defaults.max_gpu: unknown key (did you mean max_gpus?)",
        ),
        (
            "users:\n  alice:\n    max_gpu: 2\n",
            "line 3: users.alice.max_gpu: unknown key (did you mean max_gpus?)",
        ),
        ("gpus:\n  visibel: all\n", "line 2: gpus.visibel: unknown key (did you mean visible?)"),
        ("slots: 4\nslots: 5\n", "line 2: slots: duplicate key"),
        # wrong types and negative numbers
        ("slots: lots\n", "line 1: slots: expected a non-negative integer, got 'lots'"),
        ("slots: -1", "line 1: slots: expected a non-negative integer, got -1"),
        ("slots: true", "line 1: slots: expected a non-negative integer, got true"),
        ("slots:", "line 1: slots: expected a non-negative integer, got nothing"),
        ("slots: 1e3", "line 1: slots: expected a non-negative integer, got '1e3'"),
        ("slots: !!int ''\n", "line 1: slots: cannot read the value '' as !!int"),
        (
            "\n\n\n\n\n\ndefaults:\n  max_gpus: lots\n",
            "line 8: defaults.max_gpus: expected a non-negative integer or unlimited, got 'lots'",
        ),
        (
            "defaults:\n  max_queued: -5\n",
            "line 2: defaults.max_queued: expected a non-negative integer or unlimited, got -5",
        ),
        (
            "defaults:\n  max_gpus: 1.5\n",
            "line 2: defaults.max_gpus: expected a non-negative integer or unlimited, got 1.5",
        ),
        ("max_finished: yes\n", "line 1: max_finished: expected a non-negative integer, got yes"),
        ("job:\n  tasks_max: 0\n", "line 2: job.tasks_max: expected a positive integer, got 0"),
        (
            "gpus:\n  poll_seconds: 0\n",
            "line 2: gpus.poll_seconds: expected a positive number, got 0",
        ),
        (
            "kill_grace_seconds: -1\n",
            "line 1: kill_grace_seconds: expected a non-negative number, got -1",
        ),
        (
            "kill_grace_seconds: .nan\n",
            "line 1: kill_grace_seconds: expected a non-negative number, got .nan",
        ),
        # sizes and percentages
        (
            "job:\n  memory_max: 12X\n",
            "line 2: job.memory_max: expected a size such as 64G, 512M or a number of bytes,"
            " got '12X'",
        ),
        (
            "job:\n  memory_max: 0\n",
            "line 2: job.memory_max: expected a size such as 64G, 512M or a number of bytes, got 0",
        ),
        (
            "job:\n  cpu_quota: 1.5%\n",
            "line 2: job.cpu_quota: expected a whole percentage above 0 such as 400%, got '1.5%'",
        ),
        (
            "gpus:\n  free_memory_percent: 150\n",
            "line 2: gpus.free_memory_percent: expected a percentage from 0 to 100, got 150",
        ),
        (
            "gpus:\n  free_memory_percent: abc%\n",
            "line 2: gpus.free_memory_percent: expected a percentage from 0 to 100, got 'abc%'",
        ),
        # gpus.visible
        (
            "gpus:\n  visible: [0, -1]\n",
            "line 2: gpus.visible[1]: expected a non-negative integer, got -1",
        ),
        ("gpus:\n  visible: [1, 1]\n", "line 2: gpus.visible[1]: GPU 1 is listed twice"),
        (
            "gpus:\n  visible: some\n",
            "line 2: gpus.visible: expected 'all' or a list of GPU indices, got 'some'",
        ),
        (
            "gpus:\n  visible: {a: 1}\n",
            "line 2: gpus.visible: expected 'all' or a list of GPU indices, got a mapping",
        ),
        # admins and names
        ("admins: root\n", "line 1: admins: expected a list of user names and @groups, got 'root'"),
        (
            "admins:\n  - root\n  - 42\n",
            "line 3: admins[1]: expected a user name or @group, got 42",
        ),
        (
            "admins: ['bob smith']\n",
            "line 1: admins[0]: expected a user name or @group, got 'bob smith'",
        ),
        (
            "groups:\n  '@students': {max_gpus: 1}\n",
            "line 2: groups.@students: write group names without '@' here ('students')",
        ),
    ],
)
def test_errors_are_one_line_naming_file_line_and_key(text: str, message: str) -> None:
    assert error_of(text) == f"{SRC}: {message}"


def test_load_config_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "tsd.yaml"
    path.write_text("slots: 4\njob:\n  memory_max: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: line 3: job.memory_max: expected a size")


def test_load_config_reports_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: cannot read: No such file or directory"


def test_load_config_reports_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(err.value) == f"{tmp_path}: cannot read: Is a directory"


def test_load_config_reports_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "tsd.yaml"
    path.write_bytes(b"slots: 4\n# caf\xe9\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: line 2: not UTF-8 text"


# --- limits_for and is_admin ---------------------------------------------------------------

QUOTAS = """
defaults: {max_running_slots: 2, max_gpus: 1, max_queued: 10}
groups:
  students: {max_gpus: 2}
  staff: {max_gpus: 3, max_queued: 50}
  power: {max_gpus: unlimited}
  tiny: {max_running_slots: 1}
users:
  alice: {max_gpus: 0}
  bob: {max_running_slots: unlimited}
"""


def test_limits_for_a_user_in_no_listed_group_are_the_defaults() -> None:
    cfg = parse_config(QUOTAS)
    assert cfg.limits_for("carol", ["users", "video"]) == UserLimits(2, 1, 10, **BYTE_CAPS)


def test_limits_for_a_group_member_override_only_the_keys_the_group_sets() -> None:
    cfg = parse_config(QUOTAS)
    assert cfg.limits_for("carol", ["students"]) == UserLimits(2, 2, 10, **BYTE_CAPS)


def test_limits_for_several_groups_take_the_most_generous_value_per_key() -> None:
    cfg = parse_config(QUOTAS)
    assert cfg.limits_for("carol", ["students", "staff"]) == UserLimits(2, 3, 50, **BYTE_CAPS)
    assert cfg.limits_for("carol", ["staff", "power"]) == UserLimits(2, None, 50, **BYTE_CAPS)
    # A group may also be stricter than the defaults; with only it, it applies.
    assert cfg.limits_for("carol", ["tiny"]) == UserLimits(1, 1, 10, **BYTE_CAPS)


def test_limits_for_the_users_own_entry_wins_outright() -> None:
    cfg = parse_config(QUOTAS)
    assert cfg.limits_for("alice", ["staff", "power"]) == UserLimits(2, 0, 50, **BYTE_CAPS)
    assert cfg.limits_for("bob", ["tiny"]) == UserLimits(None, 1, 10, **BYTE_CAPS)


@given(
    st.lists(st.sampled_from(["students", "staff", "power", "tiny", "other"]), max_size=6),
    st.sampled_from(["alice", "bob", "carol"]),
)
def test_limits_for_does_not_depend_on_group_order_or_repeats(groups: list[str], user: str) -> None:
    cfg = parse_config(QUOTAS)
    assert cfg.limits_for(user, groups) == cfg.limits_for(user, sorted(set(groups)))


def test_is_admin_for_root_listed_users_and_members_of_listed_groups() -> None:
    cfg = parse_config("admins: [bob, '@wheel']\n")
    assert cfg.is_admin("root", [])
    assert cfg.is_admin("bob", [])
    assert cfg.is_admin("carol", ["users", "wheel"])
    assert not cfg.is_admin("carol", ["users"])
    assert not cfg.is_admin("wheel", [])
    assert not cfg.is_admin("@wheel", [])
    assert parse_config("admins: []").is_admin("root", [])


# --- properties ------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
YAMLISH = st.text(
    alphabet=st.sampled_from(
        list(":-[]{}&*!|>'\"%@`#,?.~ \t\n\r\\0123456789abz_\x00\x07\u00e9\ufeff")
    )
)


def assert_parses_or_fails_cleanly(text: str) -> None:
    try:
        cfg = parse_config(text, "f.yaml")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("f.yaml: ")
        assert "\n" not in message
    else:
        assert isinstance(cfg, Config)


@FUZZ
@given(st.text() | YAMLISH)
def test_garbage_text_only_ever_raises_config_error(text: str) -> None:
    assert_parses_or_fails_cleanly(text)


KEYS = st.sampled_from(
    [k for _, k in LEAVES] + SECTIONS + ["all", "alice", "students", "@x", "unlimited", "", "<<"]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["all", "unlimited", "64G", "400%", "90%", "@wheel", "root"])
)
TREES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@FUZZ
@given(st.dictionaries(KEYS, TREES, max_size=8) | TREES)
def test_arbitrary_yaml_trees_only_ever_raise_config_error(tree: Any) -> None:
    # safe_dump quotes "<<"; unquoted, it is a YAML merge key, which the parser follows.
    assert_parses_or_fails_cleanly(yaml.safe_dump(tree).replace("'<<':", "<<:"))


NAMES = st.text(alphabet="abcdxyz0129_-.", min_size=1, max_size=8)
LIMIT = st.none() | st.integers(0, 10**6)
OVERRIDE = st.builds(
    LimitOverride,
    max_running_slots=st.just(UNSET) | LIMIT,
    max_gpus=st.just(UNSET) | LIMIT,
    max_queued=st.just(UNSET) | LIMIT,
)
CONFIGS = st.builds(
    Config,
    slots=st.integers(0, 10**6),
    gpus=st.builds(
        GpuConfig,
        visible=st.none()
        | st.lists(st.integers(0, 64), unique=True).map(lambda v: tuple(sorted(v))),
        free_memory_percent=st.floats(0, 100),
        poll_seconds=st.floats(0, 1e6, exclude_min=True),
    ),
    admins=st.lists(NAMES | NAMES.map(lambda n: "@" + n)).map(tuple),
    defaults=st.builds(UserLimits, LIMIT, LIMIT, LIMIT),
    groups=st.dictionaries(NAMES, OVERRIDE, max_size=3).map(MappingProxyType),
    users=st.dictionaries(NAMES, OVERRIDE, max_size=3).map(MappingProxyType),
    job=st.builds(
        JobLimits,
        memory_max=st.none() | st.integers(1, 2**62),
        cpu_quota_percent=st.none() | st.integers(1, 10**5),
        tasks_max=st.none() | st.integers(1, 10**7),
    ),
    max_finished=st.integers(0, 10**7),
    kill_grace_seconds=st.floats(0, 1e6),
)


def as_yaml_tree(cfg: Config) -> dict[str, Any]:
    """The config written out as a file would, key by key."""
    return {
        "slots": cfg.slots,
        "gpus": {
            "visible": "all" if cfg.gpus.visible is None else list(cfg.gpus.visible),
            "free_memory_percent": cfg.gpus.free_memory_percent,
            "poll_seconds": cfg.gpus.poll_seconds,
        },
        "admins": list(cfg.admins),
        "defaults": {key: getattr(cfg.defaults, key) for key in LIMIT_KEYS},
        "groups": {name: dict(entry.items()) for name, entry in cfg.groups.items()},
        "users": {name: dict(entry.items()) for name, entry in cfg.users.items()},
        "job": {
            "memory_max": cfg.job.memory_max,
            "cpu_quota": cfg.job.cpu_quota_percent,
            "tasks_max": cfg.job.tasks_max,
        },
        "max_finished": cfg.max_finished,
        "kill_grace_seconds": cfg.kill_grace_seconds,
    }


@FUZZ
@given(CONFIGS, st.booleans(), st.data())
def test_valid_configs_round_trip_through_yaml(
    cfg: Config, flow: bool, data: st.DataObject
) -> None:
    tree = as_yaml_tree(cfg)
    # Keys left at their default may be left out of the file altogether.
    default_tree = as_yaml_tree(Config())
    for key in list(tree):
        if tree[key] == default_tree[key] and data.draw(st.booleans()):
            del tree[key]
    text = yaml.safe_dump(tree, default_flow_style=flow, sort_keys=data.draw(st.booleans()))
    assert parse_config(text) == cfg


def test_round_trip_keeps_float_values_exact() -> None:
    cfg = replace(
        Config(), kill_grace_seconds=math.ulp(0.0), gpus=GpuConfig(None, 33.333333333333336, 1e-9)
    )
    assert parse_config(yaml.safe_dump(as_yaml_tree(cfg))) == cfg
