"""Config keys of the admin's view: `gpu.idle_*` and `metrics.textfile`."""

from __future__ import annotations

import pytest

from tsd.config import DEFAULT_METRICS_TEXTFILE, Config, IdleConfig, MetricsConfig
from tsd.configfile import parse_config
from tsd.errors import ConfigError

SRC = "/etc/tsd/tsd.yaml"


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(text, SRC)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_idle_gpus_are_off_and_metrics_at_the_default_path_on_the_system_service_only() -> None:
    cfg = Config()
    assert cfg.idle == IdleConfig(after=None, threshold=5.0, action="none", grace=600.0,
                                  notify=None)
    assert cfg.metrics.path(system=True) == DEFAULT_METRICS_TEXTFILE
    assert cfg.metrics.path(system=False) is None  # a personal daemon only when configured
    assert DEFAULT_METRICS_TEXTFILE == "/var/lib/prometheus/node-exporter/tsd.prom"


def test_idle_keys_take_durations_with_units_percentages_actions_and_a_command() -> None:
    cfg = parse_config(
        "gpu:\n  idle_after: 30m\n  idle_threshold: 2.5%\n  idle_action: requeue\n"
        "  idle_grace: 90\n  idle_notify: 'echo $TS_JOB_ID'\n"
    )
    assert cfg.idle == IdleConfig(after=1800.0, threshold=2.5, action="requeue", grace=90.0,
                                  notify="echo $TS_JOB_ID")
    assert parse_config("gpu: {idle_after: 2h, idle_grace: 1d}").idle.grace == 86400.0
    assert parse_config("gpu: {idle_after: off}").idle.after is None
    assert parse_config("gpu: {idle_action: kill}").idle.action == "kill"


def test_metrics_textfile_is_an_absolute_prom_path_or_empty_for_off() -> None:
    assert parse_config("metrics: {textfile: /srv/ne/tsd.prom}").metrics == MetricsConfig(
        "/srv/ne/tsd.prom")
    off = parse_config('metrics: {textfile: ""}').metrics
    assert off.path(system=True) is None and off.path(system=False) is None
    assert parse_config("metrics:\n  textfile:\n").metrics.path(system=True) is None
    on = parse_config("metrics: {textfile: /tmp/x.prom}").metrics
    assert on.path(system=False) == "/tmp/x.prom"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu: {idle_after: soon}",
         f"{SRC}: line 1: gpu.idle_after: expected a duration such as 90s, 30m, 2h or 7d, or off, "
         "got 'soon'"),
        ("gpu: {idle_after: 0}", "gpu.idle_after: expected a duration"),
        ("gpu: {idle_grace: off}", "gpu.idle_grace: expected a duration such as 90s, 30m, 2h or 7d,"
         " got off"),
        ("gpu: {idle_threshold: 120}", "gpu.idle_threshold: expected a percentage from 0 to 100"),
        ("gpu: {idle_action: nuke}",
         "gpu.idle_action: expected one of none, kill, requeue, got 'nuke'"),
        ("gpu: {idle_notify: [a, b]}", "gpu.idle_notify: expected a command line, got a list"),
        ("gpu: {idle_aftr: 30m}", "gpu.idle_aftr: unknown key (did you mean idle_after?)"),
        ("metrics: {textfile: tsd.prom}",
         'metrics.textfile: expected an absolute path ending in .prom, or "" for no metrics'),
        ("metrics: {textfile: /var/lib/x/tsd.txt}", "metrics.textfile: expected an absolute"),
        ("metrics: {textfile: /var/lib/x/}", "metrics.textfile: expected an absolute"),
        ("metrics: {file: /x.prom}", "metrics.file: unknown key"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(text: str, expected: str) -> None:
    assert expected in error_of(text)
