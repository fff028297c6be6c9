"""`streaming: true`: the streamed examples equal the in-memory ones (jsonl, csv, parquet, folders, caps, bad
rows), the shuffle buffer and interleaving are seeded and exact, window packing keeps every document once, memory
stays bounded, and training from a stream is exact, resumable and data-parallel."""

from __future__ import annotations

import csv
import itertools
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import longtune.data.pipeline as data_mod
import longtune.data.loading as loading_mod
import longtune.data.streaming as streaming_mod
from longtune.config import load_config
from longtune.data import DataStats, Example, load_examples
from longtune.data.collate import collate
from longtune.data.mixing import mix_examples, mix_streams
from longtune.data.packing import PackingStats, pack_examples, pack_stream
from longtune.data.streaming import buffer_shuffle, stream_examples, training_stream
from longtune.errors import ConfigError, DataError
from longtune.models.builtin import load_builtin_tokenizer
from longtune.trainer import train
from tests.conftest import base_overrides
from tests.launch import crash_after_save, final_params, launch, max_rel_diff, metric_rows

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def tok():
    return load_builtin_tokenizer()


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "instruction": f"Task {i}: repeat the words",
            "input": " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))),
            "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))),
        }
        for i in range(n)
    ]


def write(path: Path, rows: list[dict]) -> Path:
    """rows as .jsonl, .json, .csv (header + string cells) or .parquet."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # several row groups
    return path


def pairs(examples) -> list[tuple[list[int], list[int]]]:
    return [(e.input_ids, e.labels) for e in examples]


def settings(tok, root: Path, **kw) -> dict:
    values = dict(dataset_dir=str(root), tokenizer=tok, template="chatml", stage="sft", cutoff_len=48,
                  cache_dir=str(root / "cache"))
    values.update(kw)
    return values


def streamed(datasets: list[str], **kw) -> tuple[list[Example], DataStats]:
    kw.pop("cache_dir", None)
    stats = DataStats(0, 0, 0, 0, 0, 0)
    return list(stream_examples(datasets, stats=stats, **kw)), stats


def config(root: Path, dataset: str, **extra):
    values = dict(model_name_or_path="builtin:tiny", dataset=dataset, dataset_dir=str(root), template="chatml",
                  cutoff_len=48, output_dir=str(root / "run"), streaming=True, max_steps=5)
    values.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


# ---------------------------------------------------------------- (a) streamed == in-memory, every file kind


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "folder", "json"])
def test_stream_with_buffer_1_equals_load_examples(tok, tmp_path, kind):
    rows = alpaca_rows(40)
    reference, ref_stats = load_examples([str(write(tmp_path / "ref.jsonl", rows))], **settings(tok, tmp_path))
    assert ref_stats.truncated > 0  # cutoff_len 48 cuts some rows: truncation is compared too
    if kind == "folder":  # a dataset_info entry naming a folder of mixed file kinds, read in name order
        folder = tmp_path / "parts"
        folder.mkdir()
        write(folder / "a.jsonl", rows[:13])
        write(folder / "b.csv", rows[13:29])
        write(folder / "c.parquet", rows[29:])
        (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "parts"}}))
        name = "mine"
    else:
        name = str(write(tmp_path / f"rows.{kind}", rows))
    in_memory, stats = load_examples([name], **settings(tok, tmp_path))
    assert pairs(in_memory) == pairs(reference)  # the csv/parquet readers give the jsonl rows
    assert stats == ref_stats
    stream, stream_stats = streamed([name], **settings(tok, tmp_path))
    assert pairs(stream) == pairs(reference)
    assert stream_stats == ref_stats
    # through the trainer's epoch arrangement: buffer_size 1 keeps the order, val_size holds out the head
    cfg = config(tmp_path, name, buffer_size=1, val_size=3)
    epoch = list(training_stream(cfg, tok, epoch=0, stats=DataStats(0, 0, 0, 0, 0, 0),
                                 packing_stats=PackingStats(0, 0, 0, 48)))
    assert pairs(epoch) == pairs(reference[3:])


def test_pt_mixing_and_row_caps_match_in_memory(tok, tmp_path):
    """pt texts split into pieces, num_samples (cyclic past the end) and max_samples, both interleave
    strategies: the stream gives load_examples' examples exactly, in order."""
    texts = [{"text": " ".join(random.Random(i).choice(WORDS) for _ in range(5 + 9 * i))} for i in range(12)]
    write(tmp_path / "texts.jsonl", texts)
    write(tmp_path / "chat.parquet", alpaca_rows(9, seed=3))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "texts": {"file_name": "texts.jsonl", "columns": {"prompt": "text"}, "num_samples": 30},
        "chat": {"file_name": "chat.parquet"},
    }))
    for strategy, probs in (("concat", ()), ("interleave_under", (0.7, 0.3)), ("interleave_over", (0.4, 0.6))):
        kw = settings(tok, tmp_path, stage="pt", cutoff_len=32, max_samples=25, mix_strategy=strategy,
                      interleave_probs=probs, seed=11)
        want, want_stats = load_examples(["texts,chat"], **kw)
        got, got_stats = streamed(["texts,chat"], **kw)
        assert pairs(got) == pairs(want), strategy
        if strategy == "concat":  # interleaving reads a source again after it wrapped: more rows read
            assert got_stats == want_stats
            assert want_stats.rows == 25 + 9 and want_stats.truncated > 0


