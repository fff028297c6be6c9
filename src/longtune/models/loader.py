"""Load a Hugging Face causal LM and its tokenizer, then choose what trains: full, freeze, or LoRA/DoRA adapters.

The model stays a plain HF model (or a peft wrapper of one); nothing here patches model classes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from torch import nn

from longtune.config import ModelConfig
from longtune.errors import ConfigError
from longtune.models.builtin import build_builtin_model, is_builtin_model, load_builtin_tokenizer

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _check_model_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(
            f"key 'model_name_or_path': '{path}' does not exist (give a local model directory; "
            "hub downloads are not attempted, or use builtin:tiny)"
        )
    if not (p / "config.json").is_file():
        raise ConfigError(f"key 'model_name_or_path': '{path}' has no config.json (not a Hugging Face model directory)")
    return p


# Files one of which every saved tokenizer has (fast, sentencepiece, BPE, WordPiece, tiktoken, or its config).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")


def load_tokenizer(model_cfg: ModelConfig):
    name = model_cfg.model_name_or_path
    assert name is not None
    if is_builtin_model(name):
        return load_builtin_tokenizer()
    from transformers import AutoTokenizer

    path = _check_model_dir(name)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        # transformers would build an empty tokenizer from config.json alone, which encodes every row to nothing.
        raise ConfigError(f"key 'model_name_or_path': '{path}' has no tokenizer files (expected one of "
                          f"{', '.join(_TOKENIZER_FILES)}); copy the tokenizer of the base model into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"key 'model_name_or_path': cannot load a tokenizer from '{path}': {exc}".splitlines()[0]) from None
    if tokenizer.pad_token_id is None:
        # Padding positions never reach the loss (labels are IGNORE there); any id works as filler.
        tokenizer.pad_token = tokenizer.eos_token
    return add_configured_tokens(tokenizer, model_cfg)


def add_configured_tokens(tokenizer, model_cfg: ModelConfig):
    """`add_tokens` (plain) and `add_special_tokens` (never split, as LLaMA-Factory adds them) join the
    vocabulary; `resize_model_vocabulary` then gives them embedding rows."""
    if model_cfg.add_tokens:
        tokenizer.add_tokens(list(model_cfg.add_tokens), special_tokens=False)
    if model_cfg.add_special_tokens:
        tokenizer.add_tokens(list(model_cfg.add_special_tokens), special_tokens=True)
    return tokenizer


def vocabulary_grows(model_cfg: ModelConfig) -> bool:
    """Whether the embeddings are resized to the tokenizer (resize_vocab, or tokens added, as LLaMA-Factory)."""
    return bool(model_cfg.resize_vocab or model_cfg.add_tokens or model_cfg.add_special_tokens)


def resize_model_vocabulary(model: nn.Module, vocabulary_size: int) -> int:
    """Grow the input (and output) embeddings to `vocabulary_size` rounded up to a multiple of 64 (as
    LLaMA-Factory), when the tokenizer is longer than them; returns the number of new rows. New rows start as the
    mean of the existing ones: deterministic, so every copy of the model (ranks, a frozen reference) agrees."""
    old = model.get_input_embeddings().weight.shape[0]
    if vocabulary_size <= old:
        return 0
    model.resize_token_embeddings(vocabulary_size, pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        for embedding in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                          if m is not None}.values():
            weight = embedding.weight
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)
            bias = getattr(embedding, "bias", None)
            if bias is not None:
                bias[old:] = 0
    return model.get_input_embeddings().weight.shape[0] - old


def embedding_module_names(model: nn.Module) -> list[str]:
    """The attribute names of the input and output embeddings (e.g. embed_tokens, lm_head): what trains besides
    LoRA when the vocabulary grows."""
    wanted = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if id(m) in wanted and name})


def attention_implementation(model_cfg: ModelConfig, dtype: torch.dtype) -> str:
    if model_cfg.attn_implementation != "auto":
        return model_cfg.attn_implementation
    # sdpa keeps the input dtype end to end (HF's eager path runs its softmax in fp32, which breaks float64
    # exactness tests), and is the fast default on GPU.
    return "sdpa"


def load_reward_model(model_cfg: ModelConfig, dtype: torch.dtype, rope: RopeScaling | None = None,
                      log: Callable[[str], None] = print) -> nn.Module:
    """A ForSequenceClassification model with one output (the reward), from a causal LM or a reward model dir.

    The score head of a fresh model is initialised from a fixed seed, so runs are reproducible."""
    name = model_cfg.model_name_or_path
    assert name is not None
    if is_builtin_model(name):
        from transformers import AutoModelForSequenceClassification

        _check_builtin_rope(name, rope, log)
        causal = build_builtin_model(name, dtype=dtype)
        config = causal.config
        config.num_labels = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_config(config).to(dtype)
        missing, _ = model.load_state_dict(causal.state_dict(), strict=False)
        assert all(k.startswith("score.") for k in missing), missing
        model.set_attn_implementation(attention_implementation(model_cfg, dtype))
        return model
    from transformers import AutoModelForSequenceClassification

    path = _check_model_dir(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        scaled = _scaled_config(model_cfg, rope, log)
        if scaled:
            scaled["config"].num_labels = 1
        model = _from_pretrained(AutoModelForSequenceClassification, path, "a reward model", model_cfg, dtype,
                                 **(scaled or {"num_labels": 1}))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


@dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` with the length it must reach (cutoff_len: LLaMA-Factory's model_max_length in training)."""

    kind: str  # linear | dynamic | yarn | llama3
    max_length: int

    @classmethod
    def from_config(cls, rope_scaling: str | None, cutoff_len: int) -> RopeScaling | None:
        return cls(rope_scaling, cutoff_len) if rope_scaling is not None else None


