"""Activation memory for long sequences: decoder-layer checkpointing (whole-layer recompute, or selective: the
matmul and attention outputs kept), optionally with its saved layer inputs offloaded to host memory, and a tiled
MLP whose T x intermediate_size activation never exists whole.

Both are applied *to* an untouched HF model at setup, in this order: peft adapters, `apply_tiled_mlp`,
`enable_checkpointing`, then FSDP. State-dict keys do not change, so checkpoints and exports are unaffected.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from longtune.errors import ConfigError
from longtune.models.loader import decoder_layer_list, unwrap_base

ForwardContext = Callable[[], contextlib.AbstractContextManager]


class TiledMLP(nn.Module):
    """A decoder layer's MLP run over its tokens in tiles of `tile_tokens`, each tile under non-reentrant
    checkpointing.

    An MLP is token-wise, so tiling changes nothing but the order of float sums in the weight gradients. Untiled,
    backward keeps gate/up/activation outputs of shape [tokens, intermediate_size] (about 4x the hidden size
    each); tiled, only the tile inputs ([tile_tokens, hidden] each, i.e. one copy of the layer input) are saved,
    and one tile's intermediate is recomputed at a time in backward.

    The wrapper takes over the original MLP's parameters, buffers and child modules as its own (the very same
    dicts), so every parameter keeps its exact name (`model.layers.0.mlp.gate_proj.weight`) and peft adapters
    injected into the MLP's linears come along. Plain attributes (e.g. `config`, `intermediate_size`) are copied.
    Its forward is the original class's `forward`, called with the wrapper as `self`; an MLP whose forward
    calls other methods of its own class is therefore not supported (none of the HF dense MLPs does).
    """

    def __init__(self, mlp: nn.Module, tile_tokens: int):
        super().__init__()
        if mlp._forward_hooks or mlp._forward_pre_hooks or mlp._backward_hooks or "forward" in vars(mlp):
            # Hooks or an instance-level forward (accelerate's device-map hooks) would be bypassed silently.
            raise ConfigError(f"tiled MLP: {type(mlp).__name__} has forward hooks or a patched forward; "
                              "apply the tiled MLP before anything that hooks the MLP, or turn it off")
        self._parameters = mlp._parameters
        self._buffers = mlp._buffers
        self._non_persistent_buffers_set = mlp._non_persistent_buffers_set
        self._modules = mlp._modules
        for name, value in vars(mlp).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self.training = mlp.training
        self.original_class = type(mlp)
        self.tile_tokens = tile_tokens

    def extra_repr(self) -> str:
        return f"{self.original_class.__name__}, tile_tokens={self.tile_tokens}"

    def forward(self, hidden_states: Tensor) -> Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # [B, T, H] -> [B*T, H]: tile all tokens
        run = self.original_class.forward
        outputs = []
        for start in range(0, tokens.shape[0], self.tile_tokens):
            tile = tokens[start : start + self.tile_tokens]
            if torch.is_grad_enabled():
                out = checkpoint(run, self, tile, use_reentrant=False)
            else:
                out = run(self, tile)
            if not isinstance(out, Tensor):
                raise ConfigError(f"tiled MLP: {self.original_class.__name__} returns {type(out).__name__}, not "
                                  "a tensor (a mixture-of-experts block?); turn the tiled MLP off for this model")
            outputs.append(out)
        return torch.cat(outputs).reshape(*hidden_states.shape[:-1], outputs[0].shape[-1])


def apply_tiled_mlp(model: nn.Module, tile_tokens: int) -> int:
    """Replace `layer.mlp` of every decoder layer by a `TiledMLP`; returns how many layers now have one.

    Call after peft (adapters live inside the MLP's linears and move with it) and before FSDP. Applying it again
    only updates the tile size. State-dict keys and parameter names are unchanged.
    """
    if tile_tokens < 1:
        raise ConfigError(f"tiled MLP: tile_tokens must be a positive number of tokens, got {tile_tokens}")
    _, layers = decoder_layer_list(model)
    count = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, TiledMLP):
            mlp.tile_tokens = tile_tokens
        elif isinstance(mlp, nn.Module):
            layer.mlp = TiledMLP(mlp, tile_tokens)
        else:
            continue
        count += 1
    if count == 0:
        raise ConfigError(f"tiled MLP: no decoder layer of {type(unwrap_base(model)).__name__} has an `mlp` "
                          "submodule; turn the tiled MLP off for this model")
    return count


def _accelerator_type() -> str | None:
    """The accelerator saved activations would be offloaded from ('cuda', ...), or None on a CPU-only host."""
    if not torch.accelerator.is_available():
        return None
    return torch.accelerator.current_accelerator().type


CheckpointPolicyName = Literal["full", "selective"]

_aten = torch.ops.aten
# What `selective` keeps from the forward: the outputs of the matmuls (the linear layers, and the bmm of the
# pure-PyTorch attention kernels) and of the fused attention kernels, i.e. the FLOP-heavy ops. Norms, rotary
# embeddings, activations, residual adds and casts are recomputed in backward: cheap, and memory-bound anyway.
# `linear` and `matmul` are composite ops that reach the dispatcher as mm / addmm / bmm, so they are covered.
SELECTIVE_SAVED_OPS = tuple(
    getattr(_aten, name).default
    for name in (
        "mm", "addmm", "bmm", "baddbmm",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward", "_efficient_attention_forward",
    )
    if hasattr(_aten, name)
)


def checkpoint_context_fn(policy: CheckpointPolicyName) -> Callable | None:
    """The `context_fn` of torch's non-reentrant checkpoint for a policy: None for `full` (recompute the whole
    layer), else the selective-checkpoint contexts that keep `SELECTIVE_SAVED_OPS` outputs (MUST_SAVE) and
    recompute every other op (PREFER_RECOMPUTE)."""
    if policy == "full":
        return None
    if policy == "selective":
        return functools.partial(create_selective_checkpoint_contexts, list(SELECTIVE_SAVED_OPS))
    raise ConfigError(f"key 'gradient_checkpointing_policy': expected full or selective, got {policy!r}")


def enable_checkpointing(model: nn.Module, offload: bool = False,
                         policy: CheckpointPolicyName = "full") -> ForwardContext:
    """Turn on non-reentrant checkpointing of every decoder layer; with `offload`, the layer inputs it keeps for
    the recompute wait in pinned host memory instead of on the accelerator (a device-to-host copy in forward, a
    host-to-device copy in backward; frees layers x tokens x hidden of device memory).

    Returns a factory of the context manager to wrap each training forward in (the backward needs nothing):
    `contextlib.nullcontext` when the model's own `activation_checkpointing_enable(offload=...)` does the
    offload (transformers >= 5.x), `torch.autograd.graph.save_on_cpu` on an older transformers (there it moves
    every tensor saved in the forward, not only layer inputs: with all layers checkpointed that is almost the
    same set).

    On a CPU-only host the activations already live in host memory, so `offload` is a no-op (transformers'
    offload would even fail there: pinned memory needs an accelerator).

    `policy: selective` keeps the matmul/attention outputs of each layer's forward for its backward (see
    `SELECTIVE_SAVED_OPS`) and recomputes only the rest. It is refused with `offload` (the kept outputs would
    stay on the device, so the offload would no longer free what it promises) and with a tiled MLP (keeping each
    tile's matmul outputs would undo the tiling): `TrainConfig` validation says so in one line, and so does this.
    """
    if policy != "full":
        if offload:
            raise ConfigError("gradient_checkpointing_policy: selective cannot be combined with offload_activations "
                              "(the kept matmul outputs stay on the GPU); use policy full or turn the offload off")
        _, layers = decoder_layer_list(model)
        if any(isinstance(getattr(layer, "mlp", None), TiledMLP) for layer in layers):
            raise ConfigError("gradient_checkpointing_policy: selective cannot be combined with tiled_mlp_tokens "
                              "(it would keep every tile's matmul outputs); use policy full or turn the tiling off")
    base = unwrap_base(model)
    device_type = _accelerator_type() if offload else None
    kwargs = {"use_reentrant": False}  # non-reentrant works with frozen embeddings (LoRA) and nested checkpoints
    context_fn = checkpoint_context_fn(policy)
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is None:  # transformers 4.x
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif "offload" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs, offload=device_type is not None)
        return contextlib.nullcontext
    else:
        enable(activation_checkpointing_kwargs=kwargs)
    if device_type is None:
        return contextlib.nullcontext
    return lambda: torch.autograd.graph.save_on_cpu(pin_memory=True, device_type=device_type)
