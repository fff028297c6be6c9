"""The builtin models (`model_name_or_path: builtin:tiny`) and their packaged BPE tokenizer.

Used by the offline demo and the tests: weights are a pure function of the name, so a LoRA adapter trained on
`builtin:tiny` can be merged into a base rebuilt later in another process.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from longtune.errors import ConfigError

BUILTIN_PREFIX = "builtin:"
TOKENIZER_DIR = Path(__file__).parent / "builtin_tokenizer"

# Architecture hyper-parameters per builtin model name (vocab and special ids come from the tokenizer).
_BUILTIN_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
    },
}
_INIT_SEED = 0


def is_builtin_model(name: str) -> bool:
    return isinstance(name, str) and name.startswith(BUILTIN_PREFIX)


def builtin_model_names() -> list[str]:
    return [BUILTIN_PREFIX + key for key in sorted(_BUILTIN_SHAPES)]


def load_builtin_tokenizer() -> PreTrainedTokenizerFast:
    """The packaged byte-level BPE tokenizer: vocab 1024, pad <|endoftext|>, eos <|im_end|>, no bos, ChatML."""
    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))


def build_builtin_model(name: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Build a builtin Qwen2-architecture model with weights that depend only on `name`, never on global RNG."""
    key = name[len(BUILTIN_PREFIX) :] if is_builtin_model(name) else name
    if key not in _BUILTIN_SHAPES:
        raise ConfigError(
            f"model_name_or_path: unknown builtin model '{name}'; known: {', '.join(builtin_model_names())}"
        )
    tokenizer = load_builtin_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=32768,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_BUILTIN_SHAPES[key],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_INIT_SEED)
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype)
    model.config.name_or_path = BUILTIN_PREFIX + key
    model.name_or_path = BUILTIN_PREFIX + key
    return model