def apply_rope_scaling(hf_config: Any, rope: RopeScaling, log: Callable[[str], None] = print) -> None:
    """Write `rope` into a Hugging Face config before the model is built, as LLaMA-Factory's configure_rope does:
    factor = ceil(max_length / the original context), rope_type = kind (dynamic/yarn/llama3 also record the
    original context; llama3 uses frequency factors 1 and 4), max_position_embeddings grows by the factor. A
    length that fits the original context needs no scaling (a notice). transformers 5 keeps these in
    `rope_parameters` (rope_theta stays)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    original = params.get("original_max_position_embeddings") or getattr(hf_config, "max_position_embeddings", None)
    if not original:
        raise ConfigError("key 'rope_scaling': the model's config has no max_position_embeddings to scale from")
    if rope.max_length <= original:
        log(f"notice: rope_scaling: cutoff_len {rope.max_length} fits the model's {original} positions; no scaling")
        return
    factor = float(math.ceil(rope.max_length / original))
    params.update(rope_type=rope.kind, factor=factor)
    if rope.kind in ("dynamic", "yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    if rope.kind == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    hf_config.rope_parameters = params
    hf_config.max_position_embeddings = int(original * factor)
    log(f"rope_scaling: {rope.kind}, factor {factor:g} ({original} -> {hf_config.max_position_embeddings} positions)")


def load_model(model_cfg: ModelConfig, dtype: torch.dtype, task: str = "causal", rope: RopeScaling | None = None,
               log: Callable[[str], None] = print) -> nn.Module:
    """The model to train: a causal LM, or with task='reward' a scalar-head reward model; `rope`: RoPE scaling
    written into its config before the weights load; embeddings grown to the tokenizer when the vocabulary
    grows (add_tokens, add_special_tokens, resize_vocab)."""
    model = _load_weights(model_cfg, dtype, task, rope, log)
    if vocabulary_grows(model_cfg):
        added = resize_model_vocabulary(model, len(load_tokenizer(model_cfg)))
        if added:
            log(f"vocabulary: embeddings resized to {model.get_input_embeddings().weight.shape[0]} rows "
                f"({added} new, starting as the mean embedding)")
    return model


def _load_weights(model_cfg: ModelConfig, dtype: torch.dtype, task: str, rope: RopeScaling | None,
                  log: Callable[[str], None]) -> nn.Module:
    if task == "reward":
        return load_reward_model(model_cfg, dtype, rope, log)
    name = model_cfg.model_name_or_path
    assert name is not None
    if is_builtin_model(name):
        _check_builtin_rope(name, rope, log)
        model = build_builtin_model(name, dtype=dtype)
        model.set_attn_implementation(attention_implementation(model_cfg, dtype))
        return model
    from transformers import AutoModelForCausalLM

    path = _check_model_dir(name)
    return _from_pretrained(AutoModelForCausalLM, path, "a causal LM", model_cfg, dtype,
                            **_scaled_config(model_cfg, rope, log))


def _check_builtin_rope(name: str, rope: RopeScaling | None, log: Callable[[str], None]) -> None:
    """The builtin models are built in code, not from a config file: they take no scaling (their context is long)."""
    if rope is None:
        return
    positions = build_builtin_model(name).config.max_position_embeddings
    if rope.max_length > positions:
        raise ConfigError(f"key 'rope_scaling': {name} has {positions} positions and takes no RoPE scaling; use a "
                          "model directory")
    log(f"notice: rope_scaling: cutoff_len {rope.max_length} fits the model's {positions} positions; no scaling")


def _scaled_config(model_cfg: ModelConfig, rope: RopeScaling | None, log: Callable[[str], None]) -> dict[str, Any]:
    """`config=` for from_pretrained when RoPE scaling changes it; nothing otherwise."""
    if rope is None:
        return {}
    hf_config = load_model_config(model_cfg)
    apply_rope_scaling(hf_config, rope, log)
    return {"config": hf_config}


def _from_pretrained(auto_class, path: Path, what: str, model_cfg: ModelConfig, dtype: torch.dtype, **extra):
    """`auto_class.from_pretrained` with the config's attention and trust settings; a folder it cannot load,
    or truncated/corrupt weights, is one ConfigError naming the folder."""
    try:
        return auto_class.from_pretrained(str(path), dtype=dtype,
                                          attn_implementation=attention_implementation(model_cfg, dtype),
                                          trust_remote_code=model_cfg.trust_remote_code, **extra)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"key 'model_name_or_path': cannot load {what} from '{path}': {exc}".splitlines()[0]) from None
    except SafetensorError as exc:
        raise ConfigError(f"key 'model_name_or_path': the weights in '{path}' are unreadable ({exc}); the files are "
                          "truncated or corrupt, copy them again") from None


def check_vocabulary(tokenizer, model_config, resizes: bool = False) -> None:
    """Every token id the tokenizer can produce must have a row in the model's embedding (unless the embeddings
    are resized to the tokenizer: `resizes`)."""
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab and not resizes:
        raise ConfigError(f"key 'model_name_or_path': the tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocab_size is {vocab} (ids >= {vocab} have no embedding); use the tokenizer that belongs "
                          "to this model")


def decoder_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers (the longest ModuleList in the model) and its qualified name."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ConfigError("finetuning_type 'freeze': cannot find the decoder layers of this model")
    return best


HEAD_NAMES = {"lm_head", "score", "classifier", "v_head"}


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of every nn.Linear except output heads (LM head, reward/classification head)."""
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    } - HEAD_NAMES
    return sorted(names)


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def apply_freeze(model: nn.Module, model_cfg: ModelConfig) -> None:
    """Train only the last (or first) N decoder layers, optionally only some of their submodules."""
    layers_name, layers = decoder_layer_list(model)
    n = model_cfg.freeze_trainable_layers
    count = len(layers)
    if n == 0 or abs(n) > count:
        raise ConfigError(f"key 'freeze_trainable_layers': must be between -{count} and {count}, not 0; got {n}")
    ids = range(count - n, count) if n > 0 else range(0, -n)
    modules = _split(model_cfg.freeze_trainable_modules)
    extra = _split(model_cfg.freeze_extra_modules)
    prefixes = [f"{layers_name}.{i}." for i in ids]
    matched_extra: set[str] = set()
    for pname, param in model.named_parameters():
        train = any(pname.startswith(pre) for pre in prefixes)
        if train and modules != ["all"]:
            train = any(f".{m}." in pname[len(layers_name):] for m in modules)
        for e in extra:
            if re.search(rf"(^|\.){re.escape(e)}\.", pname):
                matched_extra.add(e)
                train = True
        param.requires_grad_(train)
    missing = set(extra) - matched_extra
    if missing:
        raise ConfigError(f"key 'freeze_extra_modules': no module named {sorted(missing)} in this model")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"key 'freeze_trainable_modules': '{model_cfg.freeze_trainable_modules}' matches no parameter")


