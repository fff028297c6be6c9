"""The one parser of `[CONFIG.yaml] [key=value ...]` shared by train, data and estimate."""

from __future__ import annotations

import pytest

from longtune.cli import main, split_config_args
from longtune.errors import ConfigError


def test_split_config_args_takes_the_yaml_only_first():
    assert split_config_args("train", ["run.yaml", "lr=1", "seed=2"]) == ("run.yaml", ["lr=1", "seed=2"])
    assert split_config_args("data", ["lr=1"]) == (None, ["lr=1"])
    assert split_config_args("estimate", [], required=False) == (None, [])
    with pytest.raises(ConfigError, match=r"^train: 'other.yaml' is not key=value"):
        split_config_args("train", ["run.yaml", "other.yaml"])
    with pytest.raises(ConfigError, match=r"^data: give a CONFIG.yaml and/or key=value overrides"):
        split_config_args("data", [])


@pytest.mark.parametrize("command", ["train", "data", "estimate"])
def test_every_command_reports_a_stray_argument_in_one_line(command, capsys):
    assert main([command, "max_steps=1", "extra.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ConfigError: {command}: 'extra.yaml' is not key=value (only the first argument may be a YAML file)"
