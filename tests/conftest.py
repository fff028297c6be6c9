"""Shared fixtures: small datasets and tiny saved Qwen2/Llama models, all built offline."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_data_cache(tmp_path_factory):
    """Tokenized-data cache of the tests (and of the processes they start) lives in a temp dir, not ~/.cache."""
    previous = os.environ.get("LONGTUNE_CACHE")
    os.environ["LONGTUNE_CACHE"] = str(tmp_path_factory.mktemp("data_cache"))
    yield
    if previous is None:
        os.environ.pop("LONGTUNE_CACHE", None)
    else:
        os.environ["LONGTUNE_CACHE"] = previous


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> Path:
    """Alpaca rows of deliberately varied lengths (so padding and token weighting matter)."""
    rng = random.Random(7)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows = []
    for i in range(24):
        n_in = rng.randint(1, 12)
        n_out = rng.randint(1, 20)
        rows.append(
            {
                "instruction": f"Task {i}: repeat the words",
                "input": " ".join(rng.choice(words) for _ in range(n_in)),
                "output": " ".join(rng.choice(words) for _ in range(n_out)),
            }
        )
    path = tmp_path_factory.mktemp("data") / "varied.json"
    path.write_text(json.dumps(rows))
    return path


def base_overrides(data_file: Path, out: Path, **extra) -> list[str]:
    """key=value overrides for a small, exact (float64) run on builtin:tiny."""
    values = {
        "model_name_or_path": "builtin:tiny",
        "dataset": str(data_file),
        "template": "chatml",
        "cutoff_len": 96,
        "output_dir": str(out),
        "dtype": "float64",
        "finetuning_type": "full",
        "learning_rate": 1e-3,
        "lr_scheduler_type": "linear",
        "warmup_steps": 1,
        "max_steps": 3,
        "logging_steps": 1,
        "save_steps": 0,
        "disable_tqdm": True,
        "gradient_checkpointing": False,
        "loss_chunk_size": 32,
        "seed": 3,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen2 and Llama models saved with save_pretrained, with the builtin tokenizer beside them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from longtune.models.builtin import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    shapes = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = {}
    root = tmp_path_factory.mktemp("models")
    for name, cfg_cls, model_cls in (
        ("qwen2", Qwen2Config, Qwen2ForCausalLM),
        ("llama", LlamaConfig, LlamaForCausalLM),
    ):
        torch.manual_seed(11)
        model = model_cls(cfg_cls(tie_word_embeddings=(name == "llama"), **shapes))
        path = root / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests run only where torch sees a GPU; elsewhere they are reported as skipped."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny float64 ops gain nothing from threads; on a busy 2-core host the thread pool's spinning costs 5x.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
