"""`longtune estimate [CONFIG.yaml]`: predicted peak GPU memory and host memory of a training config, broken
down, the smallest sequence-parallel degree that fits, and (--max-length) the longest cutoff_len per SP degree.

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
    qkv_bias: bool = True  # Qwen2 has q/k/v biases; Llama (attention_bias: false) has none

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """One Qwen2/Llama decoder layer: q, k, v (biases when qkv_bias), o, gate/up/down, two RMSNorms."""
        h, kv = self.hidden_size, self.kv_size
        biases = h + 2 * kv if self.qkv_bias else 0
        return 2 * h * h + 2 * h * kv + biases + 3 * h * self.intermediate_size + 2 * h

    def layer_params_per_rank(self, tp: int = 1) -> int:
        """One decoder layer's parameters on one tensor-parallel rank: the projections (and q/k/v biases) are
        split tp ways, the two norms are whole on every rank."""
        norms = 2 * self.hidden_size
        return (self.layer_params - norms) // tp + norms

    def vocab_rows_per_rank(self, tp: int = 1) -> int:
        """LM-head rows on one tensor-parallel rank: the head is split by vocabulary when tp divides it."""
        return self.vocab_size // tp if self.vocab_size % tp == 0 else self.vocab_size

    def root_params_per_rank(self, tp: int = 1) -> tuple[int, int]:
        """(input embedding, untied LM head) parameters on one tensor-parallel rank; a tied embedding is split
        with the head."""
        rows = self.vocab_rows_per_rank(tp)
        if self.tied_embeddings:
            return rows * self.hidden_size, 0
        return self.embedding_params, rows * self.hidden_size

    def params_per_rank(self, tp: int = 1) -> int:
        """The model on one tensor-parallel rank: split layers and LM head, whole norms (and untied embedding)."""
        embedding, head = self.root_params_per_rank(tp)
        return self.num_layers * self.layer_params_per_rank(tp) + embedding + head + self.hidden_size

    @property
    def layer_linear_params(self) -> int:
        """The weights of one layer's linear projections (what a quantized base stores in 4 or 8 bits)."""
        h, kv = self.hidden_size, self.kv_size
        return 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size

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
            # Qwen2's config has no attention_bias key: its q/k/v projections always carry biases.
            qkv_bias=bool(getattr(config, "attention_bias", True)),
        )


