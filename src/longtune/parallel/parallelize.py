"""The one place a model is made ready to run: load -> finetuning -> dtype policy -> tensor parallel -> tiled MLP
-> activation checkpointing -> SP attention -> FSDP. The trainer's policy, the live reference model and the
benchmark all go through `parallelize`, so they cannot drift apart."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from longtune.config import Config, ModelConfig
from longtune.models.loader import (RopeScaling, apply_finetuning, decoder_layer_list, is_quantized_parameter,
                                    load_model, quantize_base, unwrap_base)
from longtune.parallel.activation import apply_tiled_mlp, enable_checkpointing
from longtune.parallel.fsdp import RootForward, ShardingPlan, apply_fsdp
from longtune.parallel.mesh import ParallelDims
from longtune.parallel.sequence import SequenceParallel
from longtune.parallel.tensor import apply_tensor_parallel, split_vocabulary_head

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ModelRecipe:
    """What is applied to a loaded model, in `parallelize`'s fixed order."""

    dtype: torch.dtype  # the compute dtype
    sharding: ShardingPlan
    finetuning: ModelConfig | None = None  # mark trainable parameters (None: leave requires_grad as it is)
    tiled_mlp_tokens: int | None = None
    gradient_checkpointing: bool = False
    offload_activations: bool = False
    rope: RopeScaling | None = None  # RoPE scaling written into the model config before loading (every copy)
    gradient_checkpointing_policy: str = "full"  # activation.CheckpointPolicyName

    @classmethod
    def for_training(cls, cfg: Config, dtype: torch.dtype, sharding: ShardingPlan) -> ModelRecipe:
        t = cfg.train
        return cls(dtype, sharding, cfg.model, t.tiled_mlp_tokens, t.gradient_checkpointing, t.offload_activations,
                   RopeScaling.from_config(cfg.model.rope_scaling, cfg.data.cutoff_len), t.gradient_checkpointing_policy)


@dataclass
class ParallelModel:
    model: nn.Module  # the (possibly peft-wrapped) model inside `root`
    root: RootForward  # what stages run in (FSDP's root module when sharded)
    forward_context: Callable[[], Any]  # wrap each training forward in it (activation offload fallback)


def parallelize(model: nn.Module, recipe: ModelRecipe, dims: ParallelDims, sequence: SequenceParallel,
                log: Callable[[str], None] = print) -> ParallelModel:
    """Apply the recipe to a loaded model and place it on this rank's device (sharded under FSDP)."""
    if recipe.finetuning is not None:
        model = apply_finetuning(model, recipe.finetuning)
    # bf16: frozen weights stay bf16; trainable weights are fp32 masters, compute runs in bf16 (FSDP's
    # MixedPrecisionPolicy, or autocast on one process), as LLaMA-Factory does outside pure_bf16. FSDP shards
    # every parameter in one dtype, so under FSDP the frozen ones become fp32 as well.
    if recipe.dtype in LOW_PRECISION:
        for p in model.parameters():
            if is_quantized_parameter(p):
                continue  # packed 4-bit / int8 storage: its layer computes in the compute dtype itself
            if p.requires_grad or recipe.sharding.enabled:
                p.data = p.data.float()
    if dims.tp > 1:
        # On the plain HF module names, before the wrappers below (tiling and checkpointing keep the split
        # projections as their children); FSDP then shards over dp x sp with tp as each parameter's inner dim.
        apply_tensor_parallel(decoder_layer_list(model)[1], dims.tp_mesh)
        vocab = split_vocabulary_head(unwrap_base(model), dims.tp_mesh)
        log(f"tensor parallel: tp={dims.tp}, q/k/v/gate/up column-wise, o/down row-wise, "
            f"{int(unwrap_base(model).config.num_attention_heads) // dims.tp} attention heads per rank, LM head "
            f"{'split by vocabulary' if vocab else 'replicated'}")
    if recipe.tiled_mlp_tokens:
        tiled = apply_tiled_mlp(model, recipe.tiled_mlp_tokens)
        log(f"tiled MLP: {tiled} layers, {recipe.tiled_mlp_tokens} tokens per tile")
    forward_context: Callable[[], Any] = contextlib.nullcontext
    if recipe.gradient_checkpointing:
        forward_context = enable_checkpointing(model, recipe.offload_activations,
                                               recipe.gradient_checkpointing_policy)
    sequence.apply(model, log)
    root = RootForward(model)
    if recipe.sharding.enabled:
        apply_fsdp(root, dims, decoder_layer_list(model)[1], recipe.dtype, recipe.sharding)
        if not recipe.sharding.offload:
            root.to(dims.device)
    else:
        root.to(dims.device)
    return ParallelModel(model, root, forward_context)


def build_model(model_cfg: ModelConfig, task: str, recipe: ModelRecipe, dims: ParallelDims,
                sequence: SequenceParallel, log: Callable[[str], None] = print,
                frozen: bool = False) -> ParallelModel:
    """Load `model_cfg`'s weights with the head of `task` and parallelize them; `frozen`: a reference model."""
    model = load_model(model_cfg, recipe.dtype, task=task, rope=recipe.rope, log=log)
    if model_cfg.quantization_bit is not None:
        count = quantize_base(model, model_cfg, recipe.dtype, dims.device)
        kind = f"4-bit {model_cfg.quantization_type}" + (" + double quantization" if model_cfg.double_quantization
                                                          else "") if model_cfg.quantization_bit == 4 else "8-bit"
        log(f"quantized base: {count} linear layers to {kind} (bitsandbytes), compute in {recipe.dtype}")
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)
    return parallelize(model, recipe, dims, sequence, log)