def test_bad_rows_name_file_and_row_or_are_skipped(tok, tmp_path):
    lines = [json.dumps(r) for r in alpaca_rows(10)]
    lines[3] = '{"instruction": "broken", "output": '
    lines[7] = json.dumps({"instruction": "no answer"})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        streamed([str(path)], **settings(tok, tmp_path))
    assert str(error.value).startswith(f"{path} line 4: invalid JSON")
    want, want_stats = load_examples([str(path)], **settings(tok, tmp_path, skip_bad_rows=True))
    got, got_stats = streamed([str(path)], **settings(tok, tmp_path, skip_bad_rows=True))
    assert pairs(got) == pairs(want) and len(got) == 8
    assert got_stats == want_stats and got_stats.skipped == 2
    assert "missing field 'output'" in got_stats.skipped_examples[1]
    path.write_text("\n".join(lines[:3] + lines[4:]) + "\n")  # only the missing field left: row 7 of the file
    with pytest.raises(DataError, match=r"bad\.jsonl row 7: .*missing field 'output'"):
        streamed([str(path)], **settings(tok, tmp_path))


# ---------------------------------------------------------------- (b) shuffle buffer


def test_buffer_shuffle_is_a_seeded_bounded_permutation():
    items = list(range(1000))
    a = list(buffer_shuffle(items, 64, seed=1))
    assert sorted(a) == items
    assert a == list(buffer_shuffle(iter(items), 64, seed=1))
    b = list(buffer_shuffle(items, 64, seed=2))
    assert sorted(b) == items and a != b
    assert a != items
    # a buffer of 64 can only hand out what it has read: output k comes from the first k + 64 items
    assert all(x < k + 64 for k, x in enumerate(a))
    assert max(k - x for k, x in enumerate(a)) > 64  # and items can wait in it for long
    assert list(buffer_shuffle(items, 1, seed=1)) == items
    # the first item out is uniform over the first 64 read: chi-square over 4 bins of 16 values, 4000 seeds
    firsts = Counter(next(buffer_shuffle(items, 64, seed=s)) // 16 for s in range(4000))
    chi2 = sum((firsts[b] - 1000) ** 2 / 1000 for b in range(4))
    assert set(firsts) == {0, 1, 2, 3} and chi2 < 16.3  # p = 0.001 for 3 degrees of freedom


# ---------------------------------------------------------------- (c) interleaving streams


def opener(s: int, n: int):
    return lambda: iter([(s, i) for i in range(n)])


@pytest.mark.parametrize("strategy", ["interleave_under", "interleave_over"])
@pytest.mark.parametrize("seed", [0, 5])
def test_mix_streams_equals_mix_examples(strategy, seed):
    lengths = (40, 7, 150)
    for probs in ((0.2, 0.3, 0.5), (0.5, 0.0, 0.5)) if strategy == "interleave_under" else ((0.2, 0.3, 0.5),):
        lists = [[(s, i) for i in range(n)] for s, n in enumerate(lengths)]
        want = mix_examples(lists, strategy=strategy, interleave_probs=probs, seed=seed)
        got = list(mix_streams([opener(s, n) for s, n in enumerate(lengths)], strategy=strategy,
                               interleave_probs=probs, seed=seed))
        assert got == want


def test_stream_interleave_proportions():
    probs = (0.2, 0.5, 0.3)
    long_sources = [opener(s, 20_000) for s in range(3)]
    head = list(itertools.islice(mix_streams(long_sources, strategy="interleave_under", interleave_probs=probs,
                                             seed=3), 10_000))
    counts = Counter(s for s, _ in head)
    for s, p in enumerate(probs):
        assert abs(counts[s] / 10_000 - p) <= 0.02, counts
    # over: a short source is read again from its start, until the longest is used up once
    over = list(mix_streams([opener(0, 5), opener(1, 300)], strategy="interleave_over", interleave_probs=(0.5, 0.5),
                            seed=3))
    assert sum(s == 1 for s, _ in over) == 300 and over[-1] == (1, 299)
    assert [i for s, i in over if s == 0][:12] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_empty_interleaved_stream_is_a_data_error():
    with pytest.raises(DataError, match="dataset 'b': no examples to interleave"):
        list(mix_streams([opener(0, 5), opener(1, 0)], strategy="interleave_over", interleave_probs=(0.5, 0.5),
                         names=["a", "b"]))


# ---------------------------------------------------------------- (d) packing a stream


def lognormal_documents(n: int, capacity: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=4.0, sigma=1.0, size=n), 2, capacity).astype(int).tolist()
    return [Example([d] * n_tok, [-100] + [d] * (n_tok - 1)) for d, n_tok in enumerate(lengths)]


