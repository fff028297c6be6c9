"""Training configuration: flat LLaMA-Factory-style YAML keys validated into typed, frozen dataclass groups.

Every key lives in exactly one group; its `help` metadata is the source of docs/config.md (scripts/gen_config_docs.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from longtune.data.templates import check_template_name, check_tool_format
from longtune.errors import ConfigError


def _key(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


def _require_finite(group: Any) -> None:
    """No float key of a group may be NaN or infinite (YAML reads `.nan` and `.inf` as floats)."""
    import math

    for f in dataclasses.fields(group):
        value = getattr(group, f.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"key '{f.name}' must be a finite number, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    model_name_or_path: str | None = _key(
        None, "Local Hugging Face model directory, or `builtin:tiny` (a small Qwen2 built offline). Required."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32", "float64"] = _key(
        "auto",
        "Parameter/compute dtype. `auto`: bfloat16 if `bf16`, float16 if `fp16`, else float32. "
        "float64 is for exactness tests.",
    )
    bf16: bool = _key(False, "Train in bfloat16 (LLaMA-Factory flag; same as `dtype: bfloat16`).")
    fp16: bool = _key(False, "Train in float16 (LLaMA-Factory flag; same as `dtype: float16`): fp32 master weights, "
                      "dynamic loss scaling (`loss_scale`, `skipped_steps` in metrics.jsonl).")
    finetuning_type: Literal["full", "freeze", "lora"] = _key(
        "lora", "Which parameters train: all (`full`), the last `freeze_trainable_layers` layers (`freeze`), or LoRA adapters."
    )
    freeze_trainable_layers: int = _key(
        2, "With `finetuning_type: freeze`: train the last N decoder layers (negative: the first |N|)."
    )
    freeze_trainable_modules: str = _key(
        "all", "With `freeze`: comma-separated module names inside the trainable layers (e.g. `mlp,self_attn`), or `all`."
    )
    freeze_extra_modules: str | None = _key(
        None, "With `freeze`: extra top-level modules to train too (e.g. `embed_tokens,lm_head`)."
    )
    lora_rank: int = _key(8, "LoRA rank r.")
    lora_alpha: int | None = _key(None, "LoRA alpha (default: 2 * lora_rank, as LLaMA-Factory).")
    lora_dropout: float = _key(0.0, "Dropout on the LoRA input.")
    lora_target: str = _key(
        "all", "Comma-separated module names that get adapters, or `all` for every linear layer except the LM head."
    )
    additional_target: str | None = _key(
        None, "Comma-separated modules trained fully next to LoRA (e.g. `embed_tokens,lm_head`)."
    )
    use_dora: bool = _key(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = _key(False, "Rank-stabilised LoRA scaling alpha / sqrt(r).")
    adapter_name_or_path: str | None = _key(
        None,
        "A saved LoRA adapter directory (peft) to continue training: loaded onto the base model and trained (needs "
        "finetuning_type: lora; the adapter's own rank, alpha and targets apply).",
    )
    add_tokens: tuple[str, ...] = _key((), "Comma-separated plain tokens added to the tokenizer (embeddings resized).")
    add_special_tokens: tuple[str, ...] = _key(
        (), "Comma-separated special tokens added to the tokenizer (never split; embeddings resized)."
    )
    resize_vocab: bool = _key(
        False,
        "Resize the embeddings (and LM head) to the tokenizer's length, rounded up to a multiple of 64; new rows "
        "start as the mean embedding and train (with LoRA, the embeddings become modules_to_save unless "
        "additional_target is set). On whenever tokens are added.",
    )
    rope_scaling: Literal["linear", "dynamic", "yarn", "llama3"] | None = _key(
        None,
        "RoPE scaling written into the model config before loading (as LLaMA-Factory): factor = "
        "ceil(cutoff_len / the model's max_position_embeddings), which grows to match; no scaling (a notice) "
        "when cutoff_len fits.",
    )
    trust_remote_code: bool = _key(False, "Allow model code shipped inside the model directory.")
    attn_implementation: Literal["auto", "eager", "sdpa"] = _key(
        "auto", "Attention kernel of the HF model when not sequence-parallel and not packed. `auto`: sdpa."
    )
    quantization_bit: int | None = _key(
        None, "Quantize the frozen base with bitsandbytes at load: 4 (QLoRA) or 8 (LLM.int8()); needs "
        "finetuning_type lora (the `quant` extra installs bitsandbytes).")
    quantization_method: Literal["bnb"] = _key("bnb", "Quantization library: only `bnb` (bitsandbytes).")
    quantization_type: Literal["nf4", "fp4"] = _key("nf4", "4-bit data type: `nf4` (QLoRA's NormalFloat) or `fp4`.")
    double_quantization: bool = _key(True, "4-bit: also quantize the quantization constants (QLoRA's double "
                                     "quantization, ~0.37 bit/param saved).")

    def __post_init__(self) -> None:
        _require_finite(self)


@dataclass(frozen=True)
class DataConfig:
    dataset: tuple[str, ...] = _key(
        (),
        "Comma-separated datasets: names in `dataset_dir/dataset_info.json`, paths to .json/.jsonl/.csv/.parquet "
        "files, "
        "or `builtin:NAME` (sft_demo, sharegpt_demo, pt_demo, kv_retrieval). Required.",
    )
    eval_dataset: tuple[str, ...] = _key((), "Datasets for evaluation, same syntax as `dataset`.")
    dataset_dir: str = _key("data", "Folder holding dataset_info.json and relative dataset paths.")
    template: str = _key(
        "auto",
        "Chat template: `auto` (the tokenizer's own chat_template) or a LLaMA-Factory template name, token-identical "
        "with LLaMA-Factory 0.9.5: chatml, deepseek, deepseek3, deepseekr1, default, empty, gemma, gemma3, glm4, "
        "llama2, llama3, mistral, phi, phi4, qwen, qwen2_vl, qwen3, qwen3_nothink, yi. See docs/templates.md.",
    )
    mask_history: bool = _key(
        False, "Train only the last assistant turn of each conversation (earlier replies become prompt)."
    )
    default_system: str | None = _key(
        None, "System prompt for rows without one: replaces a named template's default (e.g. qwen's); with `auto` "
        "it is given to the tokenizer's chat template."
    )
    enable_thinking: bool = _key(
        True,
        "Reasoning templates (qwen3, deepseekr1): a reply without a thought gets an empty "
        "`<think>\\n\\n</think>\\n\\n`, trained when true, part of the prompt when false (which also drops every "
        "thought from the replies).",
    )
    tool_format: str | None = _key(
        None, "Named templates: the tool-call format replacing the template's (default, qwen, llama3, mistral, glm4)."
    )
    cutoff_len: int = _key(2048, "Maximum tokens per example; longer ones are truncated keeping the response.")
    train_on_prompt: bool = _key(False, "Also train on prompt (non-assistant) tokens.")
    max_samples: int | None = _key(None, "Use at most this many rows of each dataset.")
    val_size: float = _key(
        0.0,
        "Hold out this fraction (< 1) or number (>= 1) of training examples for evaluation (with `streaming`: a "
        "number, the first examples of the stream).",
    )
    packing: bool | None = _key(
        None,
        "Pack examples into rows of cutoff_len (best-fit decreasing); attention never crosses documents. "
        "Default: on for `pt`, off otherwise.",
    )
    neftune_noise_alpha: float | None = _key(
        None, "NEFTune: uniform noise on input embeddings in training, scaled by alpha / sqrt(L * d)."
    )
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = _key(
        "concat",
        "How several datasets are combined: concatenated, or interleaved by `interleave_probs` until the first "
        "(`_under`) or the last (`_over`) dataset runs out.",
    )
    interleave_probs: tuple[float, ...] = _key(
        (), "Comma-separated sampling probabilities, one per dataset, for the interleave strategies."
    )
    skip_bad_rows: bool = _key(False, "Skip and count malformed rows instead of stopping at the first one.")
    streaming: bool = _key(
        False,
        "Read, tokenize, mix, pack and shuffle the training data as a stream, a window at a time, for data larger "
        "than memory (sft, pt, dpo, rm, kto). Needs `max_steps`; no cache; every rank reads the stream. See README, "
        "Streaming.",
    )
    buffer_size: int = _key(
        16384,
        "With `streaming`: examples (packed rows when packing) in the shuffle buffer; 1 keeps the stream's order. "
        "Memory grows with buffer_size x example length.",
    )
    packing_buffer: int = _key(
        4096,
        "With `streaming` and packing: documents packed together best-fit-decreasing (a window); larger windows "
        "pack tighter. Each document lands in exactly one row.",
    )
    data_cache_dir: str | None = _key(
        None, "Where tokenized datasets are cached (default $LONGTUNE_CACHE or ~/.cache/longtune/data); keyed by data + tokenizer."
    )
    overwrite_cache: bool = _key(False, "Re-tokenize even if a cached copy exists.")
    tokenized_path: str | None = _key(
        None,
        "A folder of tokenized data (as LLaMA-Factory): if it does not exist, the datasets are tokenized, saved there "
        "(train.npz, eval.npz) and trained on; if it exists, training reads it and does not read `dataset`. A folder "
        "made for another stage, tokenizer or cutoff_len is refused.",
    )
    preprocessing_num_workers: int | None = _key(None, "Accepted for LLaMA-Factory compatibility; ignored.")
    dataloader_num_workers: int | None = _key(None, "Accepted for LLaMA-Factory compatibility; ignored.")

    def __post_init__(self) -> None:
        _require_finite(self)
        check_template_name(self.template)
        check_tool_format(self.tool_format)


@dataclass(frozen=True)
class TrainConfig:
    stage: Literal["sft", "pt", "dpo", "kto", "rm"] = _key(
        "sft",
        "Training objective: `sft` (assistant tokens), `pt` (all tokens), `dpo` (DPO family, see pref_loss), "
        "`kto`, or `rm` (pairwise reward model).",
    )
    do_train: bool = _key(
        True, "`false` with `do_predict: true`: only generate predictions for eval_dataset (as LLaMA-Factory)."
    )
    output_dir: str | None = _key(None, "Run directory (metrics, checkpoints, final model). Required.")
    overwrite_output_dir: bool = _key(False, "Allow writing into a non-empty output_dir that is not being resumed.")
    per_device_train_batch_size: int = _key(1, "Examples per micro-batch on each data-parallel rank.")
    per_device_eval_batch_size: int = _key(1, "Examples per evaluation micro-batch.")
    gradient_accumulation_steps: int = _key(1, "Micro-batches per optimizer step.")
    learning_rate: float = _key(5e-5, "Peak learning rate of AdamW.")
    weight_decay: float = _key(0.0, "AdamW decoupled weight decay.")
    adam_beta1: float = _key(0.9, "AdamW beta1.")
    adam_beta2: float = _key(0.999, "AdamW beta2.")
    adam_epsilon: float = _key(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _key(1.0, "Clip the global gradient norm to this (0 disables clipping).")
    num_train_epochs: float = _key(3.0, "Epochs over the training examples (fractions allowed).")
    max_steps: int = _key(-1, "Stop after this many optimizer steps (overrides num_train_epochs when > 0).")
    lr_scheduler_type: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr", "cosine_with_restarts",
        "polynomial"
    ] = _key("cosine", "Learning-rate schedule after warmup (Hugging Face's formulas).")
    min_lr_rate: float = _key(0.1, "With `cosine_with_min_lr`: final lr as a fraction of the peak.")
    lr_scheduler_kwargs: dict[str, float] | None = _key(
        None,
        "Arguments of the schedule, as in Hugging Face: `num_cycles` (cosine: 0.5; cosine_with_restarts: 1), "
        "`power` (polynomial: 1.0), `lr_end` (polynomial: 1e-7), `min_lr_rate`/`min_lr` (cosine_with_min_lr).",
    )
    optim: Literal[
        "adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"
    ] = _key(
        "adamw_torch",
        "Optimizer: AdamW (torch; fused on GPU either way), SGD (lr, weight_decay), Adafactor (torch.optim), or "
        "bitsandbytes' 8-bit / paged AdamW (needs bitsandbytes).",
    )
    tf32: bool | None = _key(None, "Allow TF32 matmuls and cuDNN convolutions on Ampere+ GPUs (null: torch's default).")
    warmup_ratio: float = _key(0.0, "Warmup steps as a fraction of the total steps.")
    warmup_steps: int = _key(0, "Warmup steps (overrides warmup_ratio when > 0).")
    seed: int = _key(42, "Seed for data order, initialisation of adapters, and dropout.")
    gradient_checkpointing: bool = _key(True, "Recompute decoder-layer activations in backward to save memory.")
    gradient_checkpointing_policy: Literal["full", "selective"] = _key(
        "full",
        "With gradient_checkpointing: `full` recomputes each decoder layer whole in backward; `selective` keeps the "
        "matmul and attention outputs of the forward and recomputes only the cheap elementwise ops (more memory, "
        "less recompute).",
    )
    offload_activations: bool = _key(
        False, "With gradient_checkpointing on a GPU: keep the checkpointed layer inputs in pinned host memory."
    )
    tiled_mlp_tokens: int | None = _key(
        None, "Run each MLP over tiles of this many tokens with recomputation (never T x intermediate at once)."
    )
    loss_chunk_size: int = _key(
        1024,
        "Tokens per chunk of the LM head + loss; full-sequence logits are never materialised (one fp32 chunk x "
        "vocab at a time, turned into its own gradient in place).",
    )
    logging_steps: int = _key(10, "Write a metrics.jsonl row every N optimizer steps (and the first and last).")
    save_steps: int = _key(500, "Save a checkpoint every N optimizer steps (0: only at the end).")
    save_strategy: Literal["steps", "epoch", "no"] = _key(
        "steps",
        "When checkpoints are saved: every save_steps (`steps`), at the end of every epoch (`epoch`), or never "
        "(`no`; final/ is still written). The last step always saves unless `no`.",
    )
    save_total_limit: int | None = _key(None, "Keep only the newest N checkpoints.")
    save_only_model: bool = _key(False, "Checkpoints hold only the model (no optimizer/scheduler/RNG; cannot resume).")
    eval_steps: int | None = _key(None, "Evaluate every N optimizer steps (default: logging_steps) when eval data exists.")
    eval_strategy: Literal["no", "steps", "epoch"] = _key(
        "steps", "When to evaluate if eval data exists (`no` disables)."
    )
    resume_from_checkpoint: str | bool | None = _key(
        None, "`true`: resume from the newest complete checkpoint in output_dir; or a checkpoint path."
    )
    plot_loss: bool = _key(False, "Write loss.png (training and eval loss) at the end.")
    report_to: tuple[Literal["none", "all", "tensorboard", "wandb"], ...] = _key(
        ("none",),
        "Also log to: `tensorboard` (`output_dir/runs`), `wandb` (needs wandb; offline with WANDB_MODE=offline), "
        "a list of those, `all` (every one installed) or `none`.",
    )
    run_name: str | None = _key(None, "The run's name in wandb (default: the output_dir's name).")
    project: str = _key("huggingface", "The wandb project (as transformers' `project`; env WANDB_PROJECT wins).")
    disable_tqdm: bool = _key(False, "Hide the progress bar.")
    ddp_timeout: int = _key(1800, "Seconds before a collective is declared hung.")

    def __post_init__(self) -> None:
        _require_finite(self)

        def fail(key: str, expected: str) -> None:
            raise ConfigError(f"key '{key}' must be {expected}, got {getattr(self, key)}")

        if self.learning_rate <= 0:
            fail("learning_rate", "> 0")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                fail(key, "in [0, 1)")
        if self.adam_epsilon <= 0:
            fail("adam_epsilon", "> 0")
        if not 0.0 <= self.min_lr_rate <= 1.0:
            fail("min_lr_rate", "in [0, 1]")
        if not 0 <= self.seed < 2**32:
            fail("seed", "in [0, 2**32)")  # numpy's seed range
        if self.ddp_timeout <= 0:
            fail("ddp_timeout", "> 0 seconds")


@dataclass(frozen=True)
class ParallelConfig:
    sequence_parallel_size: int = _key(
        1, "Ranks one sequence is split over; must divide the number of processes (the rest is data parallel)."
    )
    sequence_parallel_mode: Literal["auto", "zigzag_ring", "ulysses", "llama3", "hybrid"] = _key(
        "auto", "How attention is computed across the sequence-parallel group."
    )
    tensor_parallel_size: int = _key(
        1,
        "Ranks each layer's attention heads and MLP are split over (Megatron-style tensor parallelism, innermost: a "
        "TP group sits on one node). The world size must be data x sequence x tensor parallel degrees.",
    )
    attention_kernel: Literal["auto", "fused", "math"] = _key(
        "auto",
        "Block kernel of the SP / packed attention: `auto`/`fused` use PyTorch's SDPA kernels with log-sum-exp "
        "(flash or memory-efficient on GPU, flash on CPU); `math` the pure-PyTorch reference.",
    )
    fsdp: bool | None = _key(
        None,
        "Shard parameters, gradients and optimizer state over all processes with FSDP2 (ZeRO-3). "
        "null: on whenever more than one process runs.",
    )
    offload_params: bool = _key(
        False,
        "Keep parameters, gradients and optimizer state in CPU memory (FSDP2 CPU offload; the optimizer steps on "
        "the CPU). Works on one process too (FSDP2 at world size 1): a big model on one GPU.",
    )
    gradient_sync_every_micro_batch: bool = _key(
        True,
        "With FSDP and gradient_accumulation_steps > 1: reduce-scatter gradients after every micro-batch, so only "
        "sharded gradients persist. false: reduce once per optimizer step (less communication), but every GPU "
        "keeps unsharded fp32 gradients of the whole model until then (4 bytes per parameter).",
    )
    deepspeed: str | None = _key(
        None, "A DeepSpeed ZeRO json (as LLaMA-Factory examples use); mapped onto FSDP2 with a printed notice."
    )

    def __post_init__(self) -> None:
        _require_finite(self)


@dataclass(frozen=True)
class PreferenceConfig:
    pref_beta: float = _key(0.1, "Beta of the DPO-family and KTO losses (for ORPO: the weight of the odds-ratio term).")
    pref_loss: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = _key(
        "sigmoid", "Preference loss of `stage: dpo`: DPO (sigmoid), IPO, SLiC hinge, SimPO or ORPO (no reference)."
    )
    pref_ftx: float = _key(0.0, "Weight of an added SFT loss (mean token NLL of the chosen response).")
    dpo_label_smoothing: float = _key(0.0, "Conservative-DPO label smoothing in [0, 0.5) (sigmoid loss only).")
    simpo_gamma: float = _key(0.5, "SimPO target reward margin gamma: -log sigmoid(beta*avg_c - beta*avg_r - gamma).")
    kto_chosen_weight: float = _key(1.0, "KTO weight of desirable examples.")
    kto_undesirable_weight: float = _key(1.0, "KTO weight of undesirable examples.")
    ref_model: str | None = _key(
        None,
        "Reference model directory for dpo/kto. Default: the base model with adapters disabled (LoRA), or a "
        "frozen copy of the initial model (full/freeze).",
    )
    precompute_ref_log_probs: bool = _key(
        False,
        "Compute all reference log-probs in a first pass (cached on disk) and train without a reference model in memory.",
    )

    def __post_init__(self) -> None:
        _require_finite(self)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding of `longtune predict`, `do_predict` and `longtune chat`, with LLaMA-Factory's key names and defaults
    (its GeneratingArguments: sampling is on unless `do_sample: false`)."""

    do_predict: bool = _key(
        False, "After training, generate for `eval_dataset` with the final model (as `longtune predict`)."
    )
    predict_with_generate: bool = _key(
        True, "Accepted for LLaMA-Factory compatibility; predictions are always generated."
    )
    do_sample: bool = _key(True, "Sample the next token; `false`: greedy decoding (or beam search with num_beams > 1).")
    temperature: float = _key(0.95, "Sampling temperature.")
    top_p: float = _key(0.7, "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.")
    top_k: int = _key(50, "Keep the top_k most probable tokens when sampling (0: no limit).")
    num_beams: int = _key(1, "Beam search width (1: no beam search).")
    max_new_tokens: int = _key(1024, "Tokens generated at most per reply.")
    repetition_penalty: float = _key(1.0, "Penalty on tokens already present (1.0: none).")
    skip_special_tokens: bool = _key(True, "Remove special tokens when decoding predictions.")

    def __post_init__(self) -> None:
        _require_finite(self)

        def fail(key: str, expected: str) -> None:
            raise ConfigError(f"key '{key}' must be {expected}, got {getattr(self, key)}")

        if self.temperature <= 0:
            fail("temperature", "> 0 (for greedy decoding set do_sample: false)")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "in (0, 1]")
        if self.top_k < 0:
            fail("top_k", ">= 0")
        if self.num_beams < 1:
            fail("num_beams", ">= 1")
        if self.max_new_tokens < 1:
            fail("max_new_tokens", ">= 1")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "> 0")


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    parallel: ParallelConfig
    preference: PreferenceConfig
    # What LLaMA-Factory-only keys were taken as (lf_keys.translate_lf_keys); printed once by `longtune train`.
    notices: tuple[str, ...] = ()
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def to_flat_dict(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for group_name in GROUPS:
            for f in dataclasses.fields(GROUPS[group_name]):
                value = getattr(getattr(self, group_name), f.name)
                flat[f.name] = ",".join(map(str, value)) if isinstance(value, tuple) else value
        return flat

    @property
    def reporters(self) -> frozenset[str]:
        """The loggers of `report_to` besides metrics.jsonl: `all` is every one that is installed."""
        wanted = set(self.train.report_to) - {"none"}
        if "all" in wanted:
            import importlib.util

            wanted = {name for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb"))
                      if importlib.util.find_spec(module) is not None}
        return frozenset(wanted)

    @property
    def packing(self) -> bool:
        """`packing` as given, else on for pretraining (as LLaMA-Factory)."""
        from longtune.stages import stage_class

        if self.data.packing is not None:
            return bool(self.data.packing)
        return stage_class(self.train.stage).packs_by_default

    @property
    def compute_dtype(self) -> str:
        """The resolved dtype name (float32 when `auto` without bf16/fp16)."""
        if self.model.dtype != "auto":
            return self.model.dtype
        if self.model.bf16:
            return "bfloat16"
        if self.model.fp16:
            return "float16"
        return "float32"


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "preference": PreferenceConfig,
    "generation": GenerationConfig,
}
KEY_TO_GROUP: dict[str, str] = {f.name: g for g, cls in GROUPS.items() for f in dataclasses.fields(cls)}



