"""The builtin tokenizer, model and datasets: shipped files are reproducible, the model is seed-independent."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longtune.data.loading import BUILTIN_DATASETS, BUILTIN_DIR, load_dataset
from longtune.data.templates import CHATML_JINJA
from longtune.errors import ConfigError
from longtune.models.builtin import (
    BUILTIN_PREFIX,
    TOKENIZER_DIR,
    build_builtin_model,
    is_builtin_model,
    load_builtin_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_builtin_tokenizer()


def test_tokenizer_specials(tokenizer):
    assert len(tokenizer) == 1024
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.bos_token is None
    # Special tokens are single ids even when glued to text.
    assert tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"][0] == 1
    assert tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"][-1] == 2


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "Add the two numbers.\n37 + 48",
        "qzvd: 7319\nabcd: 0042\n\n  indented\ttab",
        "Unicode: naïve café — 東京 🚀",
        "<|im_start|>assistant\n85<|im_end|>\n",
    ],
)
def test_tokenizer_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_splits_digits(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("12345", add_special_tokens=False)["input_ids"])
    assert tokens == ["1", "2", "3", "4", "5"]


def test_chat_template_is_chatml(tokenizer):
    assert tokenizer.chat_template == CHATML_JINJA
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}] + messages[:1]
    assert tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_script_reproduces_shipped_files(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_builtin_tokenizer.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    shipped = sorted(p.name for p in TOKENIZER_DIR.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == shipped
    _, mismatch, errors = filecmp.cmpfiles(TOKENIZER_DIR, tmp_path, shipped, shallow=False)
    assert mismatch == [] and errors == []


def test_data_script_reproduces_shipped_files(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_builtin_data.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    names = sorted(BUILTIN_DATASETS.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    _, mismatch, errors = filecmp.cmpfiles(BUILTIN_DIR, tmp_path, names, shallow=False)
    assert mismatch == [] and errors == []
    assert sum(p.stat().st_size for p in BUILTIN_DIR.iterdir()) < 3_000_000


@pytest.mark.parametrize(
    "name, rows", [("sft_demo", 3000), ("sharegpt_demo", 500), ("pt_demo", 2000), ("kv_retrieval", 300)]
)
def test_builtin_datasets_parse(name, rows):
    parsed = load_dataset(BUILTIN_PREFIX + name, dataset_dir="unused")
    assert len(parsed) == rows
    assert [r.row_number for r in parsed] == list(range(1, rows + 1))


def test_model_config():
    model = build_builtin_model("builtin:tiny")
    c = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (1024, 128, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (4, 2, 256)
    assert c.max_position_embeddings == 32768
    assert c.rope_parameters["rope_theta"] == 10000.0
    assert c.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert c.attention_dropout == 0.0
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (None, 2, 0)
    assert c.name_or_path == "builtin:tiny" and c._name_or_path == "builtin:tiny"
    assert next(model.parameters()).dtype == torch.float32
    assert build_builtin_model("builtin:tiny", torch.float64).lm_head.weight.dtype == torch.float64


def test_model_weights_ignore_global_rng():
    torch.manual_seed(7)
    first = build_builtin_model("builtin:tiny").state_dict()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    second = build_builtin_model("builtin:tiny").state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)  # the build leaves the caller's RNG alone
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert first["model.embed_tokens.weight"].std() > 0.01  # initialised, not zeros


def test_model_forward_loss_near_uniform():
    model = build_builtin_model("builtin:tiny")
    ids = torch.arange(3, 67).view(1, -1)
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - torch.log(torch.tensor(1024.0)).item()) < 0.1


def test_model_names():
    assert is_builtin_model("builtin:tiny") and not is_builtin_model("Qwen/Qwen2-0.5B")
    with pytest.raises(ConfigError, match=r"model_name_or_path: unknown builtin model 'builtin:huge'.*builtin:tiny"):
        build_builtin_model("builtin:huge")