def unpack(rows) -> list[tuple[int, ...]]:
    docs, start = [], 0
    for row in rows:
        start = 0
        for n in row.doc_lengths:
            docs.append(tuple(row.input_ids[start : start + n]))
            start += n
    return docs


def test_pack_stream_keeps_every_document_once_and_packs_tightly():
    capacity = 512
    documents = lognormal_documents(3000, capacity)
    stats = PackingStats(0, 0, 0, capacity)
    rows = list(pack_stream(iter(documents), capacity, 400, stats))
    assert sorted(unpack(rows)) == sorted(tuple(d.input_ids) for d in documents)
    assert all(len(r.input_ids) == sum(r.doc_lengths) <= capacity for r in rows)
    assert (stats.documents, stats.rows, stats.tokens) == (3000, len(rows), sum(len(d.input_ids) for d in documents))
    assert stats.efficiency == sum(len(r.input_ids) for r in rows) / (len(rows) * capacity)
    assert stats.efficiency >= 0.90, stats.efficiency
    # one window holding everything is the in-memory packer: same rows, same boundaries, same position ids
    whole, _ = pack_examples(documents[:500], capacity)
    windowed = list(pack_stream(documents[:500], capacity, 500, PackingStats(0, 0, 0, capacity)))
    assert [(r.input_ids, r.labels, r.doc_lengths) for r in windowed] == [
        (r.input_ids, r.labels, r.doc_lengths) for r in whole]
    batch = collate(windowed[:2], pad_token_id=0)
    for b, row in enumerate(windowed[:2]):
        want = torch.cat([torch.arange(n) for n in row.doc_lengths])
        assert torch.equal(batch.position_ids[b, : len(want)], want)


