"""Write tests/fixtures/lf_templates/*.json: LLaMA-Factory 0.9.5's own token ids and labels for a set of rows, per
template, so tests/test_lf_templates.py can check that our named templates are token-identical with it.

Runs in a separate venv with LLaMA-Factory installed (never the project's), e.g.
    python3 -m venv /work/venvs/lf && /work/venvs/lf/bin/pip install --no-deps llamafactory==0.9.5
    (torch, transformers and tokenizers from any venv: a .pth file pointing at its site-packages will do)
    DISABLE_VERSION_CHECK=1 /work/venvs/lf/bin/python scripts/make_lf_fixtures.py [--tokenizer]
--tokenizer first (re)trains the small byte-level BPE tokenizer in tests/fixtures/lf_tokenizer (offline,
deterministic), which both LLaMA-Factory and our tests load. Rows go through LLaMA-Factory's converters
(sharegpt/alpaca), its template and its supervised/pairwise/feedback processors, unchanged; only the date the
llama3 tool prompt states is pinned so the fixtures do not depend on the day.
"""

from __future__ import annotations

import argparse
import copy
import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
os.environ["RAYON_NUM_THREADS"] = "1"  # reproducible BPE training
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "lf_tokenizer"
FIXTURE_DIR = ROOT / "tests" / "fixtures" / "lf_templates"
TODAY = "26 Jul 2024"  # the llama3 tool prompt's date in every fixture

