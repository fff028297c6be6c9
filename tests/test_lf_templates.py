"""Named templates are token-identical with LLaMA-Factory 0.9.5: for every template and every fixture row (made by
LLaMA-Factory's own converters, template and processors, scripts/make_lf_fixtures.py), our ids and labels equal
its ids and labels exactly; plus the deliberate differences (docs/templates.md) and the template keys."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from longtune.config import load_config
from longtune.data import load_examples
from longtune.data.pipeline import load_all
from longtune.data.preference import pair_inputs
from longtune.data.templates import (
    TEMPLATES,
    TemplateOptions,
    named_template,
    render_generation_prompt,
    stop_token_ids,
)
from longtune.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "lf_tokenizer"
IGNORE = -100


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / "lf_templates" / f"{name}.json").read_text(encoding="utf-8"))


def tokenizer_for(name: str):
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), **fixture(name)["tokenizer"])


def write_rows(tmp_path: Path, rows: list[dict]) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return str(path)


def pair_config(tmp_path: Path, dataset: str, template: str, stage: str, options: dict):
    values = {"model_name_or_path": "builtin:tiny", "dataset": dataset, "dataset_dir": str(tmp_path),
              "template": template, "stage": stage, "cutoff_len": 100000, "output_dir": str(tmp_path / "run"),
              "data_cache_dir": str(tmp_path / "cache"), **options}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def ours(tmp_path: Path, name: str, case: dict, tok, today: str) -> list[dict]:
    """Our ids and labels of a fixture case, in LLaMA-Factory's output shape."""
    dataset = write_rows(tmp_path, case["rows"])
    options = dict(case["options"])
    if case["stage"] == "pt":
        examples, _ = load_examples([dataset], dataset_dir=str(tmp_path), tokenizer=tok, template=name, stage="pt",
                                    cutoff_len=100000, cache_dir=str(tmp_path / "cache"))
        assert all(ex.labels == ex.input_ids for ex in examples)  # pt trains every token, as LF's collator
        return [{"input_ids": ex.input_ids} for ex in examples]
    if case["stage"] == "sft":
        train_on_prompt = options.pop("train_on_prompt", False)
        examples, _ = load_examples(
            [dataset], dataset_dir=str(tmp_path), tokenizer=tok, template=name, stage="sft", cutoff_len=100000,
            train_on_prompt=train_on_prompt, template_options=TemplateOptions(today=today, **options),
            cache_dir=str(tmp_path / "cache"),
        )
        return [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples]
    cfg = pair_config(tmp_path, dataset, name, case["stage"], options)
    names, settings, mix = pair_inputs(cfg, tok, "train", "pairs" if case["stage"] == "dpo" else "kto")
    # the keys come from the config; the date a llama3 tool prompt states is pinned to the fixture's
    settings = replace(settings, template_options=replace(settings.template_options, today=today))
    examples, _ = load_all(names, settings, mix, tok, cache_dir=str(tmp_path / "cache"), overwrite_cache=True)
    out = []
    for ex in examples:
        a = ex.doc_lengths[0]
        first, second = (ex.input_ids[:a], ex.labels[:a]), (ex.input_ids[a:], ex.labels[a:])
        if case["stage"] == "dpo":
            out.append({"chosen_input_ids": first[0], "chosen_labels": first[1],
                        "rejected_input_ids": second[0], "rejected_labels": second[1]})
        else:
            out.append({"input_ids": first[0], "labels": first[1], "kl_input_ids": second[0],
                        "kl_labels": second[1], "kto_tags": ex.desirable})
    return out


def with_real_end_of_reply_labels(row: dict, tok) -> dict:
    """LF's labels with the one deliberate difference on rows that fit: with an efficient-eos template (glm4) LF
    labels the first token of each later prompt with eos; we label it with the token that is there (the turn
    marker that ends the reply). Everything else is compared unchanged."""
    out = dict(row)
    for ids_key, labels_key in (("input_ids", "labels"), ("kl_input_ids", "kl_labels"),
                                ("chosen_input_ids", "chosen_labels"), ("rejected_input_ids", "rejected_labels")):
        if labels_key in row:
            out[labels_key] = [t if lab == tok.eos_token_id and t != lab else lab
                               for t, lab in zip(row[ids_key], row[labels_key], strict=True)]
    return out


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_ids_and_labels_equal_llamafactory(tmp_path, name):
    data = fixture(name)
    tok = tokenizer_for(name)
    assert data["cases"], name
    for i, case in enumerate(data["cases"]):
        got = ours(tmp_path / f"case{i}", name, case, tok, data["today"])
        expected = [with_real_end_of_reply_labels(row, tok) for row in case["expected"]]
        for row, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
            for key in theirs:
                assert mine[key] == theirs[key], (
                    f"{name} / {case['id']} row {row}: {key} differs\n"
                    f"ours:  {tok.decode([t for t in mine[key] if t != IGNORE]) if key != 'kto_tags' else mine[key]!r}\n"
                    f"LF's:  {tok.decode([t for t in theirs[key] if t != IGNORE]) if key != 'kto_tags' else theirs[key]!r}"
                )


