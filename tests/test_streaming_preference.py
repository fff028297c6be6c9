"""`streaming: true` for dpo, rm and kto: the streamed pair and KTO examples equal the in-memory ones (KL pairing
and its wrap-around included, through an interleave mix), and streamed DPO training equals in-memory training,
starts at ln 2, resumes exactly; KTO and RM train from a stream."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from longtune.config import load_config
from longtune.data import DataStats, Example
from longtune.data.packing import PackingStats
from longtune.data.preference import load_kto_examples, load_pair_examples
from longtune.data.streaming import stream_from_config, training_stream
from longtune.errors import ConfigError, DataError
from longtune.models.builtin import load_builtin_tokenizer
from longtune.trainer import train
from tests.conftest import base_overrides
from tests.launch import crash_after_save, final_params, max_rel_diff

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return load_builtin_tokenizer()


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def pair_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"Pair {seed}.{i}: repeat", "input": words(rng, 0, 10), "chosen": words(rng, 1, 20),
             "rejected": words(rng, 1, 20)} for i in range(n)]


def kto_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"KTO {seed}.{i}: repeat", "input": words(rng, 0, 10), "output": words(rng, 1, 20),
             "kto_tag": rng.random() < 0.6} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(root: Path, dataset: str, stage: str, **extra):
    values = dict(model_name_or_path="builtin:tiny", dataset=dataset, dataset_dir=str(root), template="chatml",
                  stage=stage, cutoff_len=48, output_dir=str(root / "run"), data_cache_dir=str(root / "cache"),
                  streaming=True, max_steps=5)
    values.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def fields(examples) -> list[tuple]:
    return [(e.input_ids, e.labels, e.doc_lengths, getattr(e, "desirable", None)) for e in examples]


def streamed(cfg, tok) -> tuple[list, DataStats]:
    stats = DataStats(0, 0, 0, 0, 0, 0)
    return list(stream_from_config(cfg, tok, stats)), stats


def first_epoch(cfg, tok) -> list:
    return list(training_stream(cfg, tok, epoch=0, stats=DataStats(0, 0, 0, 0, 0, 0),
                                packing_stats=PackingStats(0, 0, 0, cfg.data.cutoff_len)))


# ---------------------------------------------------------------- (a) streamed == in-memory


@pytest.mark.parametrize("mix", ["interleave_under", "interleave_over"])
def test_streamed_pairs_equal_load_pair_examples(tok, tmp_path, mix):
    a = write_jsonl(tmp_path / "a.jsonl", pair_rows(13, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", pair_rows(6, seed=2))
    cfg = config(tmp_path, f"{a},{b}", "dpo", mix_strategy=mix, interleave_probs="0.6,0.4", buffer_size=1,
                 val_size=2, cutoff_len=80)
    in_memory, stats = load_pair_examples(cfg, tok)
    assert 0 < stats.truncated < stats.rows and len(in_memory) >= 8  # some rows are cut: truncation is compared
    assert all(isinstance(e, Example) and e.desirable is None for e in in_memory)  # pair rows
    stream, stream_stats = streamed(cfg, tok)
    assert fields(stream) == fields(in_memory)
    if mix == "interleave_under":  # interleave_over reads a dataset again after it wrapped: more rows read
        assert stream_stats == stats
    # the trainer's epoch: buffer_size 1 keeps the order, val_size holds out the head
    assert fields(first_epoch(cfg, tok)) == fields(in_memory[2:])


def test_row_kind_given_by_the_caller_equals_the_stage_default(tok, tmp_path):
    """`rows=` (what a stage passes) reads what cfg's stage implies, and rows the stage cannot train are refused."""
    a = write_jsonl(tmp_path / "a.jsonl", pair_rows(7, seed=5))
    cfg = config(tmp_path, str(a), "rm", buffer_size=1, cutoff_len=80)
    in_memory, _ = load_pair_examples(cfg, tok)
    epoch = list(training_stream(cfg, tok, epoch=0, stats=DataStats(0, 0, 0, 0, 0, 0),
                                 packing_stats=PackingStats(0, 0, 0, 80), rows="pairs"))
    assert fields(epoch) == fields(first_epoch(cfg, tok)) == fields(in_memory)
    with pytest.raises(ConfigError, match=r"stage: kto data is for stage kto, got 'rm'"):
        stream_from_config(cfg, tok, rows="kto")


