"""Every row kind through the llama3 template on a test tokenizer whose llama3 markers are special tokens
(as in the real Llama 3 vocabulary): the ids equal the hand-rendered text tokenized whole, and the trained
tokens are exactly each trained reply tokenized alone plus <|eot_id|>, nothing else."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from longtune.config import load_config
from longtune.data import load_examples
from longtune.data.preference import load_kto_examples, load_pair_examples
from longtune.models.builtin import load_builtin_tokenizer

IGNORE = -100
MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def tok():
    tokenizer = load_builtin_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    tokenizer.bos_token = "<|begin_of_text|>"  # as in the real Llama 3 vocabulary (LLaMA-Factory's llama3 writes bos)
    return tokenizer


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def turn(role: str, content: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"


def render(turns: list[tuple[str, str]]) -> str:
    return "<|begin_of_text|>" + "".join(turn(r, c) for r, c in turns)


def check(tok, input_ids: list[int], labels: list[int], turns: list[tuple[str, str]], trained: list[str]):
    """input_ids/labels of one document against the hand-rendered turns and the replies that must be trained."""
    assert input_ids == ids(tok, render(turns))
    groups = itertools.groupby(zip(input_ids, labels, strict=True), key=lambda p: p[1] != IGNORE)
    spans = [[i for i, _ in g] for is_trained, g in groups if is_trained]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert spans == [ids(tok, reply) + [eot] for reply in trained]
    assert all(lab == i for i, lab in zip(input_ids, labels, strict=True) if lab != IGNORE)


def write(tmp_path: Path, rows: list, name: str = "d.json") -> str:
    (tmp_path / name).write_text(json.dumps(rows, indent=1))
    return name


def sft(tok, tmp_path, rows):
    examples, _ = load_examples([write(tmp_path, rows)], dataset_dir=str(tmp_path), tokenizer=tok,
                                template="llama3", stage="sft", cutoff_len=4096)
    return examples


def config(tmp_path: Path, dataset: str, stage: str):
    values = {"model_name_or_path": "builtin:tiny", "dataset": dataset, "dataset_dir": str(tmp_path),
              "template": "llama3", "stage": stage, "cutoff_len": 4096, "output_dir": str(tmp_path / "run"),
              "data_cache_dir": str(tmp_path / "cache")}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def documents(example) -> list[tuple[list[int], list[int]]]:
    out, start = [], 0
    for n in example.doc_lengths:
        out.append((example.input_ids[start : start + n], example.labels[start : start + n]))
        start += n
    return out


def test_alpaca_with_system_and_history(tok, tmp_path):
    row = {"instruction": "Add the two numbers.", "input": "12 + 30", "output": "42", "system": "Be exact.",
           "history": [["First?", "A"]]}
    (ex,) = sft(tok, tmp_path, [row])
    turns = [("system", "Be exact."), ("user", "First?"), ("assistant", "A"),
             ("user", "Add the two numbers.\n12 + 30"), ("assistant", "42")]
    check(tok, ex.input_ids, ex.labels, turns, ["A", "42"])  # every assistant turn is trained by default


def test_sharegpt_multi_turn(tok, tmp_path):
    row = {"conversations": [{"from": "system", "value": "S."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello there"}, {"from": "human", "value": "Add 2 and 3."},
                             {"from": "gpt", "value": "5"}]}
    (ex,) = sft(tok, tmp_path, [row])
    turns = [("system", "S."), ("user", "Hi"), ("assistant", "Hello there"), ("user", "Add 2 and 3."),
             ("assistant", "5")]
    check(tok, ex.input_ids, ex.labels, turns, ["Hello there", "5"])


def test_messages(tok, tmp_path):
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sea."}]
    (ex,) = sft(tok, tmp_path, [{"messages": msgs}])
    check(tok, ex.input_ids, ex.labels, [("user", "Name a colour."), ("assistant", "Blue, like the sea.")],
          ["Blue, like the sea."])


def test_preference_pair(tok, tmp_path):
    row = {"instruction": "Add the two numbers.", "input": "12 + 30", "system": "Be exact.",
           "chosen": "42", "rejected": "forty-one"}
    (ex,), _ = load_pair_examples(config(tmp_path, write(tmp_path, [row]), "dpo"), tok)
    prompt = [("system", "Be exact."), ("user", "Add the two numbers.\n12 + 30")]
    (a_ids, a_labels), (b_ids, b_labels) = documents(ex)
    check(tok, a_ids, a_labels, prompt + [("assistant", "42")], ["42"])
    check(tok, b_ids, b_labels, prompt + [("assistant", "forty-one")], ["forty-one"])


def test_kto_rows_and_their_kl_documents(tok, tmp_path):
    answers = ["42", "seven"]
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}],
             "kto_tag": i == 0} for i, a in enumerate(answers)]
    examples, _ = load_kto_examples(config(tmp_path, write(tmp_path, rows), "kto"), tok)
    assert [e.desirable for e in examples] == [True, False]
    for i, ex in enumerate(examples):
        (t_ids, t_labels), (kl_ids, kl_labels) = documents(ex)
        prompt = [("user", f"Question {i}?")]
        check(tok, t_ids, t_labels, prompt + [("assistant", answers[i])], [answers[i]])
        other = answers[(i + 1) % 2]  # the KL document: this prompt with the next row's completion
        check(tok, kl_ids, kl_labels, prompt + [("assistant", other)], [other])
