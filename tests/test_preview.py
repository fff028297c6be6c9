"""`longtune data`: rendered samples with trained tokens marked, and counts that match an independent load."""

from __future__ import annotations

import argparse
import json
import re
import statistics

import numpy as np
import pytest

from longtune.data import Example, load_examples
from longtune.data.packing import pack_examples
from longtune.errors import DataError
from longtune.models.builtin import load_builtin_tokenizer
from longtune.preview import GREEN, RESET, add_data_parser, highlight_trained

ROWS = [{"instruction": "Greet the user.", "output": "Hello there, friend!"}] + [
    {"instruction": f"Repeat {i} times: la", "input": "now", "output": " ".join(["la"] * i)} for i in range(1, 40)
]


def run_data(argv: list[str]) -> int:
    """`longtune data ARGV` through the subcommand's own parser (what cli.main dispatches to)."""
    parser = argparse.ArgumentParser(prog="longtune")
    add_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", *argv])
    return args.func(args)


@pytest.fixture
def project(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    config = {
        "model_name_or_path": "builtin:tiny",
        "dataset": "rows.json",
        "dataset_dir": str(tmp_path),
        "template": "chatml",
        "cutoff_len": 40,
        "output_dir": str(tmp_path / "run"),
        "data_cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return tmp_path


def field(output: str, name: str) -> str:
    match = re.search(rf"^{name}\s+(.*)$", output, re.MULTILINE)
    assert match, f"no '{name}' line in:\n{output}"
    return match.group(1)


def test_preview_shows_trained_text_and_exact_counts(project, capsys):
    assert run_data([str(project / "config.yaml"), "--num", "2"]) == 0
    out = capsys.readouterr().out
    # Independently: the first sample's assistant reply is exactly what is marked.
    assert "<|im_start|>assistant\n[[Hello there, friend!<|im_end|>\n]]" in out
    assert "<|im_start|>user\nGreet the user.<|im_end|>" in out
    assert out.count("=== sample ") == 2
    assert not (project / "run").exists()  # output_dir is not touched

    tok = load_builtin_tokenizer()
    examples, stats = load_examples(["rows.json"], dataset_dir=str(project), tokenizer=tok, template="chatml",
                                    stage="sft", cutoff_len=40, cache_dir=str(project / "independent"))
    lengths = [len(e.input_ids) for e in examples]
    trained = sum(lab != -100 for e in examples for lab in e.labels)
    assert field(out, "rows") == "40"
    assert field(out, "examples") == str(len(examples))
    assert field(out, "tokens") == str(sum(lengths))
    assert field(out, "trained tokens").startswith(f"{trained} ")
    assert stats.truncated > 0 and field(out, "truncated") == str(stats.truncated)
    assert field(out, "dropped") == str(stats.dropped)
    assert field(out, "skipped") == "0"
    p95 = int(np.percentile(lengths, 95, method="inverted_cdf"))  # nearest rank
    assert field(out, "length") == (
        f"min {min(lengths)}  median {statistics.median(lengths):g}  mean {np.mean(lengths):.1f}  p95 {p95}  "
        f"max {max(lengths)}"
    )
    bars = re.findall(r"^\s+(\d+)-(\d+)\s*\|[# ]*\s(\d+)$", out, re.MULTILINE)
    assert 1 < len(bars) <= 10
    assert sum(int(count) for *_, count in bars) == len(examples)
    for low, high, count in bars:
        assert int(count) == sum(int(low) <= n <= int(high) for n in lengths)
    assert field(out, "cache") == "miss (tokenized and saved)"
    assert "packing" not in out  # sft packs only when asked

    assert run_data([str(project / "config.yaml"), "packing=true", "--num", "0"]) == 0
    out = capsys.readouterr().out
    assert "=== sample" not in out
    assert field(out, "cache") == "hit"
    rows, packed = pack_examples(examples, 40)
    assert field(out, "packing") == (
        f"{len(examples)} examples -> {len(rows)} rows of 40 tokens, efficiency {100 * packed.efficiency:.1f}%"
    )


def test_preview_skip_bad_rows_flag(project, capsys):
    rows = ROWS[:10] + [{"instruction": "no output"}, 7]
    (project / "rows.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"rows.json row 11: missing field 'output'"):
        run_data([str(project / "config.yaml")])
    assert run_data([str(project / "config.yaml"), "--skip-bad-rows", "--num", "1"]) == 0
    out = capsys.readouterr().out
    assert field(out, "rows") == "12"
    assert field(out, "examples") == "10"
    assert field(out, "skipped") == "2"
    assert "rows.json row 12: expected a JSON object" in out


def test_color_marks_trained_tokens_green():
    tok = load_builtin_tokenizer()
    ids = tok("<|im_start|>assistant\nHi<|im_end|>", add_special_tokens=False)["input_ids"]
    hi = tok("Hi", add_special_tokens=False)["input_ids"]
    n_prompt = len(ids) - len(hi) - 1
    labels = [-100] * n_prompt + ids[n_prompt:]
    example = Example(ids, labels)
    assert highlight_trained(example, tok, color=True) == f"<|im_start|>assistant\n{GREEN}Hi<|im_end|>{RESET}"
    assert highlight_trained(example, tok, color=False) == "<|im_start|>assistant\n[[Hi<|im_end|>]]"