def test_glm4_difference_is_only_the_end_of_reply_label():
    tok = tokenizer_for("glm4")
    case = next(c for c in fixture("glm4")["cases"] if c["id"] == "multi")
    lf = case["expected"][0]
    changed = [i for i, (t, lab) in enumerate(zip(lf["input_ids"], lf["labels"], strict=True))
               if lab == tok.eos_token_id and t != lab]
    assert len(changed) == 2  # two later turns, each opening with <|user|> after a trained reply
    assert {lf["input_ids"][i] for i in changed} == {tok.convert_tokens_to_ids("<|user|>")}
    assert lf["labels"][-1] == lf["input_ids"][-1] == tok.eos_token_id  # the closing eos: identical


def test_fixtures_cover_every_template_and_the_row_kinds():
    for name in TEMPLATES:
        ids = {case["id"] for case in fixture(name)["cases"]}
        assert {"single", "system", "multi", "multi_mask_history", "tools", "dpo", "kto", "pt"} <= ids, name
        if TEMPLATES[name].reasoning:
            assert {"think_given_off", "think_missing_off", "think_multi_mask_history", "dpo_think_off"} <= ids


def test_qwen_default_system_and_thinking_markup():
    tok = tokenizer_for("qwen3")
    prompt = render_generation_prompt("qwen", tok, [{"role": "user", "content": "Hi"}])
    assert tok.decode(prompt) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    off = render_generation_prompt("qwen3", tok, [{"role": "user", "content": "Hi"}],
                                   options=TemplateOptions(enable_thinking=False))
    on = render_generation_prompt("qwen3", tok, [{"role": "user", "content": "Hi"}])
    assert tok.decode(on) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(off) == tok.decode(on) + "<think>\n\n</think>\n\n"
    # an explicit system message wins over the default
    own = render_generation_prompt("qwen", tok, [{"role": "system", "content": "S."}, {"role": "user", "content": "Hi"}])
    assert tok.decode(own).startswith("<|im_start|>system\nS.<|im_end|>\n")


def test_generation_prompt_is_the_training_prompt(tmp_path):
    """The prompt a chat/predict run generates from is the prompt tokens an sft row trains behind."""
    tok = tokenizer_for("llama3")
    data = fixture("llama3")
    case = next(c for c in data["cases"] if c["id"] == "tools")
    expected = case["expected"][0]
    messages = [{"role": {"human": "user", "gpt": "assistant", "function_call": "function",
                          "observation": "tool"}[t["from"]], "content": t["value"]}
                for t in case["rows"][0]["conversations"][:-1]]
    prompt = render_generation_prompt("llama3", tok, messages, tools=json.loads(case["rows"][0]["tools"]),
                                      options=TemplateOptions(today=data["today"]))
    last_reply = len(expected["labels"]) - next(i for i, lab in enumerate(reversed(expected["labels"]))
                                                if lab == IGNORE)
    assert prompt == expected["input_ids"][:last_reply]
    assert "ipython" in tok.decode(prompt)


