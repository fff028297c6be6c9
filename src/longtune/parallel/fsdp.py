"""FSDP2 (`fully_shard`) over all dp x sp ranks, the ZeRO-3 equivalent: parameters, gradients and optimizer
state are sharded over the whole world (with tensor parallelism: over dp x sp, tp being the inner dimension);
bf16/fp16 compute with fp32 master weights through a MixedPrecisionPolicy; optional CPU offload of parameters
and optimizer state.

Why every rank (not only dp): SP ranks hold identical parameters, so sharding over them too divides the
parameter memory by sp as well. Gradients must be *summed*: each rank's loss is already its share of one global,
token-normalised sum (see gradient_scale).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from longtune.errors import ConfigError
from longtune.models.loader import quantized_modules
from longtune.parallel.mesh import ParallelDims


class RootForward(nn.Module):
    """Runs a stage (decoder + chunked head + loss) inside one call of the root module.

    FSDP2 gathers the root's own parameters (embeddings, final norm, LM head) in the root's pre-forward hook and
    schedules their gradient reduction from it, so the whole stage must run inside the root's forward; a stage
    that called the decoder and the head separately would bypass those hooks. Without FSDP it is a plain
    pass-through. Stages return tensors or NamedTuples (so FSDP can hook the output tensors for backward).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, stage_fn, inputs, loss_chunk_size: int):
        return stage_fn(self.model, inputs, loss_chunk_size)


@dataclass(frozen=True)
class ShardingPlan:
    enabled: bool
    reshard_after_forward: bool = True  # ZeRO-3; False keeps gathered params until backward (ZeRO-2-like)
    offload: bool = False


def plan_from_config(fsdp: bool | None, offload_params: bool, deepspeed: str | None, world_size: int,
                     log=print, tp: int = 1) -> ShardingPlan:
    """`fsdp: null` means on whenever there is more than one process. A DeepSpeed ZeRO json maps onto FSDP2.
    Tensor parallelism always runs under FSDP2 (its DTensor state dicts, checkpoints and gradient sums over
    dp x sp are FSDP's); `fsdp: false` or ZeRO-0 with tp > 1 is refused."""
    plan = _sharding_plan(fsdp, offload_params, deepspeed, world_size, log)
    if tp > 1 and not plan.enabled:
        raise ConfigError(f"key 'tensor_parallel_size': {tp} runs under FSDP2; remove fsdp: false (or the "
                          "ZeRO-0 deepspeed config)")
    return plan


def _sharding_plan(fsdp: bool | None, offload_params: bool, deepspeed: str | None, world_size: int,
                   log) -> ShardingPlan:
    if deepspeed:
        path = Path(deepspeed)
        try:
            ds = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"key 'deepspeed': cannot read '{deepspeed}' as JSON ({exc})".splitlines()[0]) from None
        zero = ds.get("zero_optimization", {}) if isinstance(ds, dict) else {}
        stage = int(zero.get("stage", 0) or 0)
        offload = any(
            isinstance(zero.get(k), dict) and zero[k].get("device") == "cpu" for k in ("offload_param", "offload_optimizer")
        )
        log(
            f"notice: deepspeed config {path.name} (ZeRO-{stage}{', offload' if offload else ''}) is mapped onto "
            f"FSDP2: {'full sharding' if stage == 3 else 'sharded grads/optimizer, params kept gathered in step'}"
            f"{' + CPU offload' if offload else ''}"
        )
        if stage == 0:
            return ShardingPlan(enabled=False)
        return ShardingPlan(enabled=True, reshard_after_forward=stage == 3, offload=offload or offload_params)
    if offload_params and fsdp is False:
        raise ConfigError("key 'offload_params' works through FSDP2's CPU offload; remove fsdp: false")
    # offload_params on one process: FSDP2 at world size 1 is what keeps parameters, gradients and optimizer
    # state in host memory and steps the optimizer there.
    enabled = fsdp if fsdp is not None else (world_size > 1 or offload_params)
    return ShardingPlan(enabled=enabled, offload=offload_params)


