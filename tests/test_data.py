"""Data loading and encoding: exact ids and label masks against hand-rendered text, truncation, every error path."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from longtune.data import DataStats, load_examples
from longtune.data.loading import load_dataset
from longtune.data.templates import TEMPLATES, resolve_chat_template
from longtune.errors import ConfigError, DataError
from longtune.models.builtin import load_builtin_tokenizer

IGNORE = -100


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


def write_rows(path: Path, rows: list) -> str:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=1))
    return str(path)


def load(tok, tmp_path, rows, *, name="d.json", template="chatml", stage="sft", cutoff_len=4096, **kw):
    write_rows(tmp_path / name, rows)
    return load_examples(
        [name], dataset_dir=str(tmp_path), tokenizer=tok, template=template, stage=stage, cutoff_len=cutoff_len, **kw
    )


def trained_spans(tok, example) -> list[str]:
    groups = itertools.groupby(zip(example.input_ids, example.labels, strict=True), key=lambda p: p[1] != IGNORE)
    return [tok.decode([i for i, _ in g]) for trained, g in groups if trained]


# ---------------------------------------------------------------- exact ids and labels


def test_alpaca_chatml_exact(tok, tmp_path):
    row = {"instruction": "Add the two numbers.", "input": "12 + 30", "output": "42", "system": "Be exact."}
    (ex,), stats = load(tok, tmp_path, [row])
    want = expected(
        tok,
        [
            ("<|im_start|>system\nBe exact.<|im_end|>\n", False),
            ("<|im_start|>user\nAdd the two numbers.\n12 + 30<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            ("42<|im_end|>\n", True),
        ],
    )
    assert (ex.input_ids, ex.labels) == want
    assert stats == DataStats(
        rows=1, kept=1, truncated=0, dropped=0, tokens=len(want[0]), trained_tokens=4
    )  # 4, 2, <|im_end|>, \n


def test_alpaca_history_all_assistant_turns_trained(tok, tmp_path):
    row = {"instruction": "And now?", "input": "", "output": "B", "history": [["First?", "A"]]}
    (ex,), _ = load(tok, tmp_path, [row])
    want = expected(
        tok,
        [
            ("<|im_start|>user\nFirst?<|im_end|>\n<|im_start|>assistant\n", False),
            ("A<|im_end|>\n", True),
            ("<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n", False),
            ("B<|im_end|>\n", True),
        ],
    )
    assert (ex.input_ids, ex.labels) == want


def test_sharegpt_multi_turn_chatml_exact(tok, tmp_path):
    conv = [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "Uppercase the word.\nfire"},
        {"from": "gpt", "value": "FIRE"},
        {"from": "human", "value": "Repeat the word 3 times.\nship"},
        {"from": "gpt", "value": "ship ship ship"},
    ]
    (ex,), _ = load(tok, tmp_path, [{"conversations": conv}])
    want = expected(
        tok,
        [
            ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False),
            ("<|im_start|>user\nUppercase the word.\nfire<|im_end|>\n<|im_start|>assistant\n", False),
            ("FIRE<|im_end|>\n", True),
            ("<|im_start|>user\nRepeat the word 3 times.\nship<|im_end|>\n<|im_start|>assistant\n", False),
            ("ship ship ship<|im_end|>\n", True),
        ],
    )
    assert (ex.input_ids, ex.labels) == want
    assert trained_spans(tok, ex) == ["FIRE<|im_end|>\n", "ship ship ship<|im_end|>\n"]


def test_messages_chatml_exact_and_tool_role(tok, tmp_path):
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": '{"name": "weather"}'},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    (ex,), _ = load(tok, tmp_path, [{"messages": msgs}], name="m.jsonl")
    want = expected(
        tok,
        [
            ("<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n", False),
            ('{"name": "weather"}<|im_end|>\n', True),
            ("<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n", False),
            ("It is sunny.<|im_end|>\n", True),
        ],
    )
    assert (ex.input_ids, ex.labels) == want


def test_llama3_template_on_builtin_tokenizer(tok, tmp_path):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
    ]
    (ex,), _ = load(tok, tmp_path, [{"messages": msgs}], template="llama3")
    # LLaMA-Factory's llama3: bos (none in this vocab), then each slot tokenized alone, so the spans are exact
    # even though the markup is plain text here.
    want = expected(
        tok,
        [
            ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>", False),
            ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
            ("Hello there<|eot_id|>", True),
            ("<|start_header_id|>user<|end_header_id|>\n\nAdd 2 and 3.<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
            ("5<|eot_id|>", True),
        ],
    )
    assert (ex.input_ids, ex.labels) == want


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_named_template_trains_exactly_the_assistant_text(tok, tmp_path, template):
    msgs = [
        {"role": "system", "content": "S."},
        {"role": "user", "content": "Q one"},
        {"role": "assistant", "content": "A one"},
    ]
    (ex,), _ = load(tok, tmp_path, [{"messages": msgs}], template=template)
    spans = trained_spans(tok, ex)
    assert len(spans) == 1 and "A one" in spans[0]
    assert "Q one" not in spans[0]
    assert [i for i, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE] == [
        lab for lab in ex.labels if lab != IGNORE
    ]


def test_train_on_prompt_trains_everything(tok, tmp_path):
    (ex,), stats = load(tok, tmp_path, [{"instruction": "Q", "output": "A"}], train_on_prompt=True)
    assert ex.labels == ex.input_ids
    assert ex.input_ids == ids(tok, "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n")
    assert stats.trained_tokens == stats.tokens == len(ex.input_ids)


def test_auto_template_uses_tokenizer_chatml(tok, tmp_path):
    rows = [{"instruction": "Q", "output": "A"}]
    auto, _ = load(tok, tmp_path, rows, template="auto")
    chatml, _ = load(tok, tmp_path, rows, template="chatml")
    assert auto == chatml


# ---------------------------------------------------------------- pretraining


def test_pt_text_appends_eos_all_trained(tok, tmp_path):
    (ex,), stats = load(tok, tmp_path, [{"text": "one two three"}], name="p.jsonl", stage="pt")
    assert ex.input_ids == ids(tok, "one two three") + [tok.eos_token_id]
    assert ex.labels == ex.input_ids
    assert stats.truncated == 0


def test_pt_long_text_split_into_pieces_without_loss(tok, tmp_path):
    text = " ".join(f"word{i}" for i in range(60))
    examples, stats = load(
        tok, tmp_path, [{"text": text}, {"text": "short"}], name="p.jsonl", stage="pt", cutoff_len=16
    )
    full = ids(tok, text) + [tok.eos_token_id]
    n_pieces = -(-len(full) // 16)
    assert [len(e.input_ids) for e in examples[:n_pieces]] == [16] * (n_pieces - 1) + [len(full) - 16 * (n_pieces - 1)]
    assert sum((e.input_ids for e in examples[:n_pieces]), []) == full
    assert examples[-1].input_ids == ids(tok, "short") + [tok.eos_token_id]
    assert (stats.rows, stats.kept, stats.truncated, stats.tokens) == (2, 2, 1, len(full) + len(examples[-1].input_ids))


def test_pt_renders_conversations_all_trained(tok, tmp_path):
    (ex,), _ = load(tok, tmp_path, [{"instruction": "Q", "output": "A"}], stage="pt")
    assert ex.input_ids == ids(tok, "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n")
    assert ex.labels == ex.input_ids


def test_sft_rejects_text_rows(tok, tmp_path):
    with pytest.raises(DataError, match=r"p\.jsonl row 1: plain-text rows are for pretraining; set stage: pt"):
        load(tok, tmp_path, [{"text": "x"}], name="p.jsonl")


# ---------------------------------------------------------------- truncation


def test_truncation_keeps_response_and_question(tok):
    examples, stats = load_examples(
        ["builtin:kv_retrieval"],
        dataset_dir="unused",
        tokenizer=tok,
        template="chatml",
        stage="sft",
        cutoff_len=200,
        max_samples=3,
    )
    rows = load_dataset("builtin:kv_retrieval", dataset_dir="unused", max_samples=3)
    assert stats.truncated == 3 and stats.kept == 3 and stats.dropped == 0
    for ex, row in zip(examples, rows, strict=True):
        value = row.item.turns[-1].content
        question = row.item.turns[0].content.rsplit("\n", 1)[1]
        assert len(ex.input_ids) == len(ex.labels) == 200
        assert trained_spans(tok, ex) == [value + "<|im_end|>\n"]
        tail = ids(tok, "\n" + question + "<|im_end|>\n<|im_start|>assistant\n" + value + "<|im_end|>\n")[1:]
        assert ex.input_ids[-len(tail) :] == tail  # the question and the whole response survive
        assert tok.decode(ex.input_ids).startswith("<|im_start|>user\nBelow is a list")  # and the prompt head


def test_truncation_of_long_response_keeps_context(tok, tmp_path):
    row = {"instruction": "Count.", "output": " ".join(str(i) for i in range(50))}
    prompt = ids(tok, "<|im_start|>user\nCount.<|im_end|>\n<|im_start|>assistant\n")
    response = ids(tok, row["output"] + "<|im_end|>\n")
    assert len(prompt) == 10
    # cutoff 24: the prompt fits in cutoff_len // 2 and is kept whole; the response is cut from the right.
    (ex,), stats = load(tok, tmp_path, [row], cutoff_len=24)
    assert ex.input_ids == prompt + response[:14]
    assert ex.labels == [IGNORE] * 10 + response[:14]
    assert stats.truncated == 1
    # cutoff 16: the prompt keeps 8 tokens, its first 8 // 4 = 2 and its last 6 (the middle goes).
    (ex,), _ = load(tok, tmp_path, [row], cutoff_len=16)
    assert ex.input_ids == prompt[:2] + prompt[-6:] + response[:8]
    assert ex.labels == [IGNORE] * 8 + response[:8]


def test_row_without_trained_token_is_dropped(tok, tmp_path):
    rows = [{"instruction": "Q", "output": "A"}, {"instruction": "Q", "output": ""}]
    # cutoff 2 keeps one prompt token and one response token: position 0 is never a target, position 1 is.
    examples, stats = load(tok, tmp_path, rows, cutoff_len=2)
    assert len(examples) == 2 and stats.dropped == 0
    assert all(e.labels[0] == IGNORE and e.labels[1] != IGNORE for e in examples)


def test_row_whose_template_renders_no_reply_is_dropped(tok, tmp_path):
    tok2 = load_builtin_tokenizer()
    tok2.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    examples, stats = load(tok2, tmp_path, [{"instruction": "q", "output": "a"}], template="auto")
    assert examples == [] and (stats.rows, stats.kept, stats.dropped, stats.tokens) == (1, 0, 1, 0)


# ---------------------------------------------------------------- loading: names, registry, order


def test_order_and_max_samples(tok, tmp_path):
    write_rows(tmp_path / "a.json", [{"instruction": f"a{i}", "output": "x"} for i in range(5)])
    write_rows(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "y"} for i in range(5)])
    examples, stats = load_examples(
        ["a.json", "b.jsonl"],
        dataset_dir=str(tmp_path),
        tokenizer=tok,
        template="chatml",
        stage="sft",
        cutoff_len=64,
        max_samples=2,
    )
    prompts = [tok.decode(e.input_ids).split("\n")[1].split("<")[0] for e in examples]
    assert prompts == ["a0", "a1", "b0", "b1"] and stats.rows == 4


def test_dataset_info_sharegpt_tags_and_text_columns(tok, tmp_path):
    write_rows(
        tmp_path / "chat.json",
        [{"dialog": [{"speaker": "me", "says": "Hi"}, {"speaker": "bot", "says": "Yo"}], "sys": "S"}],
    )
    write_rows(tmp_path / "corpus.jsonl", [{"body": "plain words"}])
    info = {
        "my_chat": {
            "file_name": "chat.json",
            "formatting": "sharegpt",
            "columns": {"messages": "dialog", "system": "sys"},
            "tags": {"role_tag": "speaker", "content_tag": "says", "user_tag": "me", "assistant_tag": "bot"},
            "num_samples": 3,
        },
        "my_text": {"file_name": "corpus.jsonl", "columns": {"prompt": "body"}},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    examples, stats = load_examples(
        ["my_chat"], dataset_dir=str(tmp_path), tokenizer=tok, template="chatml", stage="sft", cutoff_len=64
    )
    want = expected(
        tok,
        [
            ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
            ("Yo<|im_end|>\n", True),
        ],
    )
    assert [(e.input_ids, e.labels) for e in examples] == [want] * 3  # num_samples 3 cycles the single row
    (text,), _ = load_examples(
        ["my_text"], dataset_dir=str(tmp_path), tokenizer=tok, template="auto", stage="pt", cutoff_len=64
    )
    assert text.input_ids == ids(tok, "plain words") + [tok.eos_token_id]


# ---------------------------------------------------------------- error paths


def load_err(tok, tmp_path, rows, name="bad.json", **kw):
    return load(tok, tmp_path, rows, name=name, **kw)


@pytest.mark.parametrize(
    "rows, pattern",
    [
        (
            [{"instruction": "q", "output": "a"}] * 16 + [{"instruction": "q"}],
            r"bad\.json row 17: missing field 'output' \(alpaca rows need 'instruction' and 'output'\)",
        ),
        ([{"instruction": "q", "output": 5}], r"bad\.json row 1: field 'output' must be a string, got int"),
        ([{"instruction": "q", "output": "a", "history": [["x"]]}], r"row 1: field 'history'\[0\] must be a \[query"),
        (
            [{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}],
            r"bad\.json row 1: conversations\[1\]\.from is 'bot'; expected one of human, gpt",
        ),
        (
            [
                {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                {"conversations": [{"from": "human", "value": "q"}]},
            ],
            r"bad\.json row 2: a conversation must end with an assistant turn \(its last turn is user\)",
        ),
        ([{"conversations": []}], r"bad\.json row 1: field 'conversations' must be a non-empty list"),
        ([{"messages": [{"role": "user"}]}], r"bad\.json row 1: messages\[0\] is missing field 'content'"),
        (
            [{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}],
            r"row 1: messages\[1\] is a system message; only the first message may be one",
        ),
        ([{"prompt": "q"}], r"bad\.json row 1: cannot tell the format from its keys \('prompt'\)"),
        ([{"instruction": "q", "output": "a"}, ["not", "a", "row"]], r"bad\.json row 2: expected a JSON object"),
        ([], r"dataset 'bad\.json': no rows"),
    ],
)
def test_row_errors(tok, tmp_path, rows, pattern):
    with pytest.raises(DataError, match=pattern):
        load_err(tok, tmp_path, rows)


def test_bad_json_names_file_and_line(tok, tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    with pytest.raises(DataError, match=r"x\.jsonl line 3: invalid JSON"):
        load_examples(["x.jsonl"], dataset_dir=str(tmp_path), tokenizer=tok, template="auto", stage="pt", cutoff_len=8)
    (tmp_path / "y.json").write_text('[\n{"text": "a"},\n{"text" "b"}\n]')
    with pytest.raises(DataError, match=r"y\.json line 3: invalid JSON"):
        load_examples(["y.json"], dataset_dir=str(tmp_path), tokenizer=tok, template="auto", stage="pt", cutoff_len=8)


def test_missing_file_names_path(tok, tmp_path):
    with pytest.raises(DataError, match=r"dataset 'nope\.json': file not found \(looked for .*nope\.json"):
        load_examples(
            ["nope.json"], dataset_dir=str(tmp_path), tokenizer=tok, template="auto", stage="pt", cutoff_len=8
        )


def test_unknown_names(tok, tmp_path):
    kw = dict(dataset_dir=str(tmp_path), tokenizer=tok, template="auto", stage="sft", cutoff_len=8)
    with pytest.raises(
        ConfigError, match=r"dataset: unknown builtin dataset 'builtin:nope'; known: builtin:sft_demo, "
    ):
        load_examples(["builtin:nope"], **kw)
    with pytest.raises(
        ConfigError, match=r"dataset: 'alpaca_en' is not builtin:NAME.*dataset_info\.json does not exist"
    ):
        load_examples(["alpaca_en"], **kw)
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"b": {"file_name": "b.json"}, "a": {"file_name": "gone.json"}})
    )
    with pytest.raises(ConfigError, match=r"dataset: 'alpaca_en' is not in .*dataset_info\.json; known: a, b"):
        load_examples(["alpaca_en"], **kw)
    with pytest.raises(DataError, match=r"dataset_info\.json entry 'a': file not found: .*gone\.json"):
        load_examples(["a"], **kw)


def test_dataset_info_entry_errors(tok, tmp_path):
    write_rows(tmp_path / "d.json", [{"instruction": "q", "output": "a"}])
    info = {
        "hub": {"hf_hub_url": "org/data"},
        "pref": {"file_name": "d.json", "ranking": True},
        "badcol": {"file_name": "d.json", "columns": {"chosen": "c", "prompt": "instruction", "response": "output"}},
        "badtag": {"file_name": "d.json", "formatting": "sharegpt", "tags": {"speaker": "x"}},
        "badfmt": {"file_name": "d.json", "formatting": "csv"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    kw = dict(dataset_dir=str(tmp_path), tokenizer=tok, template="chatml", stage="sft", cutoff_len=8)
    for name, pattern in [
        ("hub", r"entry 'hub': 'hf_hub_url' is not supported"),
        ("pref", r"entry 'pref': ranking \(preference\) datasets"),
        ("badcol", r"dataset 'badcol': column 'chosen' is not supported for alpaca rows"),
        ("badtag", r"dataset 'badtag': tag 'speaker' is not supported for sharegpt rows"),
        ("badfmt", r"dataset 'badfmt': unknown formatting 'csv'"),
    ]:
        with pytest.raises(DataError, match=pattern):
            load_examples([name], **kw)
    (tmp_path / "dataset_info.json").write_text('{"a": {\n"file_name": }')
    with pytest.raises(DataError, match=r"dataset_info\.json line 2: invalid JSON"):
        load_examples(["a"], **kw)


def test_template_errors(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"template: unknown template 'vicuna'; expected one of auto, chatml"):
        resolve_chat_template("vicuna", tok)
    no_template = load_builtin_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ConfigError, match=r"template: 'auto' needs a tokenizer with a chat_template.*template: chatml"):
        load(no_template, tmp_path, [{"instruction": "q", "output": "a"}], template="auto")
    # pt on plain text needs no template at all
    load(no_template, tmp_path, [{"text": "q"}], name="t.jsonl", template="auto", stage="pt")


def test_non_incremental_template_is_rejected(tok, tmp_path):
    # Renders how many messages there are at the top: adding a turn changes earlier text.
    counting = tok.chat_template.replace("{%- for", "{{- messages | length }}{%- for", 1)
    assert counting != tok.chat_template
    tok2 = load_builtin_tokenizer()
    tok2.chat_template = counting
    with pytest.raises(
        ConfigError, match=r"template: the chat template does not render .*bad\.json row 1 incrementally"
    ):
        load_err(tok2, tmp_path, [{"instruction": "q", "output": "a"}], template="auto")


def test_template_exception_becomes_data_error(tok, tmp_path):
    tok2 = load_builtin_tokenizer()
    tok2.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"bad\.json row 1: the chat template refused this conversation: roles must"):
        load_err(tok2, tmp_path, [{"instruction": "q", "output": "a"}], template="auto")


def test_config_value_errors(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"stage: load_examples handles sft, pt, got 'dpo'"):
        load(tok, tmp_path, [{"instruction": "q", "output": "a"}], stage="dpo")
    with pytest.raises(ConfigError, match=r"cutoff_len: expected an integer >= 2, got 0"):
        load(tok, tmp_path, [{"instruction": "q", "output": "a"}], cutoff_len=0)