def test_stop_tokens_and_replaced_eos():
    tok = tokenizer_for("llama3")
    ids = stop_token_ids("llama3", tok)
    assert stop_token_ids(named_template("llama3"), tok) == ids
    assert ids == sorted(tok.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>"]))


def test_truncation_keeps_the_assistant_header(tmp_path):
    """Deliberate difference: LF cuts an over-long prompt from the right (losing the assistant header); we keep
    the prompt's start and end, so the reply still follows its header."""
    tok = tokenizer_for("qwen")
    long_question = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
    rows = [{"conversations": [{"from": "human", "value": long_question}, {"from": "gpt", "value": "Yes."}]}]
    (full,), _ = load_examples([write_rows(tmp_path, rows)], dataset_dir=str(tmp_path), tokenizer=tok,
                               template="qwen", stage="sft", cutoff_len=100000, cache_dir=str(tmp_path / "c"))
    (cut,), stats = load_examples([write_rows(tmp_path, rows)], dataset_dir=str(tmp_path), tokenizer=tok,
                                  template="qwen", stage="sft", cutoff_len=64, cache_dir=str(tmp_path / "c"))
    assert stats.truncated == 1 and len(cut.input_ids) == 64
    reply = [t for t in full.labels if t != IGNORE]
    header = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert cut.input_ids[-len(reply) - len(header):] == header + reply
    assert [t for t in cut.labels if t != IGNORE] == reply
    assert cut.input_ids[:4] == full.input_ids[:4]  # the system turn's start survives too


def test_template_keys_are_validated_with_the_config(tmp_path):
    with pytest.raises(ConfigError, match=r"template: unknown template 'qwen4'; expected one of auto, chatml, .*qwen3_nothink"):
        pair_config(tmp_path, "x.json", "qwen4", "dpo", {})
    with pytest.raises(ConfigError, match=r"tool_format: unknown tool format 'hermes'; expected one of default"):
        pair_config(tmp_path, "x.json", "qwen", "dpo", {"tool_format": "hermes"})


def test_efficient_eos_template_refuses_train_on_prompt(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    with pytest.raises(ConfigError, match=r"train_on_prompt: template 'glm4' ends turns without an eos token"):
        load_examples([write_rows(tmp_path, rows)], dataset_dir=str(tmp_path), tokenizer=tokenizer_for("glm4"),
                      template="glm4", stage="sft", cutoff_len=100, train_on_prompt=True)


def test_bad_tool_rows_name_the_row(tmp_path):
    tok = tokenizer_for("qwen")
    bad_call = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "not json"},
                                   {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "ok"}]}]
    with pytest.raises(DataError, match=r"rows\.json row 1: a function_call turn must be JSON with 'name'"):
        load_examples([write_rows(tmp_path, bad_call)], dataset_dir=str(tmp_path), tokenizer=tok, template="qwen",
                      stage="sft", cutoff_len=1000)
    bad_tools = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "ok"}],
                  "tools": "{not json"}]
    with pytest.raises(DataError, match=r"rows\.json row 1: field 'tools' must be a JSON list of tools"):
        load_examples([write_rows(tmp_path, bad_tools)], dataset_dir=str(tmp_path), tokenizer=tok, template="qwen",
                      stage="sft", cutoff_len=1000)


def test_openai_messages_with_tool_calls_equal_the_sharegpt_row(tmp_path):
    """An OpenAI `messages` row (tool_calls, one `tool` message per result, tools as a list) encodes like the
    LLaMA-Factory sharegpt row with function_call and observation turns."""
    tok = tokenizer_for("qwen")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    openai = [{"messages": [
        {"role": "user", "content": "Go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
            {"type": "function", "function": {"name": "f", "arguments": {"x": 2}}}]},
        {"role": "tool", "content": "one"}, {"role": "tool", "content": "two"},
        {"role": "assistant", "content": "Done."}], "tools": tools}]
    sharegpt = [{"conversations": [
        {"from": "human", "value": "Go"},
        {"from": "function_call", "value": json.dumps([{"name": "f", "arguments": {"x": 1}},
                                                       {"name": "f", "arguments": {"x": 2}}])},
        {"from": "observation", "value": "one\n</tool_response>\n<tool_response>\ntwo"},
        {"from": "gpt", "value": "Done."}], "tools": json.dumps(tools)}]
    loaded = []
    for i, rows in enumerate((openai, sharegpt)):
        d = tmp_path / str(i)
        d.mkdir()
        (ex,), _ = load_examples([write_rows(d, rows)], dataset_dir=str(d), tokenizer=tok, template="qwen",
                                 stage="sft", cutoff_len=10000, cache_dir=str(d / "c"))
        loaded.append(ex)
    assert loaded[0].input_ids == loaded[1].input_ids and loaded[0].labels == loaded[1].labels
    assert "<tool_response>\none\n</tool_response>\n<tool_response>\ntwo" in tok.decode(loaded[0].input_ids)