def shape_from_name_or_path(model: str) -> ModelShape:
    """A named shape of `longtune bench` (e.g. qwen2.5-7b, llama-3.1-8b) or a Hugging Face config.json (or the
    model directory holding it): no weights are read."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from longtune.bench import MODEL_SHAPES

    if model in MODEL_SHAPES:
        return ModelShape.from_hf_config(SimpleNamespace(**MODEL_SHAPES[model]))
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"estimate: --model '{model}' is neither a known shape ({', '.join(MODEL_SHAPES)}) "
                          "nor a config.json / model directory")
    try:
        raw = json.loads(path.read_text())
        raw = raw.get("text_config", raw)  # multimodal configs nest the language model's shape
        return ModelShape.from_hf_config(SimpleNamespace(**raw))
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        raise ConfigError(f"estimate: {path} is not a decoder config.json ({exc})".splitlines()[0]) from None


@dataclass(frozen=True)
class TrainSetup:
    """What besides the model shape decides the memory of one training process."""

    tokens: int  # tokens of one row (the whole sequence, before SP splits it)
    batch_size: int = 1
    sp: int = 1
    world_size: int = 1
    tp: int = 1  # tensor_parallel_size (always under FSDP, which then shards over world_size / tp ranks)
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
    offload_params: bool = False  # FSDP2 CPU offload: sharded params, grads and optimizer state in host memory
    gradient_accumulation_steps: int = 1
    gradient_sync_every_micro_batch: bool = True  # False (with FSDP, GA > 1): unsharded fp32 grads accumulate
    live_reference: bool = False  # dpo/kto with a frozen full copy of the model (full/freeze, not precomputed)
    quantization_bit: int | None = None  # QLoRA: the layers' linear weights stored in 4 or 8 bits
    double_quantization: bool = True  # 4-bit: the per-block constants quantized again

    @property
    def local_tokens(self) -> int:
        """Tokens per rank: the row padded to a multiple of 2*sp (zigzag layout), then split."""
        if self.sp == 1:
            return self.tokens
        return math.ceil(self.tokens / (2 * self.sp)) * 2


@dataclass
class MemoryEstimate:
    """Sizes in bytes, of one process. `components` are the full sizes of each GPU term; `at_peak` is how much of
    each is alive at the peak moment (they sum to `total`); `moments` is the total at each candidate moment.
    `host_components` are the host-memory part of the same terms (plus `model_load`), `host_moments` the host
    total at its two moments (what the process holds beyond the Python/torch runtime)."""

    components: dict[str, int]
    at_peak: dict[str, int]
    peak_moment: str
    moments: dict[str, int] = field(default_factory=dict)
    host_components: dict[str, int] = field(default_factory=dict)
    host_moments: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.at_peak.values())

    @property
    def host_total(self) -> int:
        return max(self.host_moments.values(), default=0)

    @property
    def host_peak_moment(self) -> str:
        return max(self.host_moments, key=self.host_moments.__getitem__) if self.host_moments else "-"


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
# FSDP2 keeps the unsharded parameters of the layer it computes and of the one it prefetches.
GATHERED_LAYERS = 2
# bitsandbytes blocks of 4-bit weights: one fp32 absmax per 64 weights; with double quantization that absmax is
# 8-bit and 256 of them share one fp32 constant. LLM.int8() keeps one fp32 absmax per output row (ignored here).
QUANT_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256


def quantized_bytes_per_param(bits: int, double_quantization: bool = True) -> float:
    """Bytes per weight of a bitsandbytes layer, quantization constants included."""
    if bits == 8:
        return 1.0
    constants = (1 + 4 / DOUBLE_QUANT_BLOCK) / QUANT_BLOCK if double_quantization else 4 / QUANT_BLOCK
    return 0.5 + constants


def estimate_memory(shape: ModelShape, setup: TrainSetup) -> MemoryEstimate:
    """Predicted peak GPU memory and host memory of one process of a training step (forward, backward, step).

    Tensor parallelism (tp > 1, always with FSDP): P, P_t and the layer sizes are those of one tp rank (the
    projections split tp ways; embeddings, head and norms whole; trainable LoRA / freeze parameters scaled
    like the layers, exact for freeze, approximate for LoRA, whose lora_A of column-split layers is whole),
    S = W / tp, and in the layer working set and attention workspace KV, I and the heads are the local
    ones (/ tp), and so are the vocabulary of the logits chunk and of the head (vocab-parallel head, when tp
    divides V; a tied embedding is split with it); the hidden-width tensors (layer inputs, residual stream,
    norms, the 8 H widths of a layer) are whole on every tp rank and are not divided (an upper bound for the
    attention half).
    GPU terms (bytes; P params, P_t trainable, W world size, S = W if FSDP else 1, b compute bytes, m master
    bytes (4 in bf16, else b), T = local tokens x batch, L layers, H hidden, KV = kv_heads x head_dim,
    I intermediate, V vocab, C = min(loss_chunk_size, T), root = embeddings + untied head):
      params       P_t * 4 / S + frozen * b / S (FSDP in bf16 casts frozen weights to fp32 too: m); bf16 adds the
                   compute copies: all of them without FSDP (autocast's weight cache), the gathered root plus
                   two layers with FSDP. offload_params: only the gathered compute copies (root + 2 layers) x b
                   are on the GPU; the sharded masters are host memory
      grads        P_t * 4 / S (+ one layer's unsharded grads with FSDP); offload_params: one layer's and the
                   head's unsharded fp32 grads on the GPU, the sharded ones in host memory
      accumulated_grads  FSDP with gradient_accumulation_steps > 1 and gradient_sync_every_micro_batch: false:
                   every trainable parameter's unsharded fp32 gradient, P_t * 4, alive from the first
                   micro-batch's backward to the last one's reduce-scatter (on the GPU, offload or not); in the
                   layer moments it replaces `grads` (no sharded gradient exists before that reduce-scatter)
      optimizer    AdamW: 2 fp32 states per trainable parameter, / S (host memory with offload_params)
      quantized    quantization_bit: the layers' linear weights P_q = L x (their weights), P_q x 0.5 byte + the
                   block constants (4-bit: 1/64 byte with double quantization, else 4/64) or P_q x 1 byte
                   (8-bit), on every rank (FSDP2 does not shard them; see parallel/fsdp.py); they leave `frozen`
                   and the compute copies; layer_recompute adds one dequantized weight (H x I x b)
      reference    dpo/kto with a frozen full copy of the model: P * b (no FSDP), P * m / S (FSDP; host memory
                   with offload_params)
      activations  checkpointed layer inputs L * T * H * b and rope cos/sin (2 T head_dim b), plus the final
                   norm / loss inputs (4 T H b, freed once the loss backward is done); without checkpointing every
                   layer keeps its working set instead of its input; offload_activations keeps 2 layers' inputs
                   on the GPU instead of L (the other L - 2 are host memory)
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
      optimizer_step_temp  foreach AdamW's sqrt(v) temporary: P_t * 4 / S (host memory with offload_params)
    The GPU peak is the largest of four moments (what is alive when):
      loss             static + all activations + head grads + logits_chunk (the loss backward of the
                       dpo/kto/rm head, the forward of the sft/pt head)
      last_layer       static + layer checkpoints + head grads + layer_recompute + attention_workspace
      first_layer      static + one checkpoint + all grads + layer_recompute + attention_workspace
      optimizer_step   static + grads + optimizer_step_temp
    (static = params + optimizer + reference, + accumulated_grads in the three backward moments.)
    Host memory of the process (beyond the runtime itself), per term, the larger of two moments:
      load             model_load: the whole model (and a frozen reference copy) as loaded, before FSDP shards
                       it or it moves to the GPU: P_t * 4 + frozen * m per copy
      training         offload_params: params (sharded masters), grads, optimizer, optimizer_step_temp (and
                       reference); offload_activations: activations, the L - 2 offloaded layer inputs
    """
    b = DTYPE_BYTES[setup.dtype]
    low_precision = b < 4
    offload = setup.offload_params
    tp = setup.tp
    # The trainer shards with FSDP2 whenever parameters are offloaded or tensor parallelism is on.
    fsdp = setup.fsdp or offload or tp > 1
    shard = setup.world_size // tp if fsdp else 1
    P = shape.params_per_rank(tp)
    layer_params = shape.layer_params_per_rank(tp)
    Pt = P if setup.trainable_params is None else setup.trainable_params * layer_params // shape.layer_params
    layer_linear = shape.layer_linear_params // tp  # what a quantized base stores in 4 or 8 bits, per tp rank
    Pq = shape.num_layers * layer_linear if setup.quantization_bit else 0
    quantized = int(Pq * quantized_bytes_per_param(setup.quantization_bit, setup.double_quantization)) if Pq else 0
    frozen = P - Pt - Pq
    # FSDP keeps one dtype per sharded group: in bf16 the trainer casts every weight, frozen ones too, to fp32.
    master_bytes = 4 if low_precision and fsdp else b
    L, H, V = shape.num_layers, shape.hidden_size, shape.vocab_rows_per_rank(tp)
    KV, I, heads = shape.kv_size // tp, shape.intermediate_size // tp, shape.num_heads // tp  # local to a tp rank
    T = setup.local_tokens * setup.batch_size
    embedding_params, head_params = shape.root_params_per_rank(tp)  # head: grads that exist at backward start
    head_trainable = head_params * Pt // P
    root_params = embedding_params + head_params

    sharded_params = (Pt * 4 + frozen * master_bytes) // shard + quantized  # quantized layers are not sharded
    sharded_grads = Pt * 4 // shard
    optimizer = 2 * Pt * 4 // shard
    step_temp = Pt * 4 // shard
    reference = 0
    if setup.live_reference:
        reference = P * master_bytes // shard if fsdp else P * b
    # FSDP's unsharded compute copies (a quantized layer's linear weights are never gathered)
    gathered = (root_params + GATHERED_LAYERS * (layer_params - (layer_linear if Pq else 0))) * b
    if offload:
        params = gathered + quantized
        sharded_params -= quantized
        # One layer's unsharded fp32 grads before they move to the host, and the root's (the head's) until the
        # root's reduce-scatter at the end of backward.
        grads = (layer_params + head_trainable) * 4
        offloaded = {"params": sharded_params, "grads": sharded_grads, "optimizer": optimizer,
                     "reference": reference, "optimizer_step_temp": step_temp}
        optimizer, step_temp, reference = 0, 0, 0
    else:
        params = sharded_params
        if low_precision:
            params += gathered if fsdp else (P - Pq) * b
        grads = sharded_grads + (layer_params * 4 if fsdp else 0)
        offloaded = {}
    accumulated = Pt * 4 if (fsdp and setup.gradient_accumulation_steps > 1
                             and not setup.gradient_sync_every_micro_batch) else 0
    # Without FSDP, bf16 runs under autocast over fp32 weights: the residual stream (embeddings + residual adds),
    # hence the checkpointed layer inputs, stays fp32. FSDP's bf16 parameters make it bf16.
    hb = 4 if low_precision and not fsdp else b
    layer_recompute = T * (LAYER_HIDDEN_WIDTHS * H + LAYER_KV_WIDTHS * KV) * b
    if setup.tiled_mlp_tokens:  # the tile inputs (one copy of the MLP input) + one tile's intermediates
        mlp_part = min(setup.tiled_mlp_tokens, T) * LAYER_INTERMEDIATE_WIDTHS * I * b
        layer_recompute += T * H * b + mlp_part
    else:
        mlp_part = T * LAYER_INTERMEDIATE_WIDTHS * I * b
        layer_recompute += mlp_part
    if Pq:
        layer_recompute += H * I * b  # bitsandbytes dequantizes a weight for each matmul (forward and backward)
    checkpoint_per_layer = T * H * hb if setup.gradient_checkpointing else layer_recompute
    # Offloaded checkpoints: on the GPU only the layer being recomputed and the one being fetched.
    on_gpu_layers = min(L, 2) if setup.offload_activations else L
    rope = 2 * T * shape.head_dim * b
    outside = T * OUTSIDE_HIDDEN_WIDTHS * H * hb
    activations = on_gpu_layers * checkpoint_per_layer + rope + outside
    C = min(setup.loss_chunk_size, T)
    head_grads = head_trainable * 4 if offload else head_trainable * 4 // shard
    if setup.fused_loss:
        head_weight_trained = Pt == P  # full fine-tuning (LoRA and freeze leave the head frozen)
        logits_chunk = C * V * 4 + (C * V * b if low_precision else 0) + T * H * hb
        loss_grads = V * H * 4 if head_weight_trained else 0
    else:
        logits_chunk = C * V * 4 * LOGITS_COPIES
        loss_grads = head_grads
    attention = heads * T * 4
    if setup.sp_attention or setup.sp > 1:
        attention += T * (heads * shape.head_dim + 2 * KV) * 4 + (4 * T * KV * b if setup.sp > 1 else 0)
    if setup.math_attention:
        attention += 3 * heads * setup.local_tokens**2 * setup.batch_size * 4
    # The attention backward runs after the MLP's, whose intermediates are freed by then: only the part of the
    # attention workspace beyond them raises the layer's peak.
    attention_extra = max(0, attention - mlp_part)

    components = {
        "params": params,
        "grads": max(grads, loss_grads),  # the fused head's buffer is full size even under FSDP
        "accumulated_grads": accumulated,
        "optimizer": optimizer,
        "reference": reference,
        "activations": activations,
        "layer_recompute": layer_recompute,
        "logits_chunk": logits_chunk,
        "attention_workspace": attention,
        "optimizer_step_temp": step_temp,
    }
    zero = dict.fromkeys(components, 0)
    static = {"params": params, "optimizer": optimizer, "reference": reference}
    backward = {**static, "accumulated_grads": accumulated}
    # While unsharded gradients accumulate (a micro-batch before the last), they are all the gradient memory
    # there is: the sharded gradients appear only with the last micro-batch's reduce-scatter.
    layer_grads = {"grads": 0} if accumulated else {}
    candidates = {
        "loss": {**zero, **backward, "grads": loss_grads, "activations": activations, "logits_chunk": logits_chunk},
        "last_layer": {**zero, **backward, "grads": head_grads,
                       "activations": on_gpu_layers * checkpoint_per_layer + rope,
                       "layer_recompute": layer_recompute, "attention_workspace": attention_extra, **layer_grads},
        "first_layer": {**zero, **backward, "grads": grads, "activations": checkpoint_per_layer + rope,
                        "layer_recompute": layer_recompute, "attention_workspace": attention_extra, **layer_grads},
        "optimizer_step": {**zero, **static, "grads": grads, "optimizer_step_temp": step_temp},
    }
    moments = {name: sum(parts.values()) for name, parts in candidates.items()}
    peak = max(moments, key=moments.__getitem__)

    loaded_copy = Pt * 4 + frozen * master_bytes if low_precision else P * b
    if Pq:
        loaded_copy += Pq * b  # loaded in the compute dtype on the host, then quantized layer by layer
    offloaded["activations"] = (L - on_gpu_layers) * checkpoint_per_layer if setup.offload_activations else 0
    # The same terms as on the GPU (what lives in host memory of each), plus the load of the whole model.
    host_components = {**dict.fromkeys(components, 0), **offloaded,
                       "model_load": loaded_copy * (2 if setup.live_reference else 1)}
    training = sum(size for name, size in host_components.items() if name != "model_load")
    host_moments = {"load": host_components["model_load"], "training": training}
    return MemoryEstimate(components=components, at_peak=candidates[peak], peak_moment=peak, moments=moments,
                          host_components=host_components, host_moments=host_moments)


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
    fsdp = p.fsdp if p.fsdp is not None else (gpus > 1 or p.offload_params)
    from longtune.stages import build_stage

    stage = build_stage(cfg)
    # A stage with a reference keeps a frozen copy of the model unless LoRA (adapters off) or precomputed
    # log-probs replace it (reference-free losses such as ORPO and SimPO use none).
    live_reference = (stage.uses_reference and m.finetuning_type != "lora"
                      and not cfg.preference.precompute_ref_log_probs)
    return TrainSetup(
        tokens=tokens or cfg.data.cutoff_len * stage.docs_per_row,
        batch_size=t.per_device_train_batch_size,
        sp=sp or p.sequence_parallel_size,
        world_size=gpus,
        tp=p.tensor_parallel_size,
        fsdp=bool(fsdp),
        dtype=cfg.compute_dtype,
        trainable_params=trainable,
        gradient_checkpointing=t.gradient_checkpointing,
        offload_activations=t.offload_activations,
        tiled_mlp_tokens=t.tiled_mlp_tokens,
        loss_chunk_size=t.loss_chunk_size,
        math_attention=p.attention_kernel == "math",
        sp_attention=cfg.packing or stage.docs_per_row > 1,
        offload_params=p.offload_params,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_sync_every_micro_batch=p.gradient_sync_every_micro_batch,
        live_reference=live_reference,
        quantization_bit=m.quantization_bit,
        double_quantization=m.double_quantization,
    )


def sp_degrees(gpus: int) -> list[int]:
    """Candidate SP degrees: powers of two that divide the number of GPUs."""
    return [2**k for k in range(int(math.log2(gpus)) + 1) if gpus % 2**k == 0]


@dataclass(frozen=True)
class MemoryBudget:
    """What a configuration must fit: GPU memory per GPU, and host memory per node (None: not checked) shared by
    the `gpus_per_node` processes of a node."""

    gpu_mem: int
    host_mem: int | None = None
    gpus_per_node: int = 1

    def node_host_bytes(self, est: MemoryEstimate) -> int:
        return est.host_total * self.gpus_per_node

    def fits(self, est: MemoryEstimate) -> bool:
        if est.total > USABLE_FRACTION * self.gpu_mem:
            return False
        return self.host_mem is None or self.node_host_bytes(est) <= USABLE_FRACTION * self.host_mem

    def limit(self, est: MemoryEstimate) -> str:
        """Which memory a configuration runs out of first (relative to its usable share)."""
        gpu_share = est.total / (USABLE_FRACTION * self.gpu_mem)
        if self.host_mem is None:
            return "GPU"
        return "GPU" if gpu_share >= self.node_host_bytes(est) / (USABLE_FRACTION * self.host_mem) else "host"


def suggest_sp(shape: ModelShape, setup: TrainSetup, gpu_mem: int | MemoryBudget
               ) -> tuple[int | None, dict[int, MemoryEstimate]]:
    """The smallest SP degree whose estimate fits the budget (None if none does), and every estimate."""
    budget = gpu_mem if isinstance(gpu_mem, MemoryBudget) else MemoryBudget(gpu_mem)
    table = {sp: estimate_memory(shape, replace(setup, sp=sp)) for sp in sp_degrees(setup.world_size // setup.tp)}
    fitting = [sp for sp, est in table.items() if budget.fits(est)]
    return (fitting[0] if fitting else None), table


@dataclass(frozen=True)
class MaxLength:
    sp: int
    cutoff_len: int | None  # None: not even the smallest length fits
    estimate: MemoryEstimate | None  # at cutoff_len
    limited_by: str  # "GPU" | "host" | "search bound"


LENGTH_RESOLUTION = 1024
LENGTH_SEARCH_BOUND = 1 << 27  # 128M tokens: far beyond any GPU memory today


def max_cutoff_len(shape: ModelShape, setup: TrainSetup, budget: MemoryBudget, docs_per_row: int = 1,
                   resolution: int = LENGTH_RESOLUTION) -> MaxLength:
    """The longest cutoff_len (a multiple of `resolution`) whose estimate fits `budget` at `setup.sp`.

    Every term grows with the length, so the fitting lengths are a prefix: doubling, then bisection."""
    def at(cutoff: int) -> MemoryEstimate:
        return estimate_memory(shape, replace(setup, tokens=cutoff * docs_per_row))

    lo, hi = 0, resolution
    while budget.fits(at(hi)):
        lo, hi = hi, 2 * hi
        if hi > LENGTH_SEARCH_BOUND:
            return MaxLength(setup.sp, lo, at(lo), "search bound")
    while hi - lo > resolution:
        mid = (lo + hi) // 2 // resolution * resolution
        if budget.fits(at(mid)):
            lo = mid
        else:
            hi = mid
    if lo == 0:
        return MaxLength(setup.sp, None, None, budget.limit(at(resolution)))
    return MaxLength(setup.sp, lo, at(lo), budget.limit(at(hi)))


def parse_size(text: str, flag: str = "--gpu-mem") -> int:
    """'80GiB', '80GB', '79.5 GiB', '512MiB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"estimate: {flag} '{text}' is not a size like 80GiB or 40GB")
    value, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit == "B":
        return int(value)
    base = 1024 if "I" in unit or len(unit) == 1 else 1000
    return int(value * base ** powers[unit[0]])


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _describe(shape: ModelShape, setup: TrainSetup) -> list[str]:
    offload = ", offload_params" if setup.offload_params else ""
    return [
        f"model: {shape.total_params / 1e9:.3f}B params (L={shape.num_layers}, H={shape.hidden_size}, "
        f"heads={shape.num_heads}/{shape.num_kv_heads}, I={shape.intermediate_size}, V={shape.vocab_size}"
        f"{', tied' if shape.tied_embeddings else ''}); trainable "
        f"{(setup.trainable_params or shape.total_params) / 1e9:.3f}B",
        f"run: T={setup.tokens} tokens x batch {setup.batch_size}, {setup.dtype}, {setup.world_size} GPU(s), "
        f"{f'tensor_parallel_size {setup.tp}, ' if setup.tp > 1 else ''}"
        f"FSDP {'on' if setup.fsdp or setup.offload_params or setup.tp > 1 else 'off'}{offload}, checkpointing "
        f"{'on' if setup.gradient_checkpointing else 'off'}"
        f"{', offload_activations' if setup.offload_activations else ''}"
        f"{f', tiled_mlp_tokens {setup.tiled_mlp_tokens}' if setup.tiled_mlp_tokens else ''}, "
        f"loss_chunk_size {setup.loss_chunk_size}"
        f"{f', GA {setup.gradient_accumulation_steps}' if setup.gradient_accumulation_steps > 1 else ''}"
        f"{', live reference model' if setup.live_reference else ''}"
        f"{f', {setup.quantization_bit}-bit base' if setup.quantization_bit else ''}",
    ]


def _fits_note(budget: MemoryBudget) -> str:
    host = " and host memory per node" if budget.host_mem is not None else ""
    return (f"(fits = GPU estimate{host} <= {USABLE_FRACTION:.0%} of the given memory; the rest is for allocator "
            "fragmentation, the CUDA context, NCCL buffers and the host runtime, which the estimate leaves out)")


def format_estimate(shape: ModelShape, setup: TrainSetup, gpu_mem: int | MemoryBudget) -> str:
    budget = gpu_mem if isinstance(gpu_mem, MemoryBudget) else MemoryBudget(gpu_mem)
    best, table = suggest_sp(shape, setup, budget)
    chosen = table[setup.sp] if setup.sp in table else estimate_memory(shape, setup)
    lines = _describe(shape, setup) + [
        "",
        f"breakdown per process at sequence_parallel_size={setup.sp} (GPU 'at peak' = alive at the GPU's peak "
        f"moment, '{chosen.peak_moment}'; host peak moment '{chosen.host_peak_moment}', x{budget.gpus_per_node} "
        "processes per node):",
        "| term | GPU size | GPU at peak | host |",
        "| --- | --- | --- | --- |",
    ]
    for name, size in chosen.host_components.items():
        gpu = chosen.components.get(name)
        gpu_cells = f"{_gib(gpu)} | {_gib(chosen.at_peak[name])}" if gpu is not None else "- | -"
        lines.append(f"| {name} | {gpu_cells} | {_gib(size)} |")
    lines.append(f"| **peak per process** | | **{_gib(chosen.total)}** | **{_gib(chosen.host_total)}** |")
    lines.append(f"| **host peak per node** | | | **{_gib(budget.node_host_bytes(chosen))}** |")
    lines += ["", f"per-GPU peak by SP degree (GPU memory {_gib(budget.gpu_mem)}"
                  f"{f', host memory per node {_gib(budget.host_mem)}' if budget.host_mem else ''}):",
              "| sequence_parallel_size | tokens per rank | activations | GPU peak | host per node | fits |",
              "| --- | --- | --- | --- | --- | --- |"]
    for sp, est in table.items():
        tokens = replace(setup, sp=sp).local_tokens
        lines.append(f"| {sp} | {tokens} | {_gib(est.components['activations'])} | {_gib(est.total)} | "
                     f"{_gib(budget.node_host_bytes(est))} | {'yes' if budget.fits(est) else 'no'} |")
    if best is None:
        hint = "" if setup.offload_params else "offload_params: true, "
        lines.append(f"suggestion: no SP degree up to {setup.world_size} fits; use more GPUs, LoRA, "
                     f"{hint}offload_activations: true, or a shorter cutoff_len")
    else:
        lines.append(f"suggestion: sequence_parallel_size: {best}")
    lines.append(_fits_note(budget))
    return "\n".join(lines)


def format_max_length(shape: ModelShape, setup: TrainSetup, budget: MemoryBudget, docs_per_row: int) -> str:
    lines = _describe(shape, setup)
    lines[1] = lines[1].replace(f"T={setup.tokens} tokens",
                                "T=cutoff_len" if docs_per_row == 1 else f"T={docs_per_row} x cutoff_len")
    lines += ["", f"longest cutoff_len per SP degree ({setup.world_size} GPU(s) of {_gib(budget.gpu_mem)}"
                  f"{f', host memory per node {_gib(budget.host_mem)}' if budget.host_mem else ''}"
                  f", {budget.gpus_per_node} processes per node; multiples of {LENGTH_RESOLUTION}):",
              "| sequence_parallel_size | max cutoff_len | GPU peak | host per node | limited by |",
              "| --- | --- | --- | --- | --- |"]
    for sp in sp_degrees(setup.world_size // setup.tp):
        found = max_cutoff_len(shape, replace(setup, sp=sp), budget, docs_per_row)
        if found.cutoff_len is None:
            lines.append(f"| {sp} | none | | | {found.limited_by} |")
            continue
        est = found.estimate
        lines.append(f"| {sp} | {found.cutoff_len} | {_gib(est.total)} | {_gib(budget.node_host_bytes(est))} | "
                     f"{found.limited_by} |")
    lines.append(_fits_note(budget))
    lines.append("(estimates from longtune.estimate.estimate_memory, not measurements)")
    return "\n".join(lines)


# Keys a training run needs but a memory estimate does not: filled with placeholders when absent.
RUN_ONLY_PLACEHOLDERS = {"dataset": "builtin:sft_demo", "output_dir": "estimate-placeholder"}


def estimate_config(config_path: str | None, overrides: list[str], model: str | None):
    """The Config of `config_path` + overrides, without demanding the keys only a run needs (dataset,
    output_dir; model_name_or_path when --model gives the shape)."""
    from longtune.config import load_config, parse_override, read_yaml_file

    given: set[str] = {parse_override(item)[0] for item in overrides}
    if config_path is not None:
        try:
            loaded = read_yaml_file(config_path) or {}
        except (ConfigError, OSError):
            loaded = {}  # load_config reports the problem in its own words
        if isinstance(loaded, dict):
            given |= set(loaded)
    placeholders = dict(RUN_ONLY_PLACEHOLDERS)
    if model is not None:
        placeholders["model_name_or_path"] = "builtin:tiny"
    filled = [f"{k}={v}" for k, v in placeholders.items() if k not in given]
    return load_config(config_path, filled + list(overrides))


def cmd_estimate(args: argparse.Namespace) -> int:
    from longtune.models.loader import load_model_config

    from longtune.cli import split_config_args

    config_path, items = split_config_args("estimate", args.config_and_overrides, required=False)
    if config_path is None and not items and args.model is None:
        raise ConfigError("estimate: give --model NAME|config.json, a CONFIG.yaml and/or key=value overrides "
                          "(see longtune estimate --help)")
    if args.gpus < 1:
        raise ConfigError(f"estimate: --gpus must be >= 1, got {args.gpus}")
    cfg = estimate_config(config_path, items, args.model)
    shape = (shape_from_name_or_path(args.model) if args.model is not None
             else ModelShape.from_hf_config(load_model_config(cfg.model)))
    per_node = args.gpus_per_node or min(args.gpus, 8)
    if per_node < 1:
        raise ConfigError(f"estimate: --gpus-per-node must be >= 1, got {per_node}")
    budget = MemoryBudget(parse_size(args.gpu_mem), parse_size(args.host_mem, "--host-mem") if args.host_mem else None,
                          per_node)
    setup = setup_from_config(cfg, shape, args.gpus, tokens=args.length)
    if args.gpus % setup.sp:
        raise ConfigError(f"key 'sequence_parallel_size': {setup.sp} does not divide --gpus {args.gpus}")
    if args.gpus % (setup.sp * setup.tp):
        raise ConfigError(f"key 'tensor_parallel_size': {setup.tp} x sequence_parallel_size {setup.sp} does not "
                          f"divide --gpus {args.gpus}")
    if args.max_length:
        from longtune.stages import stage_class

        docs_per_row = stage_class(cfg.train.stage).docs_per_row
        print(format_max_length(shape, setup, budget, docs_per_row=docs_per_row))
    else:
        print(format_estimate(shape, setup, budget))
    return 0


def add_estimate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `longtune estimate` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "estimate",
        help="predicted peak GPU and host memory, broken down; suggests sequence_parallel_size; --max-length",
        description=(
            "Predict the peak memory of one GPU (params, grads, optimizer, checkpointed activations, one layer's "
            "recompute, the loss chunk, attention workspace) and the host memory of each node (model load, "
            "offloaded parameters/optimizer state and activations) for a training config, and the smallest SP "
            "degree that fits --gpu-mem; with --max-length, the longest cutoff_len per SP degree. The model shape "
            "comes from --model (a named shape or a config.json) or the config's model (no weights are loaded); "
            "dataset and output_dir are not needed. The formula: longtune.estimate.estimate_memory; its "
            "validation: docs/benchmarks.md."
        ),
    )
    parser.add_argument("config_and_overrides", nargs="*", metavar="CONFIG.yaml | key=value")
    parser.add_argument("--model", default=None, metavar="NAME|config.json",
                        help="model shape: a named shape (e.g. llama-3.1-8b, qwen2.5-7b, qwen2.5-72b) or a "
                             "config.json / model directory; default: the config's model_name_or_path")
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs (processes) of the run (default 1)")
    parser.add_argument("--gpu-mem", default="80GiB", help="memory per GPU, e.g. 80GiB, 40GB (default 80GiB)")
    parser.add_argument("--host-mem", default=None,
                        help="host memory per node, e.g. 1TiB (default: reported, not checked)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="processes sharing one node's host memory (default min(--gpus, 8))")
    parser.add_argument("--max-length", action="store_true",
                        help="report the longest cutoff_len that fits, per SP degree, with GPU and host memory")
    parser.add_argument("--length", type=int, default=None, metavar="T",
                        help="tokens per row (default: cutoff_len; two documents of it for dpo/kto/rm)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks for errors")
    parser.set_defaults(func=cmd_estimate)
    return parser