def apply_lora(model: nn.Module, model_cfg: ModelConfig) -> nn.Module:
    """Fresh LoRA adapters from the lora_* keys, or with `adapter_name_or_path` the saved adapter, trainable (its
    own rank, alpha and targets apply)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if model_cfg.adapter_name_or_path is not None:
        return PeftModel.from_pretrained(model, model_cfg.adapter_name_or_path, is_trainable=True)

    available = linear_module_names(model)
    targets = _split(model_cfg.lora_target)
    if targets == ["all"]:
        targets = available
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ConfigError(
            f"key 'lora_target': {unknown} not found among the model's linear layers {available}"
        )
    reward = hasattr(model, "score")
    extra = _split(model_cfg.additional_target) + (["score"] if reward else [])
    if vocabulary_grows(model_cfg) and model_cfg.additional_target is None:
        extra += embedding_module_names(model)  # the new rows must train (LLaMA-Factory does the same)
    lora_config = LoraConfig(
        task_type="SEQ_CLS" if reward else "CAUSAL_LM",
        r=model_cfg.lora_rank,
        lora_alpha=model_cfg.lora_alpha if model_cfg.lora_alpha is not None else 2 * model_cfg.lora_rank,
        lora_dropout=model_cfg.lora_dropout,
        target_modules=targets,
        use_dora=model_cfg.use_dora,
        use_rslora=model_cfg.use_rslora,
        modules_to_save=extra or None,
    )
    return get_peft_model(model, lora_config)


def apply_finetuning(model: nn.Module, model_cfg: ModelConfig) -> nn.Module:
    """Mark trainable parameters. Call under the run's seed: LoRA A matrices are initialised randomly."""
    if model_cfg.finetuning_type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if model_cfg.finetuning_type == "freeze":
        apply_freeze(model, model_cfg)
        if vocabulary_grows(model_cfg):  # the new rows must train
            for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
                if embedding is not None:
                    embedding.requires_grad_(True)
        return model
    return apply_lora(model, model_cfg)