def test_auto_generation_prompt_is_the_tokenizers_own_render():
    from longtune.models.builtin import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    messages = [{"role": "system", "content": "S."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render_generation_prompt("auto", tok, messages) == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(render_generation_prompt("auto", tok, messages)).endswith("<|im_start|>assistant\n")


def test_mask_history_with_truncation_keeps_and_trains_only_the_last_turn(tmp_path):
    """mask_history trains the last reply only; when the row is cut, the history loses its middle and the last
    turn survives (LF also gives the last turn priority)."""
    tok = tokenizer_for("qwen")
    history = []
    for i in range(6):
        history += [{"from": "human", "value": f"Question {i}: the quick brown fox jumps over the lazy dog?"},
                    {"from": "gpt", "value": f"Answer {i}: the sea is wide, the sea is deep."}]
    rows = [{"conversations": history + [{"from": "human", "value": "Last?"}, {"from": "gpt", "value": "Done."}]}]
    kwargs = dict(dataset_dir=str(tmp_path), tokenizer=tok, template="qwen", stage="sft",
                  template_options=TemplateOptions(mask_history=True), cache_dir=str(tmp_path / "c"))
    (full,), _ = load_examples([write_rows(tmp_path, rows)], cutoff_len=100000, **kwargs)
    (cut,), stats = load_examples([write_rows(tmp_path, rows)], cutoff_len=80, **kwargs)
    last = tok("Done.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert [t for t in full.labels if t != IGNORE] == last  # only the last reply is trained
    assert stats.truncated == 1 and len(cut.input_ids) == 80
    assert [t for t in cut.labels if t != IGNORE] == last and cut.input_ids[-len(last):] == last
    assert tok.decode(cut.input_ids).endswith("<|im_start|>user\nLast?<|im_end|>\n<|im_start|>assistant\nDone.<|im_end|>\n")


def test_auto_template_honours_mask_history_and_default_system(tmp_path):
    from longtune.models.builtin import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                               {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ciao"}]}]
    kwargs = dict(dataset_dir=str(tmp_path), tokenizer=tok, template="auto", stage="sft", cutoff_len=1000,
                  cache_dir=str(tmp_path / "c"))
    (plain,), _ = load_examples([write_rows(tmp_path, rows)], **kwargs)
    (masked,), _ = load_examples([write_rows(tmp_path, rows)], template_options=TemplateOptions(mask_history=True),
                                 **kwargs)
    (system,), _ = load_examples([write_rows(tmp_path, rows)],
                                 template_options=TemplateOptions(default_system="Be kind."), **kwargs)
    assert masked.input_ids == plain.input_ids
    assert tok.decode([t for t in masked.labels if t != IGNORE]) == "Ciao<|im_end|>\n"
    assert tok.decode([t for t in plain.labels if t != IGNORE]) == "Hello<|im_end|>\nCiao<|im_end|>\n"
    assert tok.decode(system.input_ids).startswith("<|im_start|>system\nBe kind.<|im_end|>\n")


def test_streaming_gives_the_in_memory_examples_for_a_named_template(tmp_path):
    from longtune.data.streaming import stream_examples

    data = fixture("qwen3")
    rows = [row for case in data["cases"] if case["stage"] == "sft" and not case["options"] for row in case["rows"]]
    tok = tokenizer_for("qwen3")
    kwargs = dict(dataset_dir=str(tmp_path), tokenizer=tok, template="qwen3", stage="sft", cutoff_len=100000,
                  template_options=TemplateOptions(enable_thinking=False, today=data["today"]))
    sharegpt = [r for r in rows if "conversations" in r]
    in_memory, _ = load_examples([write_rows(tmp_path, sharegpt)], cache_dir=str(tmp_path / "c"), **kwargs)
    streamed = list(stream_examples([write_rows(tmp_path, sharegpt)], **kwargs))
    assert len(in_memory) == len(sharegpt) > 3
    assert [(e.input_ids, e.labels) for e in streamed] == [(e.input_ids, e.labels) for e in in_memory]


def test_template_keys_reach_the_sft_load_through_the_config(tmp_path):
    from longtune.data.lm import examples_from_config

    tok = tokenizer_for("qwen")
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                               {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ciao"}]}]
    values = {"model_name_or_path": "builtin:tiny", "dataset": write_rows(tmp_path, rows),
              "dataset_dir": str(tmp_path), "template": "qwen", "stage": "sft", "cutoff_len": 1000,
              "output_dir": str(tmp_path / "run"), "data_cache_dir": str(tmp_path / "c"),
              "mask_history": "true", "default_system": "Be kind."}
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    (ex,), _ = examples_from_config(cfg, tok)
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi")
    assert tok.decode([t for t in ex.labels if t != IGNORE]) == "Ciao<|im_end|>\n"