@pytest.mark.parametrize("mix", ["concat", "interleave_under", "interleave_over"])
def test_streamed_kto_equals_load_kto_examples_with_kl_wrap_around(tok, tmp_path, mix):
    a_rows, b_rows = kto_rows(9, seed=3), kto_rows(5, seed=4)
    a = write_jsonl(tmp_path / "a.jsonl", a_rows)
    b = write_jsonl(tmp_path / "b.jsonl", b_rows)
    probs = {} if mix == "concat" else {"interleave_probs": "0.4,0.6"}
    cfg = config(tmp_path, f"{a},{b}", "kto", mix_strategy=mix, buffer_size=1, cutoff_len=200, **probs)
    in_memory, stats = load_kto_examples(cfg, tok)
    assert all(isinstance(e, Example) and e.desirable is not None for e in in_memory)  # KTO rows
    assert {e.desirable for e in in_memory} == {True, False}
    stream, stream_stats = streamed(cfg, tok)
    assert fields(stream) == fields(in_memory)
    if mix != "interleave_over":  # which reads a dataset again after it wrapped: more rows read
        assert stream_stats == stats
    assert fields(first_epoch(cfg, tok)) == fields(in_memory)
    if mix == "concat":  # row i's KL document holds row i + 1's completion; each dataset's last row its first's
        completions = [r["output"] for r in a_rows] + [r["output"] for r in b_rows]
        partners = [completions[1:9] + completions[:1], completions[10:] + completions[9:10]]
        kl_replies = [tok.decode([t for t, y in zip(e.input_ids[e.doc_lengths[0]:], e.labels[e.doc_lengths[0]:])
                                  if y != IGNORE]) for e in stream]
        assert kl_replies == [p + "<|im_end|>\n" for p in partners[0] + partners[1]]


def test_streamed_kto_skips_bad_rows_and_pairs_across_them(tok, tmp_path):
    rows = kto_rows(7, seed=5)
    del rows[3]["kto_tag"]  # a malformed row is left out before pairing, in memory and streamed alike
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = config(tmp_path, str(path), "kto", buffer_size=1, cutoff_len=200, skip_bad_rows=True)
    in_memory, stats = load_kto_examples(cfg, tok)
    stream, stream_stats = streamed(cfg, tok)
    assert (stats.rows, stats.skipped, len(in_memory)) == (7, 1, 6)
    assert fields(stream) == fields(in_memory) and stream_stats == stats
    assert "bad.jsonl row 4: missing field 'kto_tag'" in stream_stats.skipped_examples[0]


def test_pair_row_error_names_file_and_row(tok, tmp_path):
    rows = pair_rows(4, seed=6)
    del rows[2]["rejected"]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=r"p\.jsonl row 3: missing field 'rejected'"):
        streamed(config(tmp_path, str(path), "dpo"), tok)


# ---------------------------------------------------------------- (b)-(d) training from a stream


def run(data: Path, out: Path, callbacks=None, **kw):
    return train(load_config(None, base_overrides(data, out, **kw)), log=lambda _: None, callbacks=callbacks)


def losses(result) -> list[float]:
    return [r["loss"] for r in result.metrics if "loss" in r]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", pair_rows(6, seed=7))


@pytest.fixture(scope="module")
def kto_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("kto") / "kto.jsonl", kto_rows(6, seed=8))


DPO = dict(stage="dpo", cutoff_len=64, per_device_train_batch_size=3, gradient_accumulation_steps=2,
           lr_scheduler_type="constant", max_steps=2, warmup_steps=0)


def test_streamed_dpo_starts_at_ln2_and_equals_in_memory(pairs_file, tmp_path):
    """Every step covers all 6 pairs (batch 3 x GA 2), so the streamed run and the in-memory run (which takes them
    in a seeded permutation) train on the same examples each step: only the summation order differs."""
    stream = run(pairs_file, tmp_path / "stream", streaming=True, buffer_size=4, **DPO)
    memory = run(pairs_file, tmp_path / "memory", **DPO)
    assert abs(losses(stream)[0] - math.log(2)) <= 1e-6  # policy == reference at step 0
    assert stream.metrics[0]["rewards/chosen"] == 0.0
    assert len(losses(stream)) == 2 and losses(stream)[1] < losses(stream)[0]
    for a, b in zip(losses(stream), losses(memory), strict=True):
        assert abs(a - b) <= 1e-12, (losses(stream), losses(memory))
    assert max_rel_diff(final_params(tmp_path / "stream"), final_params(tmp_path / "memory")) <= 1e-9


