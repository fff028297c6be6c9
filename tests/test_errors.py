"""Every row of the README's troubleshooting table: bad input gives one line on stderr naming what is wrong,
exit code 2, and no traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from longtune.cli import main
from tests.conftest import base_overrides


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def case_unknown_key(tmp, data):
    return ["train", *base_overrides(data, tmp / "o"), "lerning_rate=1e-4"], \
        r"^ConfigError: command line: unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)$"


def case_bad_type(tmp, data):
    return ["train", *base_overrides(data, tmp / "o", learning_rate="fast")], \
        r"^ConfigError: .*key 'learning_rate' must be float, got 'fast'$"


def case_bad_yaml(tmp, data):
    cfg = _write(tmp / "c.yaml", "model_name_or_path: builtin:tiny\n  dataset: [x\n")
    return ["train", str(cfg)], r"^ConfigError: .*c\.yaml line \d+: not valid YAML"


def case_missing_config(tmp, data):
    return ["train", str(tmp / "nope.yaml")], r"^ConfigError: config file '.*nope\.yaml' does not exist$"


def case_missing_model(tmp, data):
    return ["train", *base_overrides(data, tmp / "o", model_name_or_path=str(tmp / "no_model"))], \
        r"^ConfigError: key 'model_name_or_path': '.*no_model' does not exist"


def case_missing_dataset_file(tmp, data):
    return ["train", *base_overrides(tmp / "missing.json", tmp / "o")], r"^(DataError|ConfigError): .*missing\.json"


def case_empty_dataset(tmp, data):
    empty = _write(tmp / "empty.json", "[]")
    return ["train", *base_overrides(empty, tmp / "o")], r"^DataError: .*empty\.json.*(no rows|empty)"


def case_row_missing_field(tmp, data):
    rows = json.loads(Path(data).read_text())[:3]
    del rows[1]["output"]
    bad = _write(tmp / "bad_row.json", json.dumps(rows))
    return ["train", *base_overrides(bad, tmp / "o")], r"^DataError: .*bad_row\.json row 2: missing field 'output'"


def case_bad_json(tmp, data):
    bad = _write(tmp / "broken.jsonl", '{"text": "a"}\n{"text": \n')
    return ["train", *base_overrides(bad, tmp / "o", stage="pt")], r"^DataError: .*broken\.jsonl.*line 2"


def case_unknown_template(tmp, data):
    return ["train", *base_overrides(data, tmp / "o", template="chatmll")], \
        r"^ConfigError: .*template.*'chatmll'.*chatml"


def case_unknown_builtin_dataset(tmp, data):
    return ["train", *base_overrides(Path("builtin:nope"), tmp / "o")], r"^ConfigError: .*dataset.*builtin:nope"


def case_output_dir_not_empty(tmp, data):
    out = tmp / "o"
    out.mkdir()
    (out / "something.txt").write_text("x")
    return ["train", *base_overrides(data, out)], \
        r"^ConfigError: key 'output_dir': '.*o' is not empty; set overwrite_output_dir: true"


def case_resume_without_checkpoint(tmp, data):
    return ["train", *base_overrides(data, tmp / "o", resume_from_checkpoint=True)], \
        r"^ConfigError: key 'resume_from_checkpoint': no complete checkpoint-N directory"


def case_sp_not_dividing_world(tmp, data):
    return ["train", *base_overrides(data, tmp / "o", sequence_parallel_size=3)], \
        r"^ConfigError: key 'sequence_parallel_size': 3 does not divide the world size 1"


def case_sft_on_text_rows(tmp, data):
    text = _write(tmp / "plain.jsonl", '{"text": "hello world"}\n')
    return ["train", *base_overrides(text, tmp / "o")], r"^(DataError|ConfigError): .*plain\.jsonl.*stage: pt"


def case_export_nothing(tmp, data):
    (tmp / "empty_run").mkdir()
    return ["export", str(tmp / "empty_run"), str(tmp / "out")], r"^ConfigError: export: '.*empty_run' holds no model"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("make_case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_one_clear_line(make_case, tmp_path, alpaca_file, capsys):
    argv, pattern = make_case(tmp_path, alpaca_file)
    expect_one_line(capsys, argv, pattern)


def expect_one_line(capsys, argv: list[str], pattern: str) -> None:
    """`longtune ARGV` fails with exit status 2 and exactly one stderr line matching `pattern`, no traceback."""
    rc = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert re.search(pattern, lines[0]), lines[0]


def test_readme_troubleshooting_table_covers_the_cases():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= len(CASES) >= 10
