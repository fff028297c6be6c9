import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from longtune.config import GROUPS, build_config, load_config, parse_override
from longtune.errors import ConfigError

REQUIRED = ["model_name_or_path=builtin:tiny", "dataset=builtin:sft_demo", "output_dir=/tmp/x"]


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        load_config(None, REQUIRED + ["lerning_rate=1e-4"])


def test_overrides_are_yaml_scalars_and_win_over_file(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model_name_or_path: builtin:tiny\ndataset: a, b\noutput_dir: o\nlearning_rate: 1.0e-3\n")
    cfg = load_config(cfg_file, ["learning_rate=2e-4", "bf16=true", "max_samples=null", "cutoff_len=128"])
    assert cfg.train.learning_rate == 2e-4
    assert cfg.model.bf16 is True and cfg.compute_dtype == "bfloat16"
    assert cfg.data.dataset == ("a", "b")
    assert cfg.data.max_samples is None and cfg.data.cutoff_len == 128
    assert parse_override("x=1e-4") == ("x", "1e-4")  # YAML 1.1 keeps it a string; coerced per key type


def test_resolved_config_round_trips():
    cfg = load_config(None, REQUIRED + ["learning_rate=3e-5", "finetuning_type=lora", "lora_rank=4"])
    again = build_config(cfg.to_flat_dict())
    assert again == cfg


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("learning_rate=-1", r"key 'learning_rate' must be > 0"),
        ("learning_rate=fast", r"key 'learning_rate' must be float, got 'fast'"),
        ("per_device_train_batch_size=2.5", r"key 'per_device_train_batch_size' must be int"),
        ("bf16=yes please", r"key 'bf16' must be bool"),
        ("stage=ppo", r"key 'stage' must be one of sft, pt"),
        ("lr_scheduler_type=cosin", r"did you mean 'cosine'"),
        ("warmup_ratio=1.5", r"key 'warmup_ratio' must be in \[0, 1\)"),
        ("quantization_bit=3", r"key 'quantization_bit' must be 4 or 8"),
    ],
)
def test_bad_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, REQUIRED + [override])


def test_missing_required_keys():
    with pytest.raises(ConfigError, match="key 'model_name_or_path' is required"):
        load_config(None, ["dataset=x", "output_dir=o"])
    with pytest.raises(ConfigError, match="key 'dataset' is required"):
        load_config(None, ["model_name_or_path=builtin:tiny", "output_dir=o"])


def test_bad_yaml_file_reports_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: builtin:tiny\ndataset: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_every_key_has_help_and_docs_are_current():
    for cls in GROUPS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    try:
        import gen_config_docs
    finally:
        sys.path.pop(0)
    current = (root / "docs" / "config.md").read_text()
    assert current == gen_config_docs.render(), "docs/config.md is stale: run `make docs`"
    for cls in GROUPS.values():
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in current


def test_help_lists_commands_and_points_to_config_reference():
    for args in (["--help"], ["train", "--help"]):
        out = subprocess.run([sys.executable, "-m", "longtune", *args], capture_output=True, text=True, check=True)
        assert "docs/config.md" in out.stdout
    top = subprocess.run([sys.executable, "-m", "longtune", "--help"], capture_output=True, text=True).stdout
    assert "train" in top and "export" in top