def test_streamed_dpo_resume_replays_exactly(pairs_file, tmp_path):
    """4 training pairs a pass (2 held out), 2 steps a pass: step 4 ends the second, reshuffled pass. A run killed
    after step 2 and resumed gives the uninterrupted run's losses, eval losses and weights."""
    kw = dict(DPO, streaming=True, buffer_size=3, per_device_train_batch_size=1, max_steps=4, save_steps=2,
              val_size=2, eval_steps=2, lr_scheduler_type="linear", warmup_steps=1)
    full = run(pairs_file, tmp_path / "full", **kw)
    assert [r["epoch"] for r in full.metrics if "loss" in r] == [0, 1, 1, 2]

    with pytest.raises(KeyboardInterrupt):
        run(pairs_file, tmp_path / "cut", callbacks=crash_after_save(2), **kw)
    resumed = run(pairs_file, tmp_path / "cut", resume_from_checkpoint=True, **kw)
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == losses(full)
    assert [r["eval_loss"] for r in rows if "eval_loss" in r] == [r["eval_loss"] for r in full.metrics
                                                                  if "eval_loss" in r]
    assert max_rel_diff(final_params(tmp_path / "cut"), final_params(full.output_dir)) == 0.0
    assert resumed.global_step == 4


def test_streamed_kto_and_rm_train(kto_file, pairs_file, tmp_path):
    lines: list[str] = []
    kto = train(load_config(None, base_overrides(kto_file, tmp_path / "kto", stage="kto", streaming=True,
                                                 buffer_size=4, per_device_train_batch_size=2, max_steps=2,
                                                 val_size=2, eval_steps=2, cutoff_len=64)), log=lines.append)
    assert len(losses(kto)) == 2 and all(math.isfinite(x) for x in losses(kto))
    assert any("eval_loss" in r and math.isfinite(r["eval_loss"]) for r in kto.metrics)
    assert any(line.startswith("data: streaming") and "2 eval examples in memory" in line for line in lines)
    rm = run(pairs_file, tmp_path / "rm", stage="rm", streaming=True, buffer_size=4, per_device_train_batch_size=2,
             max_steps=2, eval_dataset=str(pairs_file), eval_steps=2, cutoff_len=64)
    assert len(losses(rm)) == 2 and all(math.isfinite(x) for x in losses(rm))
    assert [r["eval_count"] for r in rm.metrics if "eval_loss" in r] == [6]  # eval_dataset in memory, whole


# ---------------------------------------------------------------- (e) config, `longtune data`


REQUIRED = ["model_name_or_path=builtin:tiny", "dataset=builtin:dpo_demo", "output_dir=/tmp/x", "streaming=true",
            "max_steps=5"]


@pytest.mark.parametrize("stage", ["dpo", "rm", "kto"])
def test_streaming_accepts_preference_stages_but_not_precomputed_references(stage):
    assert load_config(None, REQUIRED + [f"stage={stage}"]).data.streaming
    with pytest.raises(ConfigError, match=r"key 'precompute_ref_log_probs' cannot be used with streaming") as error:
        load_config(None, REQUIRED + [f"stage={stage}", "precompute_ref_log_probs=true"])
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"key 'max_steps' must be > 0 with streaming"):
        load_config(None, REQUIRED[:-1] + [f"stage={stage}"])


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_data_preview_shows_the_head_of_the_stream(tmp_path, capsys, pairs_file, kto_file, stage):
    from longtune.cli import main

    name = pairs_file if stage == "dpo" else kto_file
    common = ["model_name_or_path=builtin:tiny", f"dataset={name}", "template=chatml", "cutoff_len=64",
              f"stage={stage}", f"output_dir={tmp_path / 'o'}", f"data_cache_dir={tmp_path / 'cache'}"]
    assert main(["data", *common, "--num", "2", "--no-color"]) == 0
    in_memory = capsys.readouterr().out
    assert main(["data", *common, "streaming=true", "max_steps=5", "buffer_size=4", "--num", "2", "--no-color"]) == 0
    out = capsys.readouterr().out

    def samples(text: str) -> list[str]:
        return [block.split("\n", 1)[1].split("\n\n")[0] for block in text.split("=== sample ")[1:]]

    assert len(samples(out)) == 2 and samples(out) == samples(in_memory)
    assert "statistics over the head of the stream only (streaming): its first 4 examples" in out
    assert "examples        4" in out and "cache           off (streaming)" in out