# Every marker the templates below write, as special tokens (LLaMA-Factory adds stop words as special tokens too).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "<s>", "</s>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
    "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|system|>", "<|observation|>", "<|end|>",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
]

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. What is the weather in Paris today? It is sunny and warm.
You are a helpful assistant. Answer the question briefly. Add two numbers: 2 + 3 = 5. Thank you!
Let me think about this step by step. First, look at the question; then check the tools you can call.
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}} {"type": "function"}
Human: Hello. Assistant: Hi, how can I help you? System: be brief. User: Write a short poem about the sea.
The sea is wide, the sea is deep; the waves roll on while sailors sleep. Tool Name: search. Action Input:
"""

# Per template: the bos/eos the model family's tokenizer has (LLaMA-Factory then replaces eos where told to).
TOKENS: dict[str, dict[str, str]] = {
    "chatml": {"eos_token": "<|im_end|>"},
    "deepseek": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "deepseek3": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "deepseekr1": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "default": {"eos_token": "</s>"},
    "empty": {"eos_token": "<|endoftext|>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "gemma3": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "glm4": {"eos_token": "<|endoftext|>"},
    "llama2": {"bos_token": "<s>", "eos_token": "</s>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "phi": {"eos_token": "<|endoftext|>"},
    "phi4": {"eos_token": "<|endoftext|>"},
    "qwen": {"eos_token": "<|endoftext|>"},
    "qwen2_vl": {"eos_token": "<|endoftext|>"},
    "qwen3": {"eos_token": "<|endoftext|>"},
    "qwen3_nothink": {"eos_token": "<|endoftext|>"},
    "yi": {"eos_token": "<|endoftext|>"},
}

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
SEARCH_TOOL = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}}
TOOLS = json.dumps([WEATHER_TOOL, SEARCH_TOOL], ensure_ascii=False)


def turn(who: str, value: str) -> dict[str, str]:
    return {"from": who, "value": value}


CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
TWO_CALLS = json.dumps([{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                        {"name": "search", "arguments": {"query": "Paris news"}}])

# (case id, stage, row as a dataset has it, formatting, option keys). sharegpt rows use LLaMA-Factory's default tags.
SFT_CASES = [
    ("single", {"conversations": [turn("human", "What is 2 + 3?"), turn("gpt", "2 + 3 = 5.")]}, {}),
    ("system", {"conversations": [turn("human", "Hello."), turn("gpt", "Hi, how can I help you?")],
                "system": "You are a helpful assistant. Be brief."}, {}),
    ("system_turn", {"conversations": [turn("system", "Answer briefly."), turn("human", "Weather?"),
                                       turn("gpt", "Sunny.")]}, {}),
    ("multi", {"conversations": [turn("human", "Hello."), turn("gpt", "Hi!"), turn("human", "Write a poem."),
                                 turn("gpt", "The sea is wide."), turn("human", "Thank you!"), turn("gpt", "You are welcome.")],
               "system": "Be brief."}, {}),
    ("multi_mask_history", {"conversations": [turn("human", "Hello."), turn("gpt", "Hi!"),
                                              turn("human", "Write a poem."), turn("gpt", "The sea is wide.")]},
     {"mask_history": True}),
    ("train_on_prompt", {"conversations": [turn("human", "Hello."), turn("gpt", "Hi!"), turn("human", "Poem?"),
                                           turn("gpt", "The sea.")]}, {"train_on_prompt": True}),
    ("default_system", {"conversations": [turn("human", "Hello."), turn("gpt", "Hi!")]},
     {"default_system": "You answer in one word."}),
    ("tools", {"conversations": [turn("human", "What is the weather in Paris?"), turn("function_call", CALL),
                                 turn("observation", '{"temperature": 21, "sky": "sunny"}'),
                                 turn("gpt", "It is sunny and 21 degrees in Paris.")],
               "tools": TOOLS}, {}),
    ("tools_system_mask_history", {
        "conversations": [turn("human", "Weather in Paris?"), turn("function_call", CALL),
                          turn("observation", '{"sky": "sunny"}'), turn("gpt", "Sunny.")],
        "system": "You are a helpful assistant.", "tools": TOOLS}, {"mask_history": True}),
    ("parallel_calls", {"conversations": [turn("human", "Weather and news for Paris?"),
                                          turn("function_call", TWO_CALLS),
                                          turn("observation", '{"sky": "sunny"}\n{"news": "none"}'),
                                          turn("gpt", "Sunny, and no news.")],
                        "tools": TOOLS}, {}),
    ("tool_format_default", {"conversations": [turn("human", "Weather in Paris?"), turn("function_call", CALL),
                                               turn("observation", '{"sky": "sunny"}'), turn("gpt", "Sunny.")],
                             "tools": TOOLS}, {"tool_format": "default"}),
    ("alpaca", {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5",
                "history": [["Hello.", "Hi!"]], "system": "Be brief."}, {}),
]
THINK_CASES = [
    ("think_given", {"conversations": [turn("human", "What is 2 + 3?"),
                                       turn("gpt", "<think>\nTwo plus three.\n</think>\n\n5.")]}, {}),
    ("think_given_off", {"conversations": [turn("human", "What is 2 + 3?"),
                                           turn("gpt", "<think>\nTwo plus three.\n</think>\n\n5.")]},
     {"enable_thinking": False}),
    ("think_missing_off", {"conversations": [turn("human", "What is 2 + 3?"), turn("gpt", "5.")]},
     {"enable_thinking": False}),
    ("think_multi", {"conversations": [turn("human", "Hi."), turn("gpt", "<think>\nGreet.\n</think>\n\nHello!"),
                                       turn("human", "2 + 3?"), turn("gpt", "5.")]}, {}),
    ("think_multi_off", {"conversations": [turn("human", "Hi."), turn("gpt", "<think>\nGreet.\n</think>\n\nHello!"),
                                           turn("human", "2 + 3?"), turn("gpt", "5.")]}, {"enable_thinking": False}),
    ("think_multi_mask_history", {"conversations": [turn("human", "Hi."),
                                                    turn("gpt", "<think>\nGreet.\n</think>\n\nHello!"),
                                                    turn("human", "2 + 3?"),
                                                    turn("gpt", "<think>\nAdd.\n</think>\n\n5.")]},
     {"mask_history": True}),
]
DPO_CASES = [
    ("dpo", {"conversations": [turn("human", "Hello."), turn("gpt", "Hi!"), turn("human", "2 + 3?")],
             "chosen": turn("gpt", "5."), "rejected": turn("gpt", "It is 6, I think."), "system": "Be brief."}, {}),
    ("dpo_alpaca", {"instruction": "Name a colour.", "input": "", "chosen": "Blue.", "rejected": "Seven."}, {}),
    ("dpo_function_call", {"conversations": [turn("human", "Weather in Paris?")], "tools": TOOLS,
                           "chosen": turn("function_call", CALL), "rejected": turn("gpt", "I cannot know.")}, {}),
]
KTO_ROWS = [  # two rows: KL pairings i+1 and i-1 (mod 2) coincide
    {"conversations": [turn("human", "Name a colour."), turn("gpt", "Blue.")], "kto_tag": True},
    {"conversations": [turn("human", "2 + 3?"), turn("gpt", "Seven.")], "kto_tag": False, "system": "Be brief."},
]
PT_ROWS = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "The sea is wide, the sea is deep."}]
THINK_DPO = [
    ("dpo_think", {"conversations": [turn("human", "2 + 3?")],
                   "chosen": turn("gpt", "<think>\nAdd.\n</think>\n\n5."), "rejected": turn("gpt", "6.")}, {}),
    ("dpo_think_off", {"conversations": [turn("human", "2 + 3?")],
                       "chosen": turn("gpt", "<think>\nAdd.\n</think>\n\n5."), "rejected": turn("gpt", "6.")},
     {"enable_thinking": False}),
]


def train_tokenizer() -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [TRAINING_TEXT] * 3 + [json.dumps(WEATHER_TOOL), json.dumps(SEARCH_TOOL)]
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(TOKENIZER_DIR / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1000000, "clean_up_tokenization_spaces": False}
    (TOKENIZER_DIR / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), **TOKENS[name])


def import_llamafactory():
    # its multimodal plugin imports torchaudio at module level; the text path never uses it
    if "torchaudio" not in sys.modules:
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub
    import llamafactory.data.tool_utils as tool_utils
    from llamafactory.data import template as lf_template
    from llamafactory.data.converter import AlpacaDatasetConverter, SharegptDatasetConverter
    from llamafactory.data.parser import DatasetAttr
    from llamafactory.data.processor import (
        FeedbackDatasetProcessor,
        PairwiseDatasetProcessor,
        PretrainDatasetProcessor,
        SupervisedDatasetProcessor,
    )

    class PinnedDate:  # the llama3 tool prompt states today's date: pin it
        @staticmethod
        def now():
            import datetime

            return datetime.datetime.strptime(TODAY, "%d %b %Y")

    tool_utils.datetime = PinnedDate
    return SimpleNamespace(template=lf_template, DatasetAttr=DatasetAttr, alpaca=AlpacaDatasetConverter,
                           sharegpt=SharegptDatasetConverter, sft=SupervisedDatasetProcessor,
                           pairs=PairwiseDatasetProcessor, kto=FeedbackDatasetProcessor, pt=PretrainDatasetProcessor)


def lf_encode(lf, name: str, stage: str, rows: list[dict], options: dict) -> list[dict]:
    """LLaMA-Factory's ids and labels of `rows` under template `name` and the option keys."""
    data_args = SimpleNamespace(
        template=name, tool_format=options.get("tool_format"), default_system=options.get("default_system"),
        enable_thinking=options.get("enable_thinking", True), preserve_thinking=False,
        train_on_prompt=options.get("train_on_prompt", False), mask_history=options.get("mask_history", False),
        cutoff_len=100000, media_dir=None, packing=False,
    )
    saved = copy.deepcopy(lf.template.TEMPLATES[name])  # get_template_and_fix_tokenizer edits the registered one
    tokenizer = load_tokenizer(name)
    try:
        template = lf.template.get_template_and_fix_tokenizer(tokenizer, data_args)
        # the text part of multimodal templates (gemma3, qwen2_vl): their plugin wants an image processor
        template.mm_plugin = lf.template.get_mm_plugin(name="base")
        formatting = "alpaca" if "instruction" in rows[0] or "text" in rows[0] else "sharegpt"
        attr = lf.DatasetAttr("file", "fixture", formatting=formatting, ranking=stage == "dpo", system="system",
                              tools="tools" if formatting == "sharegpt" else None,
                              history="history" if formatting == "alpaca" else None)
        if stage == "dpo":
            attr.chosen, attr.rejected = "chosen", "rejected"
        if stage == "kto":
            attr.kto_tag = "kto_tag"
        if stage == "pt":  # LF's pretraining rows: the `text` column read as an alpaca prompt
            attr.prompt, attr.query, attr.response, attr.system = "text", None, None, None
        converter = (lf.alpaca if formatting == "alpaca" else lf.sharegpt)(attr, data_args)
        # a datasets.Dataset gives every column on every row: None where a row has no value
        columns = ["system", "tools", "chosen", "rejected", "kto_tag", "history", "input", "text"]
        converted = [converter({c: None for c in columns} | row) for row in rows]
        batch = {key: [c[key] for c in converted] for key in converted[0]}
        processor = {"sft": lf.sft, "dpo": lf.pairs, "kto": lf.kto, "pt": lf.pt}[stage](template, tokenizer, None,
                                                                                      data_args)
        out = processor.preprocess_dataset(batch)
    finally:
        lf.template.TEMPLATES[name] = saved
    keys = {"sft": ["input_ids", "labels"],
            "dpo": ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"],
            "kto": ["input_ids", "labels", "kl_input_ids", "kl_labels", "kto_tags"], "pt": ["input_ids"]}[stage]
    assert len(out["input_ids" if stage != "dpo" else "chosen_input_ids"]) == len(rows), "LF dropped a row"
    return [{key: out[key][i] for key in keys} for i in range(len(rows))]