def unwrap_base(model: nn.Module) -> nn.Module:
    """The HF PreTrainedModel inside an optional peft wrapper (adapters stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def load_model_config(model_cfg: ModelConfig):
    """The model's config without its weights (for checks that must run before anything heavy loads)."""
    name = model_cfg.model_name_or_path
    assert name is not None
    if is_builtin_model(name):
        return build_builtin_model(name).config
    from transformers import AutoConfig

    path = _check_model_dir(name)
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"key 'model_name_or_path': cannot read the config in '{path}': {exc}".splitlines()[0]) from None


# --- Quantized bases (QLoRA): bitsandbytes layers replace the base's linear layers; adapters train on top. ---


def import_bitsandbytes():
    """bitsandbytes, or one ConfigError saying how to install it."""
    import logging

    # On CPU, bitsandbytes warns at import that its optional inference kernel (package `kernels`) is missing; that
    # kernel serves only the repacked eval layout, which quantize_base turns off. Keep the warning off the console.
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("key 'quantization_bit': needs bitsandbytes, which is not installed; "
                          "pip install 'longtune[quant]' (or bitsandbytes>=0.50)") from None
    finally:
        cpu_ops_log.setLevel(level)
    return bitsandbytes


def check_not_prequantized(model_config: Any, model_cfg: ModelConfig) -> None:
    """A checkpoint already quantized by another method (GPTQ, AWQ, ...) cannot be re-quantized or trained here."""
    existing = getattr(model_config, "quantization_config", None)
    if existing is None:
        return
    method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
    raise ConfigError(f"key 'model_name_or_path': '{model_cfg.model_name_or_path}' is already quantized "
                      f"({method or 'quantization_config in config.json'}); longtune trains only unquantized bases "
                      "(quantized at load with quantization_bit); give the full-precision model")


