"""Bad input found by trying longtune as a new user would (issue 12): each case gives one line on stderr naming the
key, file, row or rank and what was expected, exit code 2, no traceback; `--debug` still shows the traceback.
Each case is a row of the README's troubleshooting table."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longtune.cli import main
from tests.conftest import base_overrides
from tests.test_errors import expect_one_line


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _config_file(tmp: Path, data: Path, **extra) -> Path:
    values = dict(item.split("=", 1) for item in base_overrides(data, tmp / "o"))
    values.update({k: str(v) for k, v in extra.items()})
    return _write(tmp / "run.yaml", "".join(f"{k}: {v}\n" for k, v in values.items()))


@pytest.fixture(scope="module")
def one_step_checkpoint(tmp_path_factory, alpaca_file) -> Path:
    """A full-finetuning float64 run of two steps that saved checkpoint-2."""
    out = tmp_path_factory.mktemp("ckpt_run") / "o"
    assert main(["train", *base_overrides(alpaca_file, out, max_steps=2, save_steps=2)]) == 0
    return out


def _copy_run(src: Path, tmp: Path) -> Path:
    dst = tmp / "o"
    shutil.copytree(src, dst)
    return dst


def case_data_not_utf8(tmp, data, ckpt):
    bad = _write(tmp / "latin1.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    return ["train", *base_overrides(bad, tmp / "o")], r"^DataError: .*latin1\.jsonl line 2: not UTF-8 \(byte 0xe9"


def case_config_not_utf8(tmp, data, ckpt):
    cfg = _write(tmp / "c.yaml", b"model_name_or_path: builtin:tiny\n# r\xe9sum\xe9\n")
    return ["train", str(cfg)], r"^ConfigError: .*c\.yaml line 2: not UTF-8 \(byte 0xe9"


@pytest.mark.parametrize("key,value,expected", [
    ("learning_rate", ".nan", "a finite number"),
    ("num_train_epochs", ".inf", "a finite number"),
    ("adam_beta1", "2", r"in \[0, 1\)"),
    ("adam_epsilon", "-1", "> 0"),
    ("seed", "-1", r"in \[0, 2\*\*32\)"),
])
def test_out_of_range_values_name_the_key(tmp_path, alpaca_file, capsys, key, value, expected):
    cfg = _config_file(tmp_path, alpaca_file, **{key: value})
    expect_one_line(capsys, ["train", str(cfg)], rf"^ConfigError: .*run\.yaml: key '{key}' must be {expected}, got")


def case_file_name_not_a_string(tmp, data, ckpt):
    (tmp / "d").mkdir()
    _write(tmp / "d" / "dataset_info.json", json.dumps({"mine": {"file_name": 5}}))
    return ["train", *base_overrides(Path("mine"), tmp / "o", dataset_dir=tmp / "d")], \
        r"^DataError: .*dataset_info\.json entry 'mine': 'file_name' must be a file or folder name \(a string\), got 5$"


def _tiny_model_dir(path: Path, vocab: int | None = None, tokenizer: bool = True) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from longtune.models.builtin import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab or len(tok), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(path)
    if tokenizer:
        tok.save_pretrained(path)
    return path


def case_vocab_smaller_than_tokenizer(tmp, data, ckpt):
    model = _tiny_model_dir(tmp / "small_vocab", vocab=200)
    return ["train", *base_overrides(data, tmp / "o", model_name_or_path=model)], \
        r"^ConfigError: key 'model_name_or_path': the tokenizer has \d+ tokens but the model's vocab_size is 200"


def case_truncated_weights(tmp, data, ckpt):
    model = _tiny_model_dir(tmp / "cut")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["train", *base_overrides(data, tmp / "o", model_name_or_path=model)], \
        r"^ConfigError: key 'model_name_or_path': the weights in '.*cut' are unreadable .*truncated or corrupt"


def case_model_without_tokenizer(tmp, data, ckpt):
    model = _tiny_model_dir(tmp / "no_tok", tokenizer=False)
    return ["train", *base_overrides(data, tmp / "o", model_name_or_path=model)], \
        r"^ConfigError: key 'model_name_or_path': '.*no_tok' has no tokenizer files"


def case_resume_other_finetuning_type(tmp, data, ckpt):
    out = _copy_run(ckpt, tmp)
    return ["train", *base_overrides(data, out, max_steps=2, resume_from_checkpoint=True, finetuning_type="lora")], \
        r"^ConfigError: key 'finetuning_type': 'lora', but checkpoint-2 was written with finetuning_type: 'full'"


def case_sharded_checkpoint_on_one_process(tmp, data, ckpt):
    out = _copy_run(ckpt, tmp)
    manifest = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(manifest.read_text())
    state["run"].update(world_size=2, fsdp=True)  # as a 2-process FSDP run writes it
    manifest.write_text(json.dumps(state))
    return ["train", *base_overrides(data, out, max_steps=2, resume_from_checkpoint=True)], \
        r"^ConfigError: .*checkpoint-2 was written with FSDP by 2 process\(es\), this launch has 1 without FSDP; " \
        r"resume with --nproc 2"


def case_duplicate_yaml_key(tmp, data, ckpt):
    cfg = _write(tmp / "dup.yaml", "model_name_or_path: builtin:tiny\nlearning_rate: 1e-4\nlearning_rate: 1e-3\n")
    return ["train", str(cfg)], \
        r"^ConfigError: .*dup\.yaml line 3: key 'learning_rate' is given twice \(first on line 2\)"


def case_config_path_is_a_folder(tmp, data, ckpt):
    return ["train", str(tmp)], r"^ConfigError: config file '.*' is a directory; give the YAML file inside it$"


def case_bad_row_after_blank_lines(tmp, data, ckpt):
    rows = '{"instruction": "a", "output": "b"}\n\n\n{"instruction": "c"}\n'
    bad = _write(tmp / "gaps.jsonl", rows)
    return ["train", *base_overrides(bad, tmp / "o")], r"^DataError: .*gaps\.jsonl row 4: missing field 'output'"


def case_null_field(tmp, data, ckpt):
    bad = _write(tmp / "nulls.json", json.dumps([{"instruction": "a", "output": None}]))
    return ["train", *base_overrides(bad, tmp / "o")], \
        r"^DataError: .*nulls\.json row 1: field 'output' is null; expected a string"


def case_sharegpt_turns_not_alternating(tmp, data, ckpt):
    row = {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                             {"from": "gpt", "value": "c"}]}
    bad = _write(tmp / "turns.json", json.dumps([row]))
    return ["train", *base_overrides(bad, tmp / "o")], \
        r"^DataError: .*turns\.json row 1: conversations\[1\]\.from is 'human', but turns must alternate; " \
        r"expected 'gpt' here"


def case_override_error_names_the_command_line(tmp, data, ckpt):
    cfg = _config_file(tmp, data)
    return ["train", str(cfg), "learning_rate=fast"], \
        r"^ConfigError: command line: key 'learning_rate' must be float, got 'fast'$"


def case_read_only_output_dir(tmp, data, ckpt):
    if os.geteuid() != 0:
        target = tmp / "ro"
        target.mkdir()
        target.chmod(0o500)
        out = target / "o"
    else:  # root writes through file modes; sysfs refuses new files even to root
        out = Path("/sys/longtune-test-output")
    return ["train", *base_overrides(data, out)], r"^ConfigError: key 'output_dir': '.*' is not writable"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("make_case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_one_clear_line(make_case, tmp_path, alpaca_file, one_step_checkpoint, capsys):
    if make_case is case_read_only_output_dir:
        import tempfile

        if os.geteuid() == 0:
            try:
                with tempfile.TemporaryFile(dir="/sys"):
                    pytest.skip("no read-only location to test with")
            except OSError:
                pass
    argv, pattern = make_case(tmp_path, alpaca_file, one_step_checkpoint)
    expect_one_line(capsys, argv, pattern)


def test_debug_still_shows_the_traceback(tmp_path, capsys):
    cfg = _write(tmp_path / "dup.yaml", "seed: 1\nseed: 2\n")
    assert main(["--debug", "train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "is given twice" in err.splitlines()[-1]


def test_resume_with_changed_settings_says_so(tmp_path, alpaca_file, one_step_checkpoint, capsys):
    out = _copy_run(one_step_checkpoint, tmp_path)
    assert main(["train", *base_overrides(alpaca_file, out, max_steps=3, dtype="float32",
                                          resume_from_checkpoint=True)]) == 0
    notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("notice: resuming")]
    assert notices == ["notice: resuming checkpoint-2 with changed settings: dtype float64 -> float32, "
                       "max_steps 2 -> 3 (the loss curve will not match an uninterrupted run)"]


def test_disk_full_is_one_line(tmp_path, alpaca_file):
    """A file-size limit makes every write past it fail as a full disk does (EFBIG instead of ENOSPC)."""
    import resource
    import signal

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a short write instead of death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "longtune", "train", *base_overrides(alpaca_file, tmp_path / "o", max_steps=1)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.match(r"^StorageError: writing '.*checkpoint-1' failed: no space left on device \(.* GiB free on .*\) "
                    r"or the file-size limit \(ulimit -f\) was reached", lines[0]), lines[0]
    assert not list((tmp_path / "o").glob(".tmp-checkpoint-*"))  # the half-written temp dir is gone


def test_nproc_error_is_printed_once(tmp_path, alpaca_file):
    """`--nproc 2`: an error every rank hits is one line from the launcher (no torchrun traceback), exit 2."""
    bad = _write(tmp_path / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "longtune", "train", *base_overrides(bad, tmp_path / "o"), "--nproc", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines == [f"DataError: {bad} row 2: missing field 'output' (alpaca rows need 'instruction' and 'output')"]


def test_readme_troubleshooting_table_grows_with_the_cases():
    from tests.test_errors import CASES as EARLIER_CASES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # this file's cases, its five out-of-range keys as one row, disk full and the two launcher/peer rows
    assert len(rows) >= len(EARLIER_CASES) + len(CASES) + 1 + 1 + 2
    for needle in ("not UTF-8", "is given twice", "is not writable", "no tokenizer files", "must alternate",
                   "StorageError", "PeerError", "a finite number", "vocab_size", "was written with FSDP"):
        assert needle in section, needle