def test_packed_epochs_use_every_document_once(tok, tmp_path):
    """Through the trainer's epoch arrangement (pt, packing windows, shuffle buffer): each epoch packs each
    piece of text exactly once, and the epochs differ in order only."""
    texts = [{"text": " ".join(random.Random(i).choice(WORDS) for _ in range(3 + 7 * (i % 11)))} for i in range(80)]
    name = str(write(tmp_path / "t.jsonl", texts))
    cfg = config(tmp_path, name, stage="pt", cutoff_len=64, buffer_size=6, packing_buffer=25)
    pieces, _ = load_examples([name], **settings(tok, tmp_path, stage="pt", cutoff_len=64))
    packing = PackingStats(0, 0, 0, 64)
    epochs = [list(training_stream(cfg, tok, epoch=e, stats=DataStats(0, 0, 0, 0, 0, 0), packing_stats=packing))
              for e in range(2)]
    for rows in epochs:
        assert sorted(unpack(rows)) == sorted(tuple(p.input_ids) for p in pieces)
        assert all(len(r.input_ids) <= 64 for r in rows)
    assert [r.input_ids for r in epochs[0]] != [r.input_ids for r in epochs[1]]
    assert packing.documents == 2 * len(pieces) and packing.efficiency >= 0.9


# ---------------------------------------------------------------- (f) bounded memory


def test_stream_holds_at_most_a_buffer_and_a_batch(tok, tmp_path, monkeypatch):
    """Count live parsed rows and examples (peaks taken at every creation) while a 3000-row file streams
    through a 50-example shuffle buffer, encoded 32 rows at a time."""
    live, peak = Counter(), Counter()

    def born(key: str) -> None:
        live[key] += 1
        peak[key] = max(peak[key], live[key])

    class CountedRow(loading_mod.ParsedRow):
        def __init__(self, *args):
            super().__init__(*args)
            born("rows")

        def __del__(self):
            live["rows"] -= 1

    class CountedExample(data_mod.Example):
        def __init__(self, *args):
            super().__init__(*args)
            born("examples")

        def __del__(self):
            live["examples"] -= 1

    monkeypatch.setattr(loading_mod, "ParsedRow", CountedRow)
    monkeypatch.setattr(data_mod, "Example", CountedExample)
    batch = 32
    monkeypatch.setattr(data_mod, "ENCODE_BATCH", batch)  # read by encode_in_batches
    name = str(write(tmp_path / "big.jsonl", alpaca_rows(3000, seed=1)))
    cfg = config(tmp_path, name, buffer_size=50, cutoff_len=64)
    seen = 0
    for example in training_stream(cfg, tok, epoch=0, stats=DataStats(0, 0, 0, 0, 0, 0),
                                   packing_stats=PackingStats(0, 0, 0, 64)):
        seen += 1
        del example
    assert seen == 3000 and live["rows"] == 0
    assert peak["rows"] == batch, peak  # one encoded batch of parsed rows at a time
    # the buffer, one encoded batch, and the example just handed out
    assert 50 + batch <= peak["examples"] <= 50 + batch + 1, peak


# ---------------------------------------------------------------- (e) training from a stream


def run(data: Path, out: Path, callbacks=None, **kw):
    return train(load_config(None, base_overrides(data, out, **kw)), log=lambda _: None, callbacks=callbacks)


def losses(result) -> list[float]:
    return [r["loss"] for r in result.metrics if "loss" in r]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("stream") / "rows.jsonl", alpaca_rows(24, seed=7))