def cases_for(name: str, template) -> list[tuple[str, str, list[dict], dict]]:
    cases = [(case, "sft", [row], options) for case, row, options in SFT_CASES]
    if template.efficient_eos:  # LF refuses train_on_prompt there (so do we)
        cases = [c for c in cases if not c[3].get("train_on_prompt")]
    if name == "glm4":  # GLM-4 writes one call per turn
        cases = [c for c in cases if c[0] != "parallel_calls"]
    if type(template).__name__ == "ReasoningTemplate":
        cases += [(case, "sft", [row], options) for case, row, options in THINK_CASES]
        cases += [(case, "dpo", [row], options) for case, row, options in THINK_DPO]
    cases += [(case, "dpo", [row], options) for case, row, options in DPO_CASES]
    cases.append(("kto", "kto", KTO_ROWS, {}))
    cases.append(("pt", "pt", PT_ROWS, {}))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", action="store_true", help="retrain tests/fixtures/lf_tokenizer first")
    args = parser.parse_args()
    if args.tokenizer:
        train_tokenizer()
    lf = import_llamafactory()
    FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    for name in sorted(TOKENS):
        template = lf.template.TEMPLATES[name]
        fixture = {"template": name, "tokenizer": TOKENS[name], "today": TODAY, "cases": []}
        for case, stage, rows, options in cases_for(name, template):
            expected = lf_encode(lf, name, stage, rows, options)
            fixture["cases"].append({"id": case, "stage": stage, "rows": rows, "options": options,
                                     "expected": expected})
        path = FIXTURE_DIR / f"{name}.json"
        path.write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(fixture['cases'])} cases")


if __name__ == "__main__":
    main()
