"""Generation for `longtune chat` and `longtune predict`: where a model to talk to comes from (run dir, final/,
exported model, base model + LoRA adapter), how a conversation becomes prompt ids, LLaMA-Factory's generation keys
as Hugging Face `generate` arguments, and batched (left-padded) generation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from longtune.config import GenerationConfig, ModelConfig
from longtune.data.templates import TemplateOptions
from longtune.errors import ConfigError
from longtune.models.builtin import is_builtin_model

RUN_CONFIG = "train_config.yaml"  # written by every run into output_dir (run_dir.py)


def prompt_ids(tokenizer: Any, template: str, messages: list[dict[str, str]], system: str | None,
               options: TemplateOptions = TemplateOptions()) -> list[int]:
    """The token ids of a conversation ending in the assistant header: what the model continues.

    The one place chat and predict render prompts: the `template` key (a LLaMA-Factory name, or auto) through
    data.templates, so a prompt is exactly the prompt tokens a training row of the same turns has."""
    from longtune.data.templates import render_generation_prompt

    return render_generation_prompt(template, tokenizer, list(messages), system=system, options=options)


def stop_token_ids(tokenizer: Any, model: nn.Module, template: str = "auto") -> list[int]:
    """Ids that end a reply: the template's eos and stop words (the tokenizer's eos for auto) and the eos ids of
    the model's generation config."""
    from longtune.data.templates import stop_token_ids as template_stops

    ids = [tokenizer.eos_token_id, *template_stops(template, tokenizer)]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids if i is not None})


def generate_kwargs(gen: GenerationConfig, tokenizer: Any, model: nn.Module, template: str = "auto") -> dict[str, Any]:
    """`model.generate` arguments for the LLaMA-Factory generation keys: sampling settings only with do_sample
    (greedy or beam search otherwise), stopping at `stop_token_ids`."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "do_sample": gen.do_sample,
        "num_beams": gen.num_beams,
        "repetition_penalty": gen.repetition_penalty,
        "eos_token_id": stop_token_ids(tokenizer, model, template),
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    else:  # the model's own generation_config may carry sampling values; greedy ignores them, say so to HF
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def left_padded(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of prompts padded on the left, so every row's next token is at the end."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return input_ids, mask


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer: Any, prompts: list[list[int]], gen: GenerationConfig,
                   template: str = "auto") -> list[list[int]]:
    """The generated ids of each prompt (prompt excluded, stopped at the first stop token, which is kept), all
    prompts in one left-padded `generate` call."""
    kwargs = generate_kwargs(gen, tokenizer, model, template)
    device = next(model.parameters()).device
    input_ids, mask = left_padded(prompts, kwargs["pad_token_id"])
    out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
    stops = set(kwargs["eos_token_id"])
    replies = []
    for row in out[:, input_ids.shape[1]:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        replies.append(row[:end])
    return replies


# ---------------------------------------------------------------- where the model comes from


@dataclass(frozen=True)
class ModelSource:
    """A model to generate with: weights (an HF directory, builtin:NAME, or the base of an adapter), an optional
    LoRA adapter, and the training run's config values when the source is (inside) a run directory."""

    model: str  # model_name_or_path of the weights (the base model when `adapter` is set)
    adapter: str | None
    run_config: dict[str, Any]  # the run's train_config.yaml ({} when there is none)


def _read_run_config(model_dir: Path) -> dict[str, Any]:
    for candidate in (model_dir / RUN_CONFIG, model_dir.parent / RUN_CONFIG):
        if candidate.is_file():
            loaded = yaml.safe_load(candidate.read_text()) or {}
            return loaded if isinstance(loaded, dict) else {}
    return {}


def _adapter_base(adapter_dir: Path) -> str:
    try:
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"adapter '{adapter_dir}': cannot read adapter_config.json ({exc})") from None
    if not base:
        raise ConfigError(f"adapter '{adapter_dir}': adapter_config.json names no base_model_name_or_path; "
                          "give model_name_or_path=BASE with adapter_name_or_path")
    return base


def resolve_model_source(source: str, adapter: str | None = None) -> ModelSource:
    """`source` as `longtune chat` takes it: a run directory (its final/, else newest checkpoint), a final/ or
    checkpoint dir, an exported or any HF model dir, a LoRA adapter dir, or builtin:NAME; `adapter`: a LoRA
    adapter to apply on top (adapter_name_or_path)."""
    if is_builtin_model(source):
        return ModelSource(source, adapter, {})
    from longtune.export import find_model_dir

    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"model '{source}' is not a directory (give a run directory, a model directory or "
                          "builtin:tiny)")
    model_dir = find_model_dir(path)
    run_config = _read_run_config(model_dir)
    if (model_dir / "adapter_config.json").is_file():
        if adapter is not None:
            raise ConfigError(f"'{model_dir}' is already a LoRA adapter; drop adapter_name_or_path or give its base")
        return ModelSource(_adapter_base(model_dir), str(model_dir), run_config)
    return ModelSource(str(model_dir), adapter, run_config)


def load_generation_model(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """(model in eval mode, on the GPU when there is one, tokenizer) of a source; an adapter is applied with peft
    (not merged). The tokenizer is the adapter's when it ships one (a training run saves it into final/), else
    the base model's."""
    from longtune.models.loader import load_model

    model_cfg = ModelConfig(model_name_or_path=source.model, trust_remote_code=trust_remote_code)
    model = load_model(model_cfg, dtype)
    tokenizer_from = model_cfg
    if source.adapter is not None:
        from peft import PeftModel

        adapter_dir = Path(source.adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ConfigError(f"key 'adapter_name_or_path': '{adapter_dir}' holds no adapter_config.json "
                              "(not a peft LoRA adapter)")
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if (adapter_dir / "tokenizer_config.json").is_file():
            tokenizer_from = ModelConfig(model_name_or_path=str(adapter_dir), trust_remote_code=trust_remote_code)
    tokenizer = _tokenizer_of(tokenizer_from, model_cfg)
    if torch.cuda.is_available():
        model.to("cuda")
    return model.eval(), tokenizer


def _tokenizer_of(preferred: ModelConfig, fallback: ModelConfig) -> Any:
    from longtune.models.loader import load_tokenizer

    if preferred is fallback:
        return load_tokenizer(fallback)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(preferred.model_name_or_path,
                                              trust_remote_code=preferred.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