def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return "comma-separated list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Convert a YAML value to the field type or raise ConfigError naming the key."""
    origin = get_origin(tp)
    bad = ConfigError(f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg, source)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value is False and "no" in get_args(tp):  # YAML 1.1 reads a bare `no` as false
            return "no"
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"{source}: key '{key}' must be one of {', '.join(map(str, get_args(tp)))}; got {value!r}{hint}"
        )
    if origin is dict:
        if isinstance(value, str):  # transformers also takes a JSON string here
            try:
                value = json.loads(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        return {k: _coerce(f"{key}.{k}", v, get_args(tp)[1], source) for k, v in value.items()}
    if origin is tuple:
        item_type = get_args(tp)[0]
        if value is None:  # LLaMA-Factory writes `interleave_probs: null` for "none given"
            return ()
        if isinstance(value, str):
            items: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and item_type is float:
            items = [value]
        else:
            raise bad
        return tuple(_coerce(key, v, item_type, source) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "5e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def coerce_key(key: str, value: Any, source: str) -> Any:
    """One flat key's value converted to its field's type, as `build_config` does (unknown key: ConfigError with
    the closest key), for commands that take a few keys without a whole config (`longtune chat`)."""
    if key not in KEY_TO_GROUP:
        close = difflib.get_close_matches(key, list(KEY_TO_GROUP), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else " (see docs/config.md for all keys)"
        raise ConfigError(f"{source}: unknown key '{key}'{hint}")
    return _coerce(key, value, typing.get_type_hints(GROUPS[KEY_TO_GROUP[key]])[key], source)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is parsed as a YAML scalar (so 1e-4, true, null work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def build_config(values: dict[str, Any], source: str = "config", sources: dict[str, str] | None = None) -> Config:
    """Validate a flat key->value mapping into a Config; every problem is a one-line ConfigError naming where the
    key came from (`sources`: key -> "command line" or a file, default `source`)."""
    from longtune.lf_keys import translate_lf_keys

    sources = sources or {}
    values, notices = translate_lf_keys(values, frozenset(KEY_TO_GROUP), lambda key: sources.get(key, source))
    grouped: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    resolved_hints: dict[str, Any] = {}
    for cls in GROUPS.values():
        resolved_hints.update(typing.get_type_hints(cls))
    for key, value in values.items():
        if key not in KEY_TO_GROUP:
            close = difflib.get_close_matches(key, list(KEY_TO_GROUP), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else " (see docs/config.md for all keys)"
            raise ConfigError(f"{sources.get(key, source)}: unknown key '{key}'{hint}")
        grouped[KEY_TO_GROUP[key]][key] = _coerce(key, value, resolved_hints[key], sources.get(key, source))
    built = {}
    for g in GROUPS:
        try:
            built[g] = GROUPS[g](**grouped[g])
        except ConfigError as exc:  # a group's own range check: say where its key came from
            text = str(exc)
            named = text.split(":", 1)[0]  # "template: ..." names its key first; "key 'x' ..." quotes it
            key = named if named in KEY_TO_GROUP else text.split("'")[1] if "'" in text else ""
            raise ConfigError(f"{sources.get(key, source)}: {exc}") from None
    config = Config(**built, notices=notices)
    validate(config, source, sources)
    return config


def validate(cfg: Config, source: str, sources: dict[str, str] | None = None) -> None:
    """Checks that need more than one key's type."""
    m, d, t, p = cfg.model, cfg.data, cfg.train, cfg.parallel

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{(sources or {}).get(key, source)}: key '{key}' {why}")

    if not m.model_name_or_path:
        fail("model_name_or_path", "is required (a local model directory or builtin:tiny)")
    if not d.dataset and t.do_train:
        fail("dataset", "is required (e.g. `dataset: builtin:sft_demo`)")
    if not t.do_train and not cfg.generation.do_predict:
        fail("do_train", "is false, so do_predict must be true (there is nothing else to run)")
    if cfg.generation.do_predict and not d.eval_dataset:
        fail("do_predict", "needs eval_dataset (the rows whose replies are generated)")
    if not t.output_dir:
        fail("output_dir", "is required (the run directory)")
    if m.bf16 and m.fp16:
        fail("bf16", "and 'fp16' cannot both be true")
    if m.dtype != "auto" and (m.bf16 or m.fp16):
        wanted = "bfloat16" if m.bf16 else "float16"
        if m.dtype != wanted:
            fail("dtype", f"is {m.dtype} but {'bf16' if m.bf16 else 'fp16'}: true asks for {wanted}")
    if m.quantization_bit is not None:
        if m.quantization_bit not in (4, 8):
            fail("quantization_bit", f"must be 4 or 8 (bitsandbytes), got {m.quantization_bit}")
        if m.finetuning_type != "lora":
            fail("quantization_bit", f"needs finetuning_type: lora (a quantized base cannot be trained; got "
                                     f"{m.finetuning_type})")
        if cfg.compute_dtype == "float64":
            fail("quantization_bit", "cannot compute in float64 (bitsandbytes kernels: float32, bfloat16, float16)")
    if m.lora_rank <= 0:
        fail("lora_rank", f"must be > 0, got {m.lora_rank}")
    if not 0.0 <= m.lora_dropout < 1.0:
        fail("lora_dropout", f"must be in [0, 1), got {m.lora_dropout}")
    if m.use_dora and m.finetuning_type != "lora":
        fail("use_dora", "needs finetuning_type: lora")
    if d.cutoff_len <= 1:
        fail("cutoff_len", f"must be > 1, got {d.cutoff_len}")
    if d.max_samples is not None and d.max_samples <= 0:
        fail("max_samples", f"must be > 0, got {d.max_samples}")
    if d.val_size < 0:
        fail("val_size", f"must be >= 0, got {d.val_size}")
    if d.val_size >= 1 and not float(d.val_size).is_integer():
        fail("val_size", f"must be a fraction < 1 or a whole number of examples, got {d.val_size}")
    if d.neftune_noise_alpha is not None and d.neftune_noise_alpha < 0:
        fail("neftune_noise_alpha", f"must be >= 0, got {d.neftune_noise_alpha}")
    if d.mix_strategy != "concat":
        if len(d.interleave_probs) not in (0, len(d.dataset)):
            fail("interleave_probs", f"needs one probability per dataset ({len(d.dataset)}), got {len(d.interleave_probs)}")
        if d.interleave_probs and (min(d.interleave_probs) < 0 or abs(sum(d.interleave_probs) - 1.0) > 1e-6):
            fail("interleave_probs", f"must be >= 0 and sum to 1, got {list(d.interleave_probs)}")
    elif d.interleave_probs:
        fail("interleave_probs", "needs mix_strategy: interleave_under or interleave_over")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "loss_chunk_size"):
        if getattr(t, key) <= 0:
            fail(key, f"must be > 0, got {getattr(t, key)}")
    for key in ("weight_decay", "max_grad_norm", "warmup_steps", "save_steps"):
        if getattr(t, key) < 0:
            fail(key, f"must be >= 0, got {getattr(t, key)}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        fail("warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        fail("num_train_epochs", "must be > 0 when max_steps is not set")
    if t.gradient_checkpointing_policy != "full":
        if not t.gradient_checkpointing:
            fail("gradient_checkpointing_policy", "needs gradient_checkpointing: true")
        if t.offload_activations:
            fail("gradient_checkpointing_policy", "selective cannot be combined with offload_activations (the kept "
                                                  "matmul outputs stay on the GPU); use full or turn the offload off")
        if t.tiled_mlp_tokens is not None:
            fail("gradient_checkpointing_policy", "selective cannot be combined with tiled_mlp_tokens (it would keep "
                                                  "every tile's matmul outputs); use full or turn the tiling off")
    if t.offload_activations and not t.gradient_checkpointing:
        fail("offload_activations", "needs gradient_checkpointing: true (it offloads the checkpointed inputs)")
    if t.tiled_mlp_tokens is not None and t.tiled_mlp_tokens <= 0:
        fail("tiled_mlp_tokens", f"must be > 0, got {t.tiled_mlp_tokens}")
    if t.eval_steps is not None and t.eval_steps <= 0:
        fail("eval_steps", f"must be > 0, got {t.eval_steps}")
    if t.save_total_limit is not None and t.save_total_limit <= 0:
        fail("save_total_limit", f"must be > 0, got {t.save_total_limit}")
    from longtune.stages import stage_class

    stage = stage_class(t.stage)
    pref = cfg.preference
    if stage.needs_pref_beta and pref.pref_beta <= 0:
        fail("pref_beta", f"must be > 0, got {pref.pref_beta}")
    if not 0.0 <= pref.dpo_label_smoothing < 0.5:
        fail("dpo_label_smoothing", f"must be in [0, 0.5), got {pref.dpo_label_smoothing}")
    if pref.dpo_label_smoothing and pref.pref_loss != "sigmoid":
        fail("dpo_label_smoothing", f"applies to pref_loss: sigmoid only, not {pref.pref_loss}")
    if pref.ref_model is not None and not Path(pref.ref_model).is_dir() and not pref.ref_model.startswith("builtin:"):
        fail("ref_model", f"'{pref.ref_model}' is not a local model directory")
    if d.buffer_size < 1:
        fail("buffer_size", f"must be >= 1 (1: no shuffling), got {d.buffer_size}")
    if d.packing_buffer < 1:
        fail("packing_buffer", f"must be >= 1, got {d.packing_buffer}")
    if d.streaming:
        if t.max_steps <= 0:
            fail("max_steps", "must be > 0 with streaming: true (the stream's length is not known in advance)")
        if 0 < d.val_size < 1:
            fail("val_size", f"must be a whole number of examples with streaming: true (a fraction needs the "
                             f"stream's length), got {d.val_size}")
        if cfg.preference.precompute_ref_log_probs:
            fail("precompute_ref_log_probs", "cannot be used with streaming: true (reference tables are indexed "
                                             "by example over the whole dataset)")
    if d.packing and stage.docs_per_row > 1:
        fail("packing", f"stage {t.stage} already packs each pair into one row; remove packing")
    if "none" in t.report_to and len(t.report_to) > 1:
        fail("report_to", f"cannot combine none with {', '.join(r for r in t.report_to if r != 'none')}")
    if t.lr_scheduler_kwargs:
        allowed = {"cosine": {"num_cycles"}, "cosine_with_restarts": {"num_cycles"},
                   "polynomial": {"power", "lr_end"}, "cosine_with_min_lr": {"num_cycles", "min_lr_rate", "min_lr"}}
        extra = set(t.lr_scheduler_kwargs) - allowed.get(t.lr_scheduler_type, set())
        if extra:
            fail("lr_scheduler_kwargs", f"has {', '.join(sorted(extra))}, which lr_scheduler_type: "
                 f"{t.lr_scheduler_type} does not take (it takes: {', '.join(sorted(allowed.get(t.lr_scheduler_type, ()))) or 'nothing'})")
    if d.tokenized_path is not None and d.streaming:
        fail("tokenized_path", "cannot be used with streaming: true (a stream is never stored whole)")
    if m.adapter_name_or_path is not None:
        if m.finetuning_type != "lora":
            fail("adapter_name_or_path", f"needs finetuning_type: lora, got {m.finetuning_type}")
        if "," in m.adapter_name_or_path:
            fail("adapter_name_or_path", "takes one adapter directory (merge earlier ones with `longtune export "
                                         "--merge-lora` first)")
        if not (Path(m.adapter_name_or_path) / "adapter_config.json").is_file():
            fail("adapter_name_or_path", f"'{m.adapter_name_or_path}' is not a peft adapter directory (no "
                                         "adapter_config.json)")
    if p.sequence_parallel_size < 1:
        fail("sequence_parallel_size", f"must be >= 1, got {p.sequence_parallel_size}")
    if p.tensor_parallel_size < 1:
        fail("tensor_parallel_size", f"must be >= 1, got {p.tensor_parallel_size}")
    if p.tensor_parallel_size > 1 and m.use_dora:
        fail("tensor_parallel_size", "cannot split DoRA adapters (their magnitude vector spans the whole weight); "
                                     "use plain LoRA (use_dora: false) or tensor_parallel_size: 1")
    if p.tensor_parallel_size > 1 and m.quantization_bit is not None:
        fail("tensor_parallel_size", "cannot split a quantized base (a 4/8-bit weight is only meaningful with its "
                                     "per-block constants); use tensor_parallel_size: 1 with quantization_bit")
    if p.deepspeed and not Path(p.deepspeed).is_file():
        fail("deepspeed", f"file '{p.deepspeed}' does not exist")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice (plain YAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice (first on line "
                              f"{seen[key]}); keep one")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml_file(path: str | os.PathLike[str]) -> Any:
    """A YAML file's content, or a one-line ConfigError naming the file (missing, a folder, not UTF-8, bad YAML,
    duplicate keys)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; give the YAML file inside it")
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 (byte 0x{p.read_bytes()[exc.start]:02x} at offset "
                          f"{exc.start}); save the file as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path} {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (may be None), apply `key=value` overrides and validate."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    source = str(path) if path is not None else "command line"
    if path is not None:
        loaded = read_yaml_file(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must be a mapping of key: value, got {type(loaded).__name__}")
        values.update(loaded)
    for text in overrides or []:
        key, value = parse_override(text)
        values[key] = value
        sources[key] = "command line"
    return build_config(values, source, sources)


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_flat_dict(), sort_keys=False))
