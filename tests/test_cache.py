"""Tokenized-data cache: hits return identical examples without tokenizing; any input change misses; a broken
cache file is re-tokenized, never an error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import longtune.data.pipeline as data_module
from longtune.data import load_examples
from longtune.models.builtin import load_builtin_tokenizer

ROWS = [
    {"instruction": "Name a colour.", "output": "alpha red"},
    {"instruction": "Count to three.", "input": "slowly", "output": "one two three"},
    {"instruction": "Say nothing.", "output": "ok"},
]


@pytest.fixture
def tok():
    return load_builtin_tokenizer()  # a fresh one per test: one test edits its chat template


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    return tmp_path


def load(tok, root: Path, **overrides):
    kwargs = dict(dataset_dir=str(root), tokenizer=tok, template="chatml", stage="sft", cutoff_len=64,
                  cache_dir=str(root / "cache"))
    kwargs.update(overrides)
    return load_examples(["rows.json"], **kwargs)


def cache_files(root: Path) -> list[Path]:
    return sorted((root / "cache").glob("*.npz"))


@pytest.fixture
def no_tokenizing(monkeypatch):
    """Make any tokenization fail: a cache hit must not need it."""

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although the cache should have been used")

    monkeypatch.setattr(data_module, "tokenize_batch", refuse)


def test_second_load_hits_and_returns_identical_examples(tok, setup, request):
    first, first_stats = load(tok, setup)
    assert not first_stats.cache_hit
    assert len(cache_files(setup)) == 1
    request.getfixturevalue("no_tokenizing")
    second, second_stats = load(tok, setup)
    assert second_stats.cache_hit
    assert second == first
    assert second_stats == first_stats  # cache_hit is not part of the comparison
    assert (second_stats.rows, second_stats.kept, second_stats.tokens) == (3, 3, sum(len(e.input_ids) for e in first))


@pytest.mark.parametrize(
    "change",
    [
        {"cutoff_len": 20},
        {"template": "default"},
        {"train_on_prompt": True},
        {"max_samples": 2},
        {"stage": "pt"},
        {"skip_bad_rows": True},
    ],
)
def test_changed_setting_misses(tok, setup, change):
    base, _ = load(tok, setup)
    changed, stats = load(tok, setup, **change)
    assert not stats.cache_hit
    assert len(cache_files(setup)) == 2
    again, stats = load(tok, setup, **change)  # and the changed setting is cached in its own file
    assert stats.cache_hit and again == changed
    assert load(tok, setup)[1].cache_hit


def test_changed_file_content_misses_even_with_same_size_and_mtime(tok, setup):
    path = setup / "rows.json"
    before, _ = load(tok, setup)
    stat = path.stat()
    path.write_text(json.dumps(ROWS).replace("alpha red", "gamma red"))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    after, stats = load(tok, setup)
    assert not stats.cache_hit
    assert after[0].input_ids != before[0].input_ids
    assert "gamma red" in tok.decode(after[0].input_ids)


def test_changed_tokenizer_or_mixing_misses(tok, setup):
    load(tok, setup)
    tok.chat_template = tok.chat_template + " "  # any tokenizer change, even one this template does not use
    assert not load(tok, setup)[1].cache_hit
    # with one dataset interleaving gives the same examples, but the settings are part of the key
    assert not load(tok, setup, mix_strategy="interleave_over", seed=1)[1].cache_hit
    assert not load(tok, setup, mix_strategy="interleave_over", seed=2)[1].cache_hit
    assert load(tok, setup, mix_strategy="interleave_over", seed=2)[1].cache_hit


def test_overwrite_cache_retokenizes_and_rewrites(tok, setup, monkeypatch):
    first, _ = load(tok, setup)
    (path,) = cache_files(setup)
    inode = path.stat().st_ino
    calls = []
    real = data_module.tokenize_batch
    monkeypatch.setattr(data_module, "tokenize_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, stats = load(tok, setup, overwrite_cache=True)
    assert not stats.cache_hit and calls
    assert again == first
    assert path.stat().st_ino != inode  # replaced by a new file (written aside, then renamed)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupted_cache_file_is_ignored_and_replaced(tok, setup, damage):
    first, _ = load(tok, setup)
    (path,) = cache_files(setup)
    raw = path.read_bytes()
    path.write_bytes({"garbage": b"not a zip file" * 10, "truncated": raw[: len(raw) // 2], "empty": b""}[damage])
    second, stats = load(tok, setup)
    assert not stats.cache_hit
    assert second == first
    third, stats = load(tok, setup)
    assert stats.cache_hit and third == first


def test_default_cache_dir_from_environment(tok, setup, monkeypatch):
    monkeypatch.setenv("LONGTUNE_CACHE", str(setup / "env_cache"))
    load(tok, setup, cache_dir=None)
    assert len(list((setup / "env_cache").glob("*.npz"))) == 1
    assert load(tok, setup, cache_dir=None)[1].cache_hit


def test_pt_pieces_and_labels_round_trip(tok, setup):
    (setup / "texts.jsonl").write_text("".join(json.dumps({"text": f"word {i} " * 30}) + "\n" for i in range(4)))
    kwargs = dict(dataset_dir=str(setup), tokenizer=tok, template="chatml", stage="pt", cutoff_len=16,
                  cache_dir=str(setup / "cache"))
    first, first_stats = load_examples(["texts.jsonl"], **kwargs)
    second, second_stats = load_examples(["texts.jsonl"], **kwargs)
    assert second_stats.cache_hit and second == first and second_stats == first_stats
    assert first_stats.truncated == 4 and len(first) > 4


def test_unwritable_cache_warns_and_still_returns_examples(tok, setup):
    blocker = setup / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="data cache: could not write"):
        examples, stats = load(tok, setup, cache_dir=str(blocker / "cache"))
    assert len(examples) == 3 and not stats.cache_hit
    assert examples == load(tok, setup)[0]
