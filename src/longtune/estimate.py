"""`longtune estimate CONFIG.yaml`: predicted peak memory per GPU of a training config, broken down, and the
smallest sequence-parallel degree that fits a given GPU memory.

The whole model is `estimate_memory` (one function, documented term by term); docs/benchmarks.md compares it
with the live tensor bytes `longtune bench --tensor-memory` measures.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field, replace

from longtune.errors import ConfigError

GIB = 2**30
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
# A configuration "fits" when its estimate is at most this share of the GPU memory: the rest is for what the
# estimate leaves out (allocator fragmentation, the CUDA context, NCCL buffers).
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """One Qwen2/Llama decoder layer: q, k, v (with biases, as Qwen2), o, gate/up/down, two RMSNorms."""
        h, kv = self.hidden_size, self.kv_size
        return 2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * self.intermediate_size + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        head = 0 if self.tied_embeddings else self.embedding_params
        return self.num_layers * self.layer_params + self.embedding_params + head + self.hidden_size

    @classmethod
    def from_hf_config(cls, config) -> "ModelShape":
        heads = int(config.num_attention_heads)
        return cls(
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            intermediate_size=int(config.intermediate_size),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class TrainSetup:
    """What besides the model shape decides the memory of one training process."""

    tokens: int  # tokens of one row (the whole sequence, before SP splits it)
    batch_size: int = 1
    sp: int = 1
    world_size: int = 1
    fsdp: bool = False
    dtype: str = "float32"  # compute dtype; bf16/fp16 keep fp32 masters of trainable weights
    trainable_params: int | None = None  # None: full fine-tuning
    gradient_checkpointing: bool = True
    offload_activations: bool = False  # checkpointed layer inputs live in host memory
    tiled_mlp_tokens: int | None = None  # the MLP runs over tiles of this many tokens
    loss_chunk_size: int = 4096
    fused_loss: bool = True  # a plain linear head: one fp32 logits chunk (see losses.causal_lm); False: checkpointed
    math_attention: bool = False  # attention_kernel: math materialises score blocks
    sp_attention: bool = False  # the SP / document-aware attention (ring buffers, fp32 accumulators)

    @property
    def local_tokens(self) -> int:
        """Tokens per rank: the row padded to a multiple of 2*sp (zigzag layout), then split."""
        if self.sp == 1:
            return self.tokens
        return math.ceil(self.tokens / (2 * self.sp)) * 2


@dataclass
class MemoryEstimate:
    """Sizes in bytes. `components` are the full sizes of each term; `at_peak` is how much of each is alive at
    the peak moment (they sum to `total`); `moments` is the total at each candidate moment."""

    components: dict[str, int]
    at_peak: dict[str, int]
    peak_moment: str
    moments: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.at_peak.values())


# Tensors alive at the peak of one decoder layer's recompute + backward (non-reentrant checkpointing, SDPA),
# in units of T_local * width * bytes, counted with `longtune bench --tensor-memory` on the HF Qwen2 layer (the
# peak falls in the MLP backward): the attention half's saved tensors and the hidden gradients (8 H, 2 KV), and
# gate, up, act(gate), act*up plus two of their gradients (6 I).
LAYER_HIDDEN_WIDTHS = 8
LAYER_KV_WIDTHS = 2
LAYER_INTERMEDIATE_WIDTHS = 6
# Outside the layers, alive until the loss backward is done: the final norm's input, normalised input and output,
# and the loss-token copy the chunked head reads from.
OUTSIDE_HIDDEN_WIDTHS = 4
# One loss chunk of the checkpointed head (a head that is not a plain nn.Linear) in its backward: the recomputed
# logits' log-softmax, the gradient from the NLL, and the gradient of the logits (3 x chunk x vocab), in fp32.
LOGITS_COPIES = 3


def estimate_memory(shape: ModelShape, setup: TrainSetup) -> MemoryEstimate:
    """Predicted peak memory of one process of a training step (forward, backward, optimizer step).

    Terms (bytes; P params, P_t trainable, W world size, S = W if FSDP else 1, b compute bytes, T = local tokens
    x batch, L layers, H hidden, KV = kv_heads x head_dim, I intermediate, V vocab, C = min(loss_chunk_size, T)):
      params       P * param bytes / S (fp32 masters of trainable weights in bf16; frozen ones in bf16);
                   bf16 adds the compute copies: all of them without FSDP (autocast's weight cache), the
                   gathered root (embeddings, head) plus two layers with FSDP
      grads        P_t * 4 / S (+ one layer's unsharded grads with FSDP)
      optimizer    AdamW: 2 fp32 states per trainable parameter, / S (bf16: the fp32 masters are counted in params)
      activations  checkpointed layer inputs L * T * H * b and rope cos/sin (2 T head_dim b), plus the final
                   norm / loss inputs (4 T H b, freed once the loss backward is done); without checkpointing every
                   layer keeps its working set instead of its input; offload_activations keeps 2 layers' inputs
                   on the GPU instead of L
      layer_recompute   one layer's working set during its recompute + backward:
                   T * (8 H + 2 KV + 6 I) * b (see LAYER_*_WIDTHS); with tiled_mlp_tokens = t the 6 I term is
                   min(t, T) * 6 I * b plus one T * H * b copy of the tile inputs
      logits_chunk plain linear head (every stage): C * V * 4 (logits, turned into their gradient in place;
                   sft/pt in the loss forward, dpo/kto/rm in its backward) + C * V * b in bf16 (the matmul's
                   output, then the gradient's bf16 copy), plus the head-gradient buffer V * H * 4 (full size,
                   even under FSDP, when the head is trained) and the hidden-state gradient of the loss tokens
                   T * H * hb; checkpointed head: C * V * 4 bytes * 3 (log-softmax, NLL grad, logits grad)
      attention_workspace  fused kernels: the log-sum-exp (heads x T x 4); SP/document attention adds fp32
                   dq/dkv accumulators (T (H + 2 KV) 4) and, for sp > 1, K/V send/receive buffers (4 T KV b);
                   the math kernel adds heads x T x T x 4 x 3 (scores, probabilities, their gradient). It is
                   alive in the attention backward, after the MLP's 6 I intermediates are freed, so a layer
                   moment counts only what exceeds them
      optimizer_step_temp  foreach AdamW's sqrt(v) temporary: P_t * 4 / S
    The peak is the largest of four moments (what is alive when):
      loss             params + optimizer + all activations + head grads + logits_chunk (the loss backward of
                       the dpo/kto/rm head, the forward of the sft/pt head)
      last_layer       params + optimizer + layer checkpoints + head grads + layer_recompute + attention_workspace
      first_layer      params + optimizer + one checkpoint + all grads + layer_recompute + attention_workspace
      optimizer_step   params + optimizer + grads + optimizer_step_temp
    """
    b = DTYPE_BYTES[setup.dtype]
    low_precision = b < 4
    shard = setup.world_size if setup.fsdp else 1
    P = shape.total_params
    Pt = P if setup.trainable_params is None else setup.trainable_params
    frozen = P - Pt
    L, H, KV, I, V = (shape.num_layers, shape.hidden_size, shape.kv_size, shape.intermediate_size,
                      shape.vocab_size)
    T = setup.local_tokens * setup.batch_size
    head_params = 0 if shape.tied_embeddings else shape.embedding_params  # grads that exist at backward start
    head_trainable = head_params * Pt // P

    params = (Pt * 4 + frozen * b) // shard
    if low_precision:
        root = shape.embedding_params + head_params
        params += (root + 2 * shape.layer_params) * b if setup.fsdp else P * b
    grads = Pt * 4 // shard + (shape.layer_params * 4 if setup.fsdp else 0)
    optimizer = 2 * Pt * 4 // shard
    # Without FSDP, bf16 runs under autocast over fp32 weights: the residual stream (embeddings + residual adds),
    # hence the checkpointed layer inputs, stays fp32. FSDP's bf16 parameters make it bf16.
    hb = 4 if low_precision and not setup.fsdp else b
    layer_recompute = T * (LAYER_HIDDEN_WIDTHS * H + LAYER_KV_WIDTHS * KV) * b
    if setup.tiled_mlp_tokens:  # the tile inputs (one copy of the MLP input) + one tile's intermediates
        mlp_part = min(setup.tiled_mlp_tokens, T) * LAYER_INTERMEDIATE_WIDTHS * I * b
        layer_recompute += T * H * b + mlp_part
    else:
        mlp_part = T * LAYER_INTERMEDIATE_WIDTHS * I * b
        layer_recompute += mlp_part
    checkpoint_per_layer = T * H * hb if setup.gradient_checkpointing else layer_recompute
    # Offloaded checkpoints: on the GPU only the layer being recomputed and the one being fetched.
    on_gpu_layers = min(L, 2) if setup.offload_activations else L
    rope = 2 * T * shape.head_dim * b
    outside = T * OUTSIDE_HIDDEN_WIDTHS * H * hb
    activations = on_gpu_layers * checkpoint_per_layer + rope + outside
    C = min(setup.loss_chunk_size, T)
    head_grads = head_trainable * 4 // shard
    if setup.fused_loss:
        head_weight_trained = Pt == P  # full fine-tuning (LoRA and freeze leave the head frozen)
        logits_chunk = C * V * 4 + (C * V * b if low_precision else 0) + T * H * hb
        loss_grads = V * H * 4 if head_weight_trained else 0
    else:
        logits_chunk = C * V * 4 * LOGITS_COPIES
        loss_grads = head_grads
    attention = shape.num_heads * T * 4
    if setup.sp_attention or setup.sp > 1:
        attention += T * (H + 2 * KV) * 4 + (4 * T * KV * b if setup.sp > 1 else 0)
    if setup.math_attention:
        attention += 3 * shape.num_heads * setup.local_tokens**2 * setup.batch_size * 4
    step_temp = Pt * 4 // shard
    # The attention backward runs after the MLP's, whose intermediates are freed by then: only the part of the
    # attention workspace beyond them raises the layer's peak.
    attention_extra = max(0, attention - mlp_part)

    components = {
        "params": params,
        "grads": max(grads, loss_grads),  # the fused head's buffer is full size even under FSDP
        "optimizer": optimizer,
        "activations": activations,
        "layer_recompute": layer_recompute,
        "logits_chunk": logits_chunk,
        "attention_workspace": attention,
        "optimizer_step_temp": step_temp,
    }
    zero = dict.fromkeys(components, 0)
    static = {"params": params, "optimizer": optimizer}
    candidates = {
        "loss": {**zero, **static, "grads": loss_grads, "activations": activations, "logits_chunk": logits_chunk},
        "last_layer": {**zero, **static, "grads": head_grads, "activations": on_gpu_layers * checkpoint_per_layer + rope,
                       "layer_recompute": layer_recompute, "attention_workspace": attention_extra},
        "first_layer": {**zero, **static, "grads": grads, "activations": checkpoint_per_layer + rope,
                        "layer_recompute": layer_recompute, "attention_workspace": attention_extra},
        "optimizer_step": {**zero, **static, "grads": grads, "optimizer_step_temp": step_temp},
    }
    moments = {name: sum(parts.values()) for name, parts in candidates.items()}
    peak = max(moments, key=moments.__getitem__)
    return MemoryEstimate(components=components, at_peak=candidates[peak], peak_moment=peak, moments=moments)


def lora_trainable_params(shape: ModelShape, rank: int, targets: list[str] | None) -> int:
    """LoRA adapter parameters: r * (in + out) per targeted linear per layer (None: every linear but the head)."""
    h, kv, i = shape.hidden_size, shape.kv_size, shape.intermediate_size
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}
    chosen = dims if targets is None else {k: v for k, v in dims.items() if k in targets}
    return shape.num_layers * sum(rank * (a + c) for a, c in chosen.values())


def setup_from_config(cfg, shape: ModelShape, gpus: int, tokens: int | None = None, sp: int | None = None) -> TrainSetup:
    """The TrainSetup a `longtune train` run of `cfg` on `gpus` processes would have."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if m.finetuning_type == "full":
        trainable = None
    elif m.finetuning_type == "lora":
        targets = [x.strip() for x in m.lora_target.split(",") if x.strip()]
        trainable = lora_trainable_params(shape, m.lora_rank, None if targets == ["all"] else targets)
    else:
        n = abs(m.freeze_trainable_layers)
        trainable = n * shape.layer_params
    fsdp = p.fsdp if p.fsdp is not None else gpus > 1
    pairs = t.stage in ("dpo", "kto", "rm")
    return TrainSetup(
        tokens=tokens or cfg.data.cutoff_len * (2 if pairs else 1),
        batch_size=t.per_device_train_batch_size,
        sp=sp or p.sequence_parallel_size,
        world_size=gpus,
        fsdp=bool(fsdp),
        dtype=cfg.compute_dtype,
        trainable_params=trainable,
        gradient_checkpointing=t.gradient_checkpointing,
        offload_activations=t.offload_activations,
        tiled_mlp_tokens=t.tiled_mlp_tokens,
        loss_chunk_size=t.loss_chunk_size,
        math_attention=p.attention_kernel == "math",
        sp_attention=cfg.packing or pairs,
    )


def sp_degrees(gpus: int) -> list[int]:
    """Candidate SP degrees: powers of two that divide the number of GPUs."""
    return [2**k for k in range(int(math.log2(gpus)) + 1) if gpus % 2**k == 0]


def suggest_sp(shape: ModelShape, setup: TrainSetup, gpu_mem: int) -> tuple[int | None, dict[int, MemoryEstimate]]:
    """The smallest SP degree whose estimate fits USABLE_FRACTION of `gpu_mem` bytes (None if none does), and
    every estimate."""
    table = {sp: estimate_memory(shape, replace(setup, sp=sp)) for sp in sp_degrees(setup.world_size)}
    fitting = [sp for sp, est in table.items() if est.total <= USABLE_FRACTION * gpu_mem]
    return (fitting[0] if fitting else None), table


def parse_size(text: str) -> int:
    """'80GiB', '80GB', '79.5 GiB', '512MiB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"estimate: --gpu-mem '{text}' is not a size like 80GiB or 40GB")
    value, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit == "B":
        return int(value)
    base = 1024 if "I" in unit or len(unit) == 1 else 1000
    return int(value * base ** powers[unit[0]])


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def format_estimate(shape: ModelShape, setup: TrainSetup, gpu_mem: int) -> str:
    best, table = suggest_sp(shape, setup, gpu_mem)
    chosen = table[setup.sp] if setup.sp in table else estimate_memory(shape, setup)
    lines = [
        f"model: {shape.total_params / 1e9:.3f}B params (L={shape.num_layers}, H={shape.hidden_size}, "
        f"heads={shape.num_heads}/{shape.num_kv_heads}, I={shape.intermediate_size}, V={shape.vocab_size}"
        f"{', tied' if shape.tied_embeddings else ''}); trainable "
        f"{(setup.trainable_params or shape.total_params) / 1e9:.3f}B",
        f"run: T={setup.tokens} tokens x batch {setup.batch_size}, {setup.dtype}, {setup.world_size} GPU(s), "
        f"FSDP {'on' if setup.fsdp else 'off'}, checkpointing {'on' if setup.gradient_checkpointing else 'off'}, "
        f"loss_chunk_size {setup.loss_chunk_size}",
        "",
        f"breakdown at sequence_parallel_size={setup.sp} ('at peak' = alive at the peak moment, "
        f"'{chosen.peak_moment}'):",
        "| term | size | at peak |",
        "| --- | --- | --- |",
    ]
    for name, size in chosen.components.items():
        lines.append(f"| {name} | {_gib(size)} | {_gib(chosen.at_peak[name])} |")
    lines.append(f"| **total (peak)** | | **{_gib(chosen.total)}** |")
    lines += ["", f"per-GPU peak by SP degree (GPU memory {_gib(gpu_mem)}):",
              "| sequence_parallel_size | tokens per rank | activations | peak | fits |", "| --- | --- | --- | --- | --- |"]
    for sp, est in table.items():
        tokens = replace(setup, sp=sp).local_tokens
        lines.append(f"| {sp} | {tokens} | {_gib(est.components['activations'])} | {_gib(est.total)} | "
                     f"{'yes' if est.total <= USABLE_FRACTION * gpu_mem else 'no'} |")
    if best is None:
        lines.append(f"suggestion: no SP degree up to {setup.world_size} fits; use more GPUs, LoRA, "
                     "offload_params: true, or a shorter cutoff_len")
    else:
        lines.append(f"suggestion: sequence_parallel_size: {best}")
    lines.append(f"(fits = estimate <= {USABLE_FRACTION:.0%} of the GPU memory; the rest is for allocator "
                 "fragmentation, the CUDA context and NCCL buffers, which the estimate leaves out)")
    return "\n".join(lines)


def cmd_estimate(args: argparse.Namespace) -> int:
    from longtune.config import load_config
    from longtune.models.loader import load_model_config

    items = list(args.config_and_overrides)
    config_path = items.pop(0) if items and "=" not in items[0] else None
    if config_path is None and not items:
        raise ConfigError("estimate: give a CONFIG.yaml and/or key=value overrides (see longtune estimate --help)")
    for item in items:
        if "=" not in item:
            raise ConfigError(f"estimate: '{item}' is not key=value (only the first argument may be a YAML file)")
    if args.gpus < 1:
        raise ConfigError(f"estimate: --gpus must be >= 1, got {args.gpus}")
    cfg = load_config(config_path, items)
    shape = ModelShape.from_hf_config(load_model_config(cfg.model))
    setup = setup_from_config(cfg, shape, args.gpus, tokens=args.length)
    if args.gpus % setup.sp:
        raise ConfigError(f"key 'sequence_parallel_size': {setup.sp} does not divide --gpus {args.gpus}")
    print(format_estimate(shape, setup, parse_size(args.gpu_mem)))
    return 0


def add_estimate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `longtune estimate` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "estimate",
        help="predicted peak memory per GPU, broken down; suggests sequence_parallel_size",
        description=(
            "Predict the peak memory of one GPU for a training config (params, grads, optimizer, checkpointed "
            "activations, one layer's recompute, the loss chunk, attention workspace) and the smallest SP degree "
            "that fits --gpu-mem. The model shape comes from the config's model (no weights are loaded). "
            "The formula: longtune.estimate.estimate_memory; its validation: docs/benchmarks.md."
        ),
    )
    parser.add_argument("config_and_overrides", nargs="*", metavar="CONFIG.yaml | key=value")
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs (processes) of the run (default 1)")
    parser.add_argument("--gpu-mem", default="80GiB", help="memory per GPU, e.g. 80GiB, 40GB (default 80GiB)")
    parser.add_argument("--length", type=int, default=None, metavar="T",
                        help="tokens per row (default: cutoff_len; two documents of it for dpo/kto/rm)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks for errors")
    parser.set_defaults(func=cmd_estimate)
    return parser