def test_first_step_loss_equals_direct_computation(tok, rows_file, tmp_path):
    """buffer_size 1: step 1 trains on the first 4 examples of the file; its loss is the token-weighted
    cross-entropy of the HF model's full float64 logits over them."""
    from longtune.models.builtin import build_builtin_model

    res = run(rows_file, tmp_path / "one", streaming=True, buffer_size=1, per_device_train_batch_size=2,
              gradient_accumulation_steps=2, max_steps=1)
    examples, _ = load_examples([str(rows_file)], dataset_dir=".", tokenizer=tok, template="chatml", stage="sft",
                                cutoff_len=96)
    model = build_builtin_model("builtin:tiny", dtype=torch.float64)
    model.set_attn_implementation("sdpa")
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples[:4]:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
            targets = torch.tensor(e.labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    assert res.metrics[0]["tokens"] == count
    assert abs(res.metrics[0]["loss"] - total / count) <= 1e-12 * (total / count)


def test_resume_replays_the_stream_exactly(rows_file, tmp_path):
    """6 steps per pass over the 21 training examples (3 held out for eval): 8 steps cross into the second,
    reshuffled pass. A run killed after step 4 and resumed gives the uninterrupted run's losses and weights."""
    kw = dict(streaming=True, buffer_size=5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
              max_steps=8, save_steps=4, val_size=3, eval_steps=4)
    full = run(rows_file, tmp_path / "full", **kw)
    train_rows = [r for r in full.metrics if "loss" in r]
    assert [r["epoch"] for r in train_rows] == [0, 0, 0, 0, 0, 1, 1, 1]  # 21 = 5 x 4 + 1: step 6 ends pass 1
    assert [r["input_tokens"] > 0 for r in train_rows] == [True] * 8
    assert len([r for r in full.metrics if "eval_loss" in r]) == 2

    with pytest.raises(KeyboardInterrupt):
        run(rows_file, tmp_path / "cut", callbacks=crash_after_save(4), **kw)
    resumed = run(rows_file, tmp_path / "cut", resume_from_checkpoint=True, **kw)
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == losses(full)  # bit-exact in float64
    assert [r["eval_loss"] for r in rows if "eval_loss" in r] == [r["eval_loss"] for r in full.metrics
                                                                  if "eval_loss" in r]
    assert max_rel_diff(final_params(tmp_path / "cut"), final_params(full.output_dir)) == 0.0
    assert resumed.global_step == 8


def test_data_parallel_streaming_equals_one_process(rows_file, tmp_path):
    """dp=2 x batch 2 == dp=1 x batch 4 under streaming with packing: every rank reads the same stream and
    trains its own slice of each step (2 gloo processes through torchrun)."""
    common = dict(streaming=True, buffer_size=5, packing=True, packing_buffer=7, max_steps=4)
    launch(1, base_overrides(rows_file, tmp_path / "dp1", per_device_train_batch_size=4, **common))
    launch(2, base_overrides(rows_file, tmp_path / "dp2", per_device_train_batch_size=2, **common))
    one, two = metric_rows(tmp_path / "dp1"), metric_rows(tmp_path / "dp2")
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-9, (one, two)
        assert 0.5 < a["packing_efficiency"] == b["packing_efficiency"] <= 1
    assert max_rel_diff(final_params(tmp_path / "dp2"), final_params(tmp_path / "dp1")) <= 1e-8


def test_streaming_example_config_trains(tmp_path):
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "examples" / "streaming_pt.yaml",
                      [f"output_dir={tmp_path / 'ex'}", "max_steps=3", "disable_tqdm=true", "buffer_size=64"])
    assert cfg.data.streaming and cfg.packing
    lines: list[str] = []
    res = train(cfg, log=lines.append)
    assert res.global_step == 3 and all(0 < r["packing_efficiency"] <= 1 for r in res.metrics if "loss" in r)
    assert any(line.startswith("data: streaming builtin:pt_demo") for line in lines)


# ---------------------------------------------------------------- (g) errors and notices, `longtune data`


REQUIRED = ["model_name_or_path=builtin:tiny", "dataset=builtin:sft_demo", "output_dir=/tmp/x", "streaming=true"]


