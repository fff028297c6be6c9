"""Dataset mixing: concat, interleave_under (first exhausted) and interleave_over (all exhausted)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from longtune.data import load_examples
from longtune.data.mixing import mix_examples
from longtune.errors import ConfigError, DataError
from longtune.models.builtin import load_builtin_tokenizer


def sources(*lengths: int) -> list[list[tuple[int, int]]]:
    """Dataset s holds items (s, 0), (s, 1), ..."""
    return [[(s, i) for i in range(n)] for s, n in enumerate(lengths)]


def test_concat_keeps_dataset_order():
    assert mix_examples(sources(2, 1, 3), strategy="concat") == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]


def test_proportions_follow_interleave_probs():
    probs = (0.5, 0.3, 0.2)
    mixed = mix_examples(sources(10_000, 10_000, 10_000), strategy="interleave_under", interleave_probs=probs, seed=1)
    assert len(mixed) >= 10_000  # dataset 0 runs out after ~20k draws
    counts = Counter(s for s, _ in mixed)
    for s, p in enumerate(probs):
        assert abs(counts[s] / len(mixed) - p) <= 0.02
    first = Counter(s for s, _ in mixed[:10_000])
    for s, p in enumerate(probs):
        assert abs(first[s] / 10_000 - p) <= 0.02


def test_uniform_when_no_probs_given():
    mixed = mix_examples(sources(10_000, 10_000), strategy="interleave_under", seed=5)
    share = sum(s == 0 for s, _ in mixed) / len(mixed)
    assert abs(share - 0.5) <= 0.02


def test_same_seed_same_order_other_seed_other_order():
    data = sources(50, 80, 30)
    for strategy in ("interleave_under", "interleave_over"):
        a = mix_examples(data, strategy=strategy, interleave_probs=(0.2, 0.5, 0.3), seed=7)
        b = mix_examples(data, strategy=strategy, interleave_probs=(0.2, 0.5, 0.3), seed=7)
        c = mix_examples(data, strategy=strategy, interleave_probs=(0.2, 0.5, 0.3), seed=8)
        assert a == b
        assert a != c


def in_order_with_wraparound(mixed, lengths) -> bool:
    """Each dataset's items appear as 0, 1, ..., n-1, 0, 1, ... (its own order, cycling)."""
    seen = Counter()
    for s, i in mixed:
        if i != seen[s] % lengths[s]:
            return False
        seen[s] += 1
    return True


def test_under_stops_when_the_first_dataset_is_exhausted():
    lengths = (40, 300, 300)
    mixed = mix_examples(sources(*lengths), strategy="interleave_under", interleave_probs=(0.4, 0.3, 0.3), seed=3)
    counts = Counter(s for s, _ in mixed)
    assert mixed[-1] == (0, 39)  # the draw that used up dataset 0 is the last one
    assert counts[0] == 40
    assert counts[1] < 300 and counts[2] < 300  # nothing else ran out, nothing repeated
    assert len(set(mixed)) == len(mixed)
    assert in_order_with_wraparound(mixed, lengths)


def test_over_uses_every_example_of_every_dataset():
    lengths = (5, 200, 37)
    mixed = mix_examples(sources(*lengths), strategy="interleave_over", interleave_probs=(0.6, 0.2, 0.2), seed=0)
    for s, n in enumerate(lengths):
        assert {(s, i) for i in range(n)} <= set(mixed)
    counts = Counter(s for s, _ in mixed)
    assert counts[0] > 5  # the small, likely dataset was cycled
    assert in_order_with_wraparound(mixed, lengths)
    # it stops right after the last dataset's final example first appears
    last_first_use = max(mixed.index((s, n - 1)) for s, n in enumerate(lengths))
    assert last_first_use == len(mixed) - 1


@pytest.mark.parametrize("strategy,stopping", [("interleave_under", "first_exhausted"),
                                               ("interleave_over", "all_exhausted")])
def test_same_order_as_hf_interleave_datasets(strategy, stopping):
    datasets = pytest.importorskip("datasets")
    lengths, probs, seed = (13, 50, 29), (0.25, 0.45, 0.3), 11
    hf = datasets.interleave_datasets(
        [datasets.Dataset.from_dict({"s": [s] * n, "i": list(range(n))}) for s, n in enumerate(lengths)],
        probabilities=list(probs), seed=seed, stopping_strategy=stopping,
    )
    ours = mix_examples(sources(*lengths), strategy=strategy, interleave_probs=probs, seed=seed)
    assert ours == list(zip(hf["s"], hf["i"], strict=True))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="interleave_probs: needs one probability per dataset"):
        mix_examples(sources(3, 3), strategy="interleave_under", interleave_probs=(1.0,))
    with pytest.raises(ConfigError, match="sum to 1"):
        mix_examples(sources(3, 3), strategy="interleave_over", interleave_probs=(0.5, 0.6))
    with pytest.raises(ConfigError, match="needs mix_strategy"):
        mix_examples(sources(3, 3), strategy="concat", interleave_probs=(0.5, 0.5))
    with pytest.raises(ConfigError, match="probability 0"):
        mix_examples(sources(3, 3), strategy="interleave_over", interleave_probs=(1.0, 0.0), names=["a", "b"])
    with pytest.raises(DataError, match="dataset 'b': no examples"):
        mix_examples([[1], []], strategy="interleave_under", names=["a", "b"])


def test_load_examples_interleaves_whole_datasets(tmp_path):
    tok = load_builtin_tokenizer()
    for name, n in (("a.json", 6), ("b.json", 30)):
        rows = [{"instruction": f"{name} question {i}", "output": f"answer {i}"} for i in range(n)]
        (tmp_path / name).write_text(json.dumps(rows))
    common = dict(dataset_dir=str(tmp_path), tokenizer=tok, template="chatml", stage="sft", cutoff_len=256,
                  cache_dir=str(tmp_path / "cache"))
    a, _ = load_examples(["a.json"], **common)
    b, _ = load_examples(["b.json"], **common)
    mixed, stats = load_examples(["a.json", "b.json"], mix_strategy="interleave_over",
                                 interleave_probs=(0.5, 0.5), seed=4, **common)
    expected = mix_examples([a, b], strategy="interleave_over", interleave_probs=(0.5, 0.5), seed=4)
    assert [e.input_ids for e in mixed] == [e.input_ids for e in expected]
    assert len(mixed) > 30
    assert (stats.rows, stats.kept) == (36, 36)  # rows count the sources; tokens count what is returned
    assert stats.tokens == sum(len(e.input_ids) for e in expected)
    concat, _ = load_examples(["a.json,b.json"], **common)
    assert [e.input_ids for e in concat] == [e.input_ids for e in a + b]
