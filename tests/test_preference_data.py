"""Preference (dpo, rm) and KTO data: exact ids and label masks against hand-rendered ChatML, truncation of
two documents sharing a prompt, KL-document pairing, row errors, builtin datasets."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from longtune.config import load_config
from longtune.data import Example, load_examples
from longtune.data.preference import load_kto_examples, load_pair_examples
from longtune.errors import ConfigError, DataError
from longtune.models.builtin import load_builtin_tokenizer

IGNORE = -100
PROMPT = ("<|im_start|>user\nAdd the two numbers.\n12 + 30<|im_end|>\n<|im_start|>assistant\n", False)


@pytest.fixture(scope="module")
def tok():
    return load_builtin_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels from hand-rendered (text, trained) pieces, each tokenized alone."""
    all_ids, labels = [], []
    for text, trained in pieces:
        piece = ids(tok, text)
        all_ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return all_ids, labels


def pair_expected(tok, prompt: list[tuple[str, bool]], first: str, second: str) -> tuple[list, list, list]:
    """Ids, labels and doc_lengths of prompt + first, then prompt + second (replies trained with <|im_end|>\\n)."""
    a_ids, a_labels = expected(tok, prompt + [(first + "<|im_end|>\n", True)])
    b_ids, b_labels = expected(tok, prompt + [(second + "<|im_end|>\n", True)])
    return a_ids + b_ids, a_labels + b_labels, [len(a_ids), len(b_ids)]


def documents(example) -> list[tuple[list[int], list[int]]]:
    out, start = [], 0
    for n in example.doc_lengths:
        out.append((example.input_ids[start : start + n], example.labels[start : start + n]))
        start += n
    return out


def trained_spans(tok, ids_: list[int], labels: list[int]) -> list[str]:
    groups = itertools.groupby(zip(ids_, labels, strict=True), key=lambda p: p[1] != IGNORE)
    return [tok.decode([i for i, _ in g]) for trained, g in groups if trained]


def config(tmp_path: Path, dataset: str, *, stage: str = "dpo", cutoff_len: int = 4096, **extra):
    values = {
        "model_name_or_path": "builtin:tiny",
        "dataset": dataset,
        "dataset_dir": str(tmp_path),
        "template": "chatml",
        "stage": stage,
        "cutoff_len": cutoff_len,
        "output_dir": str(tmp_path / "run"),
        "data_cache_dir": str(tmp_path / "cache"),
    }
    values.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def write(tmp_path: Path, rows: list, name: str = "d.json", info: dict | None = None) -> str:
    (tmp_path / name).write_text(json.dumps(rows, indent=1))
    if info is not None:
        (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return name


# ---------------------------------------------------------------- preference pairs, exact


def test_alpaca_pair_exact(tok, tmp_path):
    row = {
        "instruction": "Add the two numbers.",
        "input": "12 + 30",
        "system": "Be exact.",
        "history": [["First?", "A"]],
        "chosen": "42",
        "rejected": "41",
    }
    (ex,), stats = load_pair_examples(config(tmp_path, write(tmp_path, [row])), tok)
    prompt = [
        ("<|im_start|>system\nBe exact.<|im_end|>\n", False),
        ("<|im_start|>user\nFirst?<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n", False),  # history: never trained
        PROMPT,
    ]
    assert isinstance(ex, Example) and ex.desirable is None  # a pair row
    assert (ex.input_ids, ex.labels, ex.doc_lengths) == pair_expected(tok, prompt, "42", "41")
    assert sum(ex.doc_lengths) == len(ex.input_ids) == len(ex.labels)
    assert [trained_spans(tok, *doc) for doc in documents(ex)] == [["42<|im_end|>\n"], ["41<|im_end|>\n"]]
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped) == (1, 1, 0, 0)
    assert stats.tokens == len(ex.input_ids) and stats.trained_tokens == 8  # 4 2 <|im_end|> \n, 4 1 <|im_end|> \n


def test_sharegpt_pair_exact_with_dataset_info_columns_and_tags(tok, tmp_path):
    row = {
        "conv": [
            {"speaker": "sys", "text": "Be exact."},
            {"speaker": "u", "text": "Add the two numbers.\n12 + 30"},
        ],
        "good": {"speaker": "a", "text": "42"},
        "bad": {"speaker": "a", "text": "forty"},
    }
    info = {
        "pairs": {
            "file_name": "p.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "conv", "chosen": "good", "rejected": "bad"},
            "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "u", "assistant_tag": "a",
                     "system_tag": "sys"},
        }
    }
    write(tmp_path, [row], "p.json", info)
    (ex,), _ = load_pair_examples(config(tmp_path, "pairs"), tok)
    prompt = [("<|im_start|>system\nBe exact.<|im_end|>\n", False), PROMPT]
    assert (ex.input_ids, ex.labels, ex.doc_lengths) == pair_expected(tok, prompt, "42", "forty")