@pytest.mark.parametrize(
    "extra, pattern",
    [
        ([], r"key 'max_steps' must be > 0 with streaming: true"),
        (["max_steps=5", "val_size=0.1"], r"key 'val_size' must be a whole number of examples with streaming"),
        (["max_steps=5", "precompute_ref_log_probs=true"], r"key 'precompute_ref_log_probs' cannot be used with "
                                                           r"streaming"),
        (["max_steps=5", "buffer_size=0"], r"key 'buffer_size' must be >= 1"),
        (["max_steps=5", "packing_buffer=0"], r"key 'packing_buffer' must be >= 1"),
    ],
)
def test_streaming_config_errors_name_the_key(extra, pattern):
    with pytest.raises(ConfigError, match=pattern) as error:
        load_config(None, REQUIRED + extra)
    assert "\n" not in str(error.value)


def test_cli_prints_one_line(tmp_path, capsys):
    from longtune.cli import main

    assert main(["train", *REQUIRED]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ConfigError: command line: key 'max_steps'")


def test_json_list_is_read_whole_with_a_notice(tmp_path, rows_file):
    rows = [json.loads(x) for x in rows_file.read_text().splitlines()]
    path = write(tmp_path / "list.json", rows)
    cfg = config(tmp_path, str(path), cutoff_len=96)
    notices = streaming_mod.whole_file_notices(cfg)
    assert notices == [f"streaming: {path} is a JSON list, which cannot be read row by row: it is read whole into "
                       f"memory on every pass; convert it to .jsonl (one object per line) to stream it"]
    lines: list[str] = []
    res = train(load_config(None, base_overrides(path, tmp_path / "run", streaming=True, max_steps=1)),
                log=lines.append)
    assert notices[0] in lines and res.global_step == 1
    assert streaming_mod.whole_file_notices(config(tmp_path, str(rows_file))) == []


def test_data_preview_reads_only_the_head(tmp_path, capsys):
    from longtune.cli import main

    name = str(write(tmp_path / "rows.jsonl", alpaca_rows(2000)))
    common = ["model_name_or_path=builtin:tiny", f"dataset={name}", "template=chatml", "cutoff_len=64",
              f"output_dir={tmp_path / 'o'}", f"data_cache_dir={tmp_path / 'cache'}"]
    assert main(["data", *common, "--num", "2", "--no-color"]) == 0
    in_memory = capsys.readouterr().out
    assert main(["data", *common, "streaming=true", "max_steps=5", "buffer_size=300", "--num", "2",
                 "--no-color"]) == 0
    out = capsys.readouterr().out
    def samples(text: str) -> list[str]:
        return [block.split("\n", 1)[1].split("\n\n")[0] for block in text.split("=== sample ")[1:]]

    assert len(samples(out)) == 2 and samples(out) == samples(in_memory)  # the same first examples
    assert "statistics over the head of the stream only (streaming): its first 300 examples" in out
    assert "examples        300" in out and "cache           off (streaming)" in out
    first, _ = load_examples([name], dataset_dir=".", tokenizer=load_builtin_tokenizer(), template="chatml",
                             stage="sft", cutoff_len=64, cache_dir=str(tmp_path / "cache"))
    assert f"tokens          {sum(len(e.input_ids) for e in first[:300])}" in out


def test_stream_steps_are_read_in_order():
    from longtune.steps import StreamedSteps

    steps = StreamedSteps(lambda epoch: iter(range(10)), per_step=4, total_steps=5)
    got = [steps.step(i) for i in range(4)]
    assert [s.examples for s in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]
    assert [(s.epoch, s.ends_epoch) for s in got] == [(0, False), (0, False), (1, True), (1, False)]
    with pytest.raises(ValueError, match="in order"):
        steps.step(2)
    empty = StreamedSteps(lambda epoch: iter(()), per_step=4, total_steps=5)
    with pytest.raises(DataError, match="gave no examples"):
        empty.step(0)