def is_quantized_parameter(param: torch.Tensor) -> bool:
    """A bitsandbytes weight (4-bit packed or int8): frozen, never cast to fp32, never sharded."""
    return type(param).__name__ in ("Params4bit", "Int8Params")


def parameter_count(param: torch.Tensor) -> int:
    """Weights a parameter stands for: a packed 4-bit tensor holds two per byte, its shape is in its QuantState."""
    quant_state = getattr(param, "quant_state", None)
    return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()


def quantized_modules(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes linear layers of a (possibly peft-wrapped) model."""
    return [m for m in model.modules() if any(is_quantized_parameter(p) for p in m.parameters(recurse=False))]


def quantize_base(model: nn.Module, model_cfg: ModelConfig, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every linear layer but the output heads by its bitsandbytes twin, quantized on `device`; returns
    how many were replaced. Call before adapters are added (peft wraps the bitsandbytes layers).

    Our own replacement rather than transformers' BitsAndBytesConfig: it works for the builtin model too (built
    from a config, not from_pretrained) and needs no accelerate or device_map. 4-bit layers keep their
    quantization constants next to the packed weight (a QuantState), so FSDP2 does not shard them (see
    apply_fsdp)."""
    bnb = import_bitsandbytes()
    bits = model_cfg.quantization_bit
    head = model.get_output_embeddings()
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module is not head and name.rsplit(".", 1)[-1] not in HEAD_NAMES]
    for name, linear in targets:
        weight = linear.weight.data
        has_bias = linear.bias is not None
        if bits == 4:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                      compute_dtype=compute_dtype,
                                      compress_statistics=model_cfg.double_quantization,
                                      quant_type=model_cfg.quantization_type, device="meta")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False,
                                             compress_statistics=model_cfg.double_quantization,
                                             quant_type=model_cfg.quantization_type, module=layer)
            # On CPU, bitsandbytes repacks a 4-bit weight for fast inference the first time it runs in eval mode
            # without grad (reference model, evaluation); matmuls on the repacked weight have no backward, so a
            # later training step would get no gradient through this layer. Keep the trainable layout.
            layer.support_avx512bf16_for_cpu = False
        else:
            # LLM.int8() with LLaMA-Factory's outlier threshold (llm_int8_threshold 6.0); int8 weights only.
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                        has_fp16_weights=False, threshold=6.0, device="meta")
            layer.weight = bnb.nn.Int8Params(weight.to(compute_dtype), requires_grad=False, has_fp16_weights=False)
        if has_bias:
            layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        layer = layer.to(device)  # quantization happens here
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    # The flag transformers' own bitsandbytes loader sets; peft reads it to wrap these layers with its bnb LoRA.
    setattr(model, f"is_loaded_in_{bits}bit", True)
    return len(targets)


def dequantize_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes layer by a plain nn.Linear holding its dequantized weight in `dtype` (what the
    quantized layer computes with), so that a LoRA merge into it reproduces the trained 4-/8-bit base + adapter."""
    bnb = import_bitsandbytes()
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    for name, layer in layers:
        weight = layer.weight
        if isinstance(layer, bnb.nn.Linear4bit):
            dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        else:
            # LLM.int8(): row-wise absmax quantization, W = CB * SCB / 127 (CB the int8 rows, SCB their absmax).
            codes = layer.state.CB if layer.state.CB is not None else weight.data
            absmax = layer.state.SCB if layer.state.SCB is not None else weight.SCB
            dense = codes.to(torch.float32) * (absmax.to(torch.float32).unsqueeze(1) / 127.0)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(dense.to(dtype), requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    for bits in (4, 8):
        if getattr(model, f"is_loaded_in_{bits}bit", False):
            setattr(model, f"is_loaded_in_{bits}bit", False)
    return len(layers)
