"""Tensor parallelism (Megatron-style, with DTensor): each decoder layer's q/k/v and gate/up projections are split
column-wise (by output features, so by attention head and by MLP channel) over the tp group, o and down row-wise
(by input features), with one all-reduce after each row-wise projection. The HF model itself is untouched.

Attention sees local tensors on its local heads (`use_local_output=True`): the HF attention of these families
reshapes the projections with -1 heads and uses the config's head counts only for their ratio (num_key_value_groups),
which a split of both by tp keeps. The LM head (and a tied embedding) is split by vocabulary where it can be
(`split_vocabulary_head`). Everything else outside the projections (norms, an untied embedding) is replicated over
the tp group and gets the same, complete gradient on every tp rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor import Replicate

from longtune.errors import ConfigError

KEY = "tensor_parallel_size"
# Families whose decoder layers name their projections self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj as
# separate nn.Linear layers. Phi-3 fuses qkv_proj and gate_up_proj (a column split of the fused weight would
# mix q with k), so it needs its own plan and is refused for now.
TP_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2")
COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")
# Per-head norms (Qwen3's q_norm / k_norm over head_dim, applied to [B, T, heads, head_dim]): one weight shared by
# all heads, so each tp rank's gradient covers only its local heads. They become replicated DTensors fed inputs
# sharded on the heads dimension, and DTensor sums their weight gradient over the tp group.
HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
HEADS_DIM = 2


@dataclass(frozen=True)
class TensorParallelPlan:
    """Per decoder layer: the module paths (relative to the layer) split column-wise and row-wise."""

    colwise: tuple[str, ...]
    rowwise: tuple[str, ...]
    head_norms: tuple[str, ...] = ()


def check_tensor_parallel(model_config, tp: int) -> None:
    """One-line errors, before any weight loads: an architecture without a plan, or head / MLP counts that tp
    does not divide."""
    if tp == 1:
        return
    model_type = str(getattr(model_config, "model_type", "?"))
    if model_type not in TP_FAMILIES:
        raise ConfigError(f"key '{KEY}': no tensor-parallel plan for model_type '{model_type}' (supported: "
                          f"{', '.join(TP_FAMILIES)}); use {KEY}: 1")
    heads = int(model_config.num_attention_heads)
    kv_heads = int(getattr(model_config, "num_key_value_heads", None) or heads)
    intermediate = int(model_config.intermediate_size)
    for what, count in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                        ("intermediate_size", intermediate)):
        if count % tp:
            raise ConfigError(f"key '{KEY}': {tp} does not divide the model's {what} ({count}); use a degree "
                              f"that divides {what} and num_key_value_heads")


def plan_for(layer: nn.Module) -> TensorParallelPlan:
    """The plan of one decoder layer, found from its module names; a one-line error when they are not there."""
    names = {name for name, _ in layer.named_modules()}
    missing = [path for path in COLWISE + ROWWISE if path not in names]
    if missing:
        raise ConfigError(f"key '{KEY}': decoder layer {type(layer).__name__} has no {', '.join(missing)}; no "
                          f"tensor-parallel plan fits it (use {KEY}: 1)")
    return TensorParallelPlan(COLWISE, ROWWISE, tuple(path for path in HEAD_NORMS if path in names))


def _layer_plan(layer: nn.Module, plan: TensorParallelPlan) -> dict[str, object]:
    """parallelize_module's plan for one layer. A LoRA-wrapped projection (peft's lora.Linear) splits its base
    layer as planned; of the adapter, the factor on the split side is split the same way and the other one is
    replicated: colwise base -> lora_B colwise (its rows are the output features), lora_A whole; rowwise base ->
    lora_A rowwise (its columns are the input features), lora_B whole. The adapter's output then has the
    base's layout (local output shard, or the all-reduced whole), and the replicated factor's gradient arrives
    complete through DTensor's reduction of the split factor's input gradient."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    styles: dict[str, object] = {path: SequenceParallel(sequence_dim=HEADS_DIM, use_local_output=True)
                                 for path in plan.head_norms}
    for paths, style, adapter_factor in ((plan.colwise, ColwiseParallel, "lora_B"),
                                         (plan.rowwise, RowwiseParallel, "lora_A")):
        for path in paths:
            module = layer.get_submodule(path)
            if hasattr(module, "base_layer"):  # (DoRA is refused by the config checks)
                styles[f"{path}.base_layer"] = style()
                for adapter in getattr(module, adapter_factor, {}):
                    styles[f"{path}.{adapter_factor}.{adapter}"] = style()
            elif isinstance(module, nn.Linear):
                styles[path] = style()
            else:
                raise ConfigError(f"key '{KEY}': {path} is a {type(module).__name__}, not a linear layer; no "
                                  f"tensor-parallel plan fits it (use {KEY}: 1)")
    return styles


def apply_tensor_parallel(layers: nn.ModuleList, tp_mesh) -> None:
    """Split every decoder layer over `tp_mesh` (parameters become DTensors on it; inputs and outputs of each
    layer stay plain, replicated tensors)."""
    from torch.distributed.tensor.parallel import parallelize_module

    for layer in layers:
        # SequenceParallel re-creates the norms' parameters as trainable; keep what finetuning decided.
        frozen = {name for name, p in layer.named_parameters() if not p.requires_grad}
        parallelize_module(layer, tp_mesh, _layer_plan(layer, plan_for(layer)))
        for name, p in layer.named_parameters():
            if name in frozen:
                p.requires_grad_(False)


def split_vocabulary_head(model: nn.Module, tp_mesh) -> bool:
    """Make the LM head vocab-parallel: its weight a DTensor split by vocabulary rows over `tp_mesh`, so the
    chunked loss (losses/causal_lm.py) computes each rank's slice of the logits and no rank holds full-vocabulary
    logits or the whole head. A head tied to the input embedding splits the embedding the same way (a row-wise
    embedding lookup: each rank looks up its rows, an all-reduce adds them) and stays tied.

    Only a plain bias-free nn.Linear head whose vocabulary tp divides is split; anything else (a reward head, a
    LoRA-wrapped or trained-beside-LoRA head, an odd vocabulary) stays replicated. Returns whether it split."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tp = tp_mesh.size()
    if type(head) is not nn.Linear or head.bias is not None or head.out_features % tp:
        return False
    embedding = model.get_input_embeddings()
    tied = embedding is not None and embedding.weight is head.weight
    if tied:
        if type(embedding) is not nn.Embedding:
            return False
        parallelize_module(embedding, tp_mesh, RowwiseParallel(input_layouts=Replicate(), use_local_output=True))
        head.weight = embedding.weight
    else:
        head.weight = nn.Parameter(distribute_tensor(head.weight, tp_mesh, [Shard(0)]),
                                   requires_grad=head.weight.requires_grad)
    return True
