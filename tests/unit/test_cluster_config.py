"""The `cluster:` section of tsd.yaml: engine, Slurm names, sbatch extras, poll timing."""

from __future__ import annotations

import pytest

from tsd.config import ClusterConfig
from tsd.configfile import parse_config
from tsd.errors import ConfigError


def test_absent_cluster_means_local() -> None:
    assert parse_config("slots: 2").cluster == ClusterConfig()
    assert not parse_config("").cluster.slurm


def test_a_full_slurm_section_is_read() -> None:
    text = """\
cluster:
  engine: slurm
  partition: gpu
  account: lab-1
  qos: normal
  gpu_type: a100
  extra_args: [--mem=8G, --constraint=ib]
  output_dir: /shared/ts-out
  poll_seconds: 0.5
  max_poll_seconds: 20
"""
    c = parse_config(text).cluster
    assert c == ClusterConfig(
        engine="slurm", partition="gpu", account="lab-1", qos="normal", gpu_type="a100",
        extra_args=("--mem=8G", "--constraint=ib"), output_dir="/shared/ts-out",
        poll_seconds=0.5, max_poll_seconds=20.0,
    )
    assert c.slurm


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cluster: {engine: pbs}", "line 1: cluster.engine: expected local or slurm, got 'pbs'"),
        ("cluster: {partition: 'a b'}", "cluster.partition: expected a Slurm name"),
        ("cluster: {account: 'x;rm'}", "cluster.account: expected a Slurm name"),
        ("cluster: {extra_args: --mem=1G}", "cluster.extra_args: expected a list of sbatch"),
        ("cluster: {extra_args: [mem]}", "cluster.extra_args[0]: expected an sbatch option"),
        ("cluster: {extra_args: [--output=/x]}", "cluster.extra_args[0]: --output is set by tsd"),
        ("cluster: {output_dir: relative/dir}", "cluster.output_dir: expected an absolute"),
        ("cluster: {poll_seconds: 0}", "cluster.poll_seconds: expected a positive number"),
        ("cluster: {poll_seconds: 5, max_poll_seconds: 1}",
         "cluster.max_poll_seconds: expected at least poll_seconds (5), got 1"),
        ("cluster: {partiton: debug}", "cluster.partiton: unknown key (did you mean partition?)"),
    ],
)
def test_bad_cluster_settings_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "tsd.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value) and str(info.value).startswith("tsd.yaml: line 1: ")