def test_messages_pair_exact_auto_detected(tok, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Add the two numbers.\n12 + 30"},
            ],
            "chosen": {"role": "assistant", "content": "42"},
            "rejected": "I cannot.",  # a plain string is the reply's content
        }
    ]
    (ex,), _ = load_pair_examples(config(tmp_path, write(tmp_path, rows, "m.json")), tok)
    prompt = [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n", False), PROMPT]
    assert (ex.input_ids, ex.labels, ex.doc_lengths) == pair_expected(tok, prompt, "42", "I cannot.")
    # stage rm reads the same rows; TRL's one-message lists are replies too
    rows[0]["chosen"] = [rows[0]["chosen"]]
    (rm,), _ = load_pair_examples(config(tmp_path, write(tmp_path, rows, "m.json"), stage="rm"), tok)
    assert rm == ex


# ---------------------------------------------------------------- KTO, exact, KL pairing


def test_kto_sharegpt_exact_and_kl_pairing(tok, tmp_path):
    answers = ["42", "7", "ship ship"]
    rows = [
        {
            "conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": answer}],
            "kto_tag": i != 1,
        }
        for i, answer in enumerate(answers)
    ]
    examples, stats = load_kto_examples(config(tmp_path, write(tmp_path, rows), stage="kto"), tok)
    assert len(examples) == 3 and stats.kept == 3
    for i, ex in enumerate(examples):
        assert isinstance(ex, Example) and ex.desirable is not None  # a KTO row
        prompt = [(f"<|im_start|>user\nQuestion {i}?<|im_end|>\n<|im_start|>assistant\n", False)]
        # the KL document: this prompt with the completion of the next example, wrapping around
        want = pair_expected(tok, prompt, answers[i], answers[(i + 1) % 3])
        assert (ex.input_ids, ex.labels, ex.doc_lengths) == want
        assert ex.desirable == (i != 1)
        target, kl = documents(ex)
        assert trained_spans(tok, *target) == [answers[i] + "<|im_end|>\n"]
        assert trained_spans(tok, *kl) == [answers[(i + 1) % 3] + "<|im_end|>\n"]


def test_kto_alpaca_with_renamed_tag_and_messages(tok, tmp_path):
    rows = [
        {"instruction": "Add the two numbers.", "input": "12 + 30", "output": "42", "label": True},
        {"instruction": "Add the two numbers.", "input": "12 + 30", "output": "43", "label": False},
    ]
    info = {"k": {"file_name": "k.json", "columns": {"kto_tag": "label"}}}
    write(tmp_path, rows, "k.json", info)
    examples, _ = load_kto_examples(config(tmp_path, "k", stage="kto"), tok)
    assert [e.desirable for e in examples] == [True, False]
    first = examples[0]
    assert (first.input_ids, first.labels, first.doc_lengths) == pair_expected(tok, [PROMPT], "42", "43")
    assert (examples[1].input_ids, examples[1].labels) == pair_expected(tok, [PROMPT], "43", "42")[:2]

    msgs = [{"messages": [{"role": "user", "content": "Add the two numbers.\n12 + 30"},
                          {"role": "assistant", "content": "42"}], "kto_tag": False}]
    (one,), _ = load_kto_examples(config(tmp_path, write(tmp_path, msgs, "m.json"), stage="kto"), tok)
    assert one.desirable is False  # a single row is its own KL partner
    assert (one.input_ids, one.labels, one.doc_lengths) == pair_expected(tok, [PROMPT], "42", "42")


# ---------------------------------------------------------------- truncation