def apply_fsdp(root: RootForward, dims: ParallelDims, layers: nn.ModuleList, compute_dtype: torch.dtype,
               plan: ShardingPlan) -> None:
    """fully_shard each decoder layer, then the root (embeddings, norm, head, anything outside the layers)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict = {"mesh": dims.fsdp_mesh()}
    quantized = {p for m in quantized_modules(root) for p in m.parameters(recurse=False)}
    if quantized:
        # A quantized base layer stays whole on every rank (0.5-1 byte per parameter, frozen, no gradient, no
        # optimizer state): a 4-bit weight is only meaningful with its QuantState, which FSDP2's dim-0 shards
        # would not carry. Only the adapters and the unquantized rest (embeddings, norms, head) are sharded.
        kwargs["ignored_params"] = quantized
    if compute_dtype in (torch.bfloat16, torch.float16):
        # Master weights stay fp32 (the optimizer steps on them); compute in bf16/fp16; reduce grads in fp32.
        # No cast of forward inputs: the root's inputs carry fp32 values that are not activations (reference
        # log-prob sums: cast to bf16, DPO's first loss is 0.676, not ln 2). Activations are bf16 anyway: they
        # start at the embedding, whose weight is gathered in param_dtype.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                                   cast_forward_inputs=False)
    if plan.offload:
        # Pinned host memory needs an accelerator; on a CPU-only run the policy still runs, unpinned.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=dims.device.type == "cuda")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=plan.reshard_after_forward, **kwargs)
    # The root's parameters are needed again right at the start of backward: keep them gathered.
    fully_shard(root, reshard_after_forward=False, **kwargs)
    # FSDP averages gradients over the world; the trainer multiplies its backward loss by the world size
    # (gradient_scale) so that the result is the sum. (A divide factor of 1 would need ReduceOp.PREMUL_SUM,
    # which gloo lacks.)


def gradient_scale(plan: ShardingPlan, dims: ParallelDims) -> float:
    """Factor on the backward loss that turns FSDP's gradient average over its dp x sp ranks into their sum
    (tp ranks are not averaged over: each holds its own slice, or a copy of a replicated parameter's gradient)."""
    return float(dims.data_parallel_size) if plan.enabled else 1.0


def all_reduce_gradients(params: list[nn.Parameter], dims: ParallelDims) -> None:
    """Without FSDP: sum gradients over the dp x sp ranks (the ranks of different tokens; a TP-split gradient is
    summed slice by slice). Each rank's loss is its share of one global sum (already divided by the step's global
    token count), so the sum is the gradient of the whole step."""
    if dims.data_parallel_size == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dims.all_reduce_sum(flat)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view that in-place writes go through), or the tensor itself."""
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor


def clip_gradients(params: list[nn.Parameter], max_norm: float, dims: ParallelDims) -> float:
    """Scale gradients to a global L2 norm of at most `max_norm`; returns the norm before clipping.

    Gradients may be plain tensors or DTensors on different meshes (FSDP's dp x sp, FSDP x tp, tp alone), which
    torch's clip_grad_norm_ cannot stack. Each rank sums the squares of its local pieces, each divided by the
    number of ranks holding a copy of that piece (world / ranks it is split over), and one all-reduce over the
    world adds them up: each element of each full gradient is counted exactly once.
    """
    per_device: dict[torch.device, torch.Tensor] = {}  # summed where the gradients live (CPU under offload)
    for p in params:
        if p.grad is None:
            continue
        local = _local(p.grad)
        split_over = 1
        if hasattr(p.grad, "placements"):
            mesh = p.grad.device_mesh
            # Every non-replicated mesh dimension splits it (Shard, and FSDP x TP's _StridedShard, for which
            # is_shard() is False); gradients here are never Partial.
            split_over = math.prod(mesh.size(i) for i, pl in enumerate(p.grad.placements) if not pl.is_replicate())
        squares = local.detach().double().pow(2).sum() / (dims.world_size // split_over)
        per_device[local.device] = per_device.get(local.device, 0) + squares
    total = torch.zeros((), dtype=torch.float64, device=dims.device)
    for squares in per_device.values():
        total += squares.to(dims.device)
    if dims.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    norm = float(total.sqrt())
    # As torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) whenever that is below 1.
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for p in params:
            if p.grad is not None:
                _local(p.grad).mul_(coef)
    return norm


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(root: RootForward) -> dict[str, torch.Tensor]:
    """The unsharded model state (keys of the wrapped model), on CPU; collective under FSDP, complete on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if is_fsdp(root):
        state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = root.state_dict()
    # A tied parameter (lm_head sharing embed_tokens) appears under every name; keep its first name only, as
    # the unsharded model's own save would.
    seen: set[int] = set()
    tied_aliases = set()
    for name, param in root.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied_aliases.add(name)
        seen.add(id(param))
    prefix = "model."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k not in tied_aliases}


def load_full_state_dict(root: RootForward, state: dict[str, torch.Tensor]) -> None:
    """Load unsharded weights (keys of the wrapped model) into a possibly sharded root; every rank passes them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    prefixed = {f"model.{k}": v for k, v in state.items()}
    if is_fsdp(root):
        set_model_state_dict(root, prefixed, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        root.load_state_dict(prefixed, strict=False)