def test_truncation_cuts_the_prompt_middle_and_keeps_both_replies(tok, tmp_path):
    question = " ".join(["alpha beta gamma"] * 40)
    row = {"instruction": question, "input": "", "chosen": "cat dog", "rejected": "a much longer wrong answer here"}
    cutoff = 40
    (ex,), stats = load_pair_examples(config(tmp_path, write(tmp_path, [row]), cutoff_len=cutoff), tok)
    assert stats.truncated == 1 and stats.kept == 1
    prompt_ids = ids(tok, f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    replies = [ids(tok, r + "<|im_end|>\n") for r in (row["chosen"], row["rejected"])]
    # the prompt keeps cutoff - longest reply tokens: a quarter from its start, the rest from its end
    keep = cutoff - max(len(r) for r in replies)
    head = keep // 4
    cut_prompt = prompt_ids[:head] + prompt_ids[len(prompt_ids) - (keep - head) :]
    assert ex.doc_lengths == [keep + len(replies[0]), keep + len(replies[1])]
    assert max(ex.doc_lengths) == cutoff and sum(ex.doc_lengths) == len(ex.input_ids)
    texts = (row["chosen"], row["rejected"])
    for (doc_ids, doc_labels), reply, text in zip(documents(ex), replies, texts, strict=True):
        assert doc_ids == cut_prompt + reply
        assert doc_labels == [IGNORE] * keep + reply
        assert trained_spans(tok, doc_ids, doc_labels) == [text + "<|im_end|>\n"]
        assert tok.decode(doc_ids[:keep]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_truncation_of_long_replies_keeps_half_the_prompt(tok, tmp_path):
    long_reply = " ".join(["lion"] * 60)
    row = {"instruction": "Say lion many times.", "input": "", "chosen": long_reply, "rejected": "no"}
    cutoff = 24
    (ex,), stats = load_pair_examples(config(tmp_path, write(tmp_path, [row]), cutoff_len=cutoff), tok)
    prompt_ids = ids(tok, "<|im_start|>user\nSay lion many times.<|im_end|>\n<|im_start|>assistant\n")
    keep = min(len(prompt_ids), cutoff // 2)
    head = keep // 4
    cut_prompt = prompt_ids[:head] + prompt_ids[len(prompt_ids) - (keep - head) :]
    (chosen_ids, chosen_labels), (rejected_ids, _) = documents(ex)
    assert stats.truncated == 1
    assert chosen_ids == cut_prompt + ids(tok, long_reply + "<|im_end|>\n")[: cutoff - keep]  # cut from the right
    assert chosen_labels[keep:] == chosen_ids[keep:] and set(chosen_labels[:keep]) == {IGNORE}
    assert rejected_ids == cut_prompt + ids(tok, "no<|im_end|>\n")  # same prompt, whole reply


def test_kto_kl_document_is_truncated_like_a_reply(tok, tmp_path):
    rows = [
        {"instruction": "Short question?", "input": "", "output": "yes", "kto_tag": True},
        {"instruction": "Other?", "input": "", "output": " ".join(["owl"] * 50), "kto_tag": False},
    ]
    examples, stats = load_kto_examples(config(tmp_path, write(tmp_path, rows), stage="kto", cutoff_len=20), tok)
    assert stats.truncated == 2
    for ex in examples:
        assert all(n <= 20 for n in ex.doc_lengths) and sum(ex.doc_lengths) == len(ex.input_ids)
        prompts = [doc_ids[: len(doc_ids) - sum(y != IGNORE for y in labels)] for doc_ids, labels in documents(ex)]
        assert prompts[0] == prompts[1]  # one prompt, cut once
    target, kl = documents(examples[0])
    assert trained_spans(tok, *target) == ["yes<|im_end|>\n"]
    assert tok.decode([i for i, y in zip(*kl, strict=True) if y != IGNORE]).startswith("owl owl")


# ---------------------------------------------------------------- errors


def test_pair_row_errors_name_file_and_row(tok, tmp_path):
    good = {"instruction": "q", "input": "", "chosen": "a", "rejected": "b"}
    write(tmp_path, [good, {"instruction": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"d\.json row 2: missing field 'rejected' \(preference rows need"):
        load_pair_examples(config(tmp_path, "d.json"), tok)
    examples, stats = load_pair_examples(config(tmp_path, "d.json", skip_bad_rows=True), tok)
    assert len(examples) == 1 and (stats.rows, stats.skipped) == (2, 1)
    assert "row 2: missing field 'rejected'" in stats.skipped_examples[0]

    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    write(tmp_path, [{"conversations": conv, "chosen": {"from": "gpt", "value": "x"}, "rejected": "y"}], "s.json")
    with pytest.raises(DataError, match=r"s\.json row 1: the prompt in 'conversations' must end with a user"):
        load_pair_examples(config(tmp_path, "s.json"), tok)
    write(tmp_path, [{"conversations": conv[:1], "chosen": {"from": "human", "value": "x"}, "rejected": "y"}], "s.json")
    with pytest.raises(DataError, match=r"s\.json row 1: chosen\.from is 'human'; expected 'gpt'"):
        load_pair_examples(config(tmp_path, "s.json"), tok)


def test_kto_row_errors_name_file_and_row(tok, tmp_path):
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    write(tmp_path, [{"conversations": conv, "kto_tag": True}, {"conversations": conv, "kto_tag": "yes"}])
    with pytest.raises(DataError, match=r"d\.json row 2: field 'kto_tag' must be true or false, got 'yes'"):
        load_kto_examples(config(tmp_path, "d.json", stage="kto"), tok)
    write(tmp_path, [{"conversations": conv, "kto_tag": True}, {"conversations": conv}])
    with pytest.raises(DataError, match=r"d\.json row 2: missing field 'kto_tag'"):
        load_kto_examples(config(tmp_path, "d.json", stage="kto"), tok)
    write(tmp_path, [{"conversations": conv[:1], "kto_tag": True}])
    with pytest.raises(DataError, match=r"d\.json row 1: a KTO conversation must end with the assistant's"):
        load_kto_examples(config(tmp_path, "d.json", stage="kto"), tok)


def test_stage_and_dataset_kind_mismatches(tok, tmp_path):
    pairs = [{"instruction": "q", "input": "", "chosen": "a", "rejected": "b"}]
    info = {"pref": {"file_name": "d.json", "ranking": True}}
    write(tmp_path, pairs, "d.json", info)
    with pytest.raises(ConfigError, match=r"stage: kto data is for stage kto, got 'dpo'"):
        load_kto_examples(config(tmp_path, "d.json"), tok)
    with pytest.raises(ConfigError, match=r"stage: preference data is for stage dpo or rm, got 'kto'"):
        load_pair_examples(config(tmp_path, "d.json", stage="kto"), tok)
    with pytest.raises(DataError, match=r"entry 'pref': ranking \(preference\) datasets need stage dpo or rm, not kto"):
        load_kto_examples(config(tmp_path, "pref", stage="kto"), tok)
    kw = dict(dataset_dir=str(tmp_path), tokenizer=tok, template="chatml", stage="sft", cutoff_len=64)
    with pytest.raises(DataError, match=r"d\.json row 1: the rows hold preference data .* use stage dpo or rm"):
        load_examples(["d.json"], **kw)
    with pytest.raises(DataError, match=r"kto_demo\.json row 1: the rows hold kto data .* use stage kto"):
        load_examples(["builtin:kto_demo"], **kw)
    with pytest.raises(ConfigError, match=r"eval_dataset: no dataset given"):
        load_pair_examples(config(tmp_path, "d.json"), tok, split="eval")


# ---------------------------------------------------------------- builtin datasets, eval split, cache


@pytest.mark.parametrize("name, stage", [("dpo_demo", "dpo"), ("kto_demo", "kto")])
def test_builtin_datasets(tok, tmp_path, name, stage):
    load = load_pair_examples if stage == "dpo" else load_kto_examples
    cfg = config(tmp_path, f"builtin:{name}", stage=stage, cutoff_len=256, eval_dataset=f"builtin:{name}",
                 max_samples=200)
    examples, stats = load(cfg, tok)
    assert len(examples) == 200 and (stats.rows, stats.kept, stats.dropped, stats.skipped) == (200, 200, 0, 0)
    for ex in examples:
        assert sum(ex.doc_lengths) == len(ex.input_ids) == len(ex.labels) and len(ex.doc_lengths) == 2
        spans = [trained_spans(tok, *doc) for doc in documents(ex)]
        assert all(len(s) == 1 and s[0].endswith("<|im_end|>\n") for s in spans)
        if stage == "dpo":
            assert spans[0] != spans[1]  # a wrong answer is never the right one
    if stage == "kto":
        assert 70 < sum(e.desirable for e in examples) < 130
    again, cached = load(cfg, tok)
    assert cached.cache_hit and again == examples and cached == stats
    evaluated, _ = load(cfg, tok, split="eval")
    assert evaluated == examples
    full, full_stats = load(config(tmp_path, f"builtin:{name}", stage=stage, cutoff_len=256), tok)
    assert full_stats.rows == 1500 and full[:199] == examples[:199]  # (the 200th KL partner wraps to the 1st)
    if stage == "kto":
        assert sum(e.desirable for e in full) == 750
