"""Tiled MLP and checkpointing with activation offload: the same loss and gradients as the plain model (float64),
unchanged state-dict keys, and a T x intermediate activation that is never saved or built whole."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from longtune.errors import ConfigError
from longtune.parallel import activation
from longtune.parallel.activation import TiledMLP, apply_tiled_mlp, enable_checkpointing

B, T, H, I, V = 2, 37, 32, 96, 64
TOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(arch: str):
    from transformers import LlamaConfig, Qwen2Config

    return {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch](
        vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_cache=False, attn_implementation="eager")


def _tiny(arch: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(0)
    model_cls = {"qwen2": Qwen2ForCausalLM, "llama": LlamaForCausalLM}[arch]
    return model_cls(_config(arch)).to(torch.float64).train()


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def _loss_and_grads(model, context=contextlib.nullcontext) -> tuple[float, dict[str, torch.Tensor]]:
    input_ids, labels = _batch()
    model.zero_grad(set_to_none=True)
    with context():
        loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def _assert_same(got, want) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = got, want
    assert abs(loss_a - loss_b) <= TOL
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        diff = (grads_a[name] - grads_b[name]).abs().max().item()
        assert diff <= TOL, f"{name}: max abs diff {diff:.3e}"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("tile", [1, 5, 16, 64])
def test_tiled_mlp_matches_untiled(arch, tile):
    plain = _tiny(arch)
    tiled = copy.deepcopy(plain)
    keys = list(tiled.state_dict())
    assert apply_tiled_mlp(tiled, tile) == 2
    assert isinstance(tiled.model.layers[0].mlp, TiledMLP)
    assert list(tiled.state_dict()) == keys
    assert [n for n, _ in tiled.named_parameters()] == [n for n, _ in plain.named_parameters()]
    _assert_same(_loss_and_grads(tiled), _loss_and_grads(plain))


def test_state_dict_round_trip_and_reapply():
    plain, tiled = _tiny("qwen2"), _tiny("qwen2")
    apply_tiled_mlp(tiled, 8)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)
    tiled.load_state_dict(plain.state_dict(), strict=True)  # untiled weights load into the tiled model as-is
    assert apply_tiled_mlp(tiled, 3) == 2  # applying again changes the tile size, does not nest
    mlp = tiled.model.layers[1].mlp
    assert mlp.tile_tokens == 3 and isinstance(mlp.gate_proj, torch.nn.Linear)
    _assert_same(_loss_and_grads(tiled), _loss_and_grads(plain))
    tiled.eval()
    assert not tiled.model.layers[0].mlp.training and not tiled.model.layers[0].mlp.up_proj.training
    with torch.no_grad():
        ids, _ = _batch()
        torch.testing.assert_close(tiled(input_ids=ids).logits, plain.eval()(input_ids=ids).logits, rtol=0, atol=TOL)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiled_mlp_under_layer_checkpointing(arch):
    plain = _tiny(arch)
    tiled = copy.deepcopy(plain)
    apply_tiled_mlp(tiled, 5)
    enable_checkpointing(tiled, offload=False)
    assert tiled.model.layers[0].gradient_checkpointing
    _assert_same(_loss_and_grads(tiled), _loss_and_grads(plain))


def test_tiled_mlp_with_lora():
    from peft import LoraConfig, get_peft_model

    def lora(model):
        # init_lora_weights=False: B is random too, so the A gradients are not all zero.
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                            target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
        torch.manual_seed(3)
        return get_peft_model(model, config)

    plain = lora(_tiny("qwen2"))
    tiled = lora(_tiny("qwen2"))
    keys = list(tiled.state_dict())
    assert apply_tiled_mlp(tiled, 7) == 2
    assert list(tiled.state_dict()) == keys
    enable_checkpointing(tiled, offload=False)
    got, want = _loss_and_grads(tiled), _loss_and_grads(plain)
    assert all("lora_" in name for name in got[1]) and any("mlp.gate_proj.lora_A" in name for name in got[1])
    assert all(g.abs().max() > 0 for g in got[1].values())
    _assert_same(got, want)


def _mlp_case(tile: int | None):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    torch.manual_seed(0)
    mlp = Qwen2MLP(_config("qwen2")).to(torch.float64)
    if tile is not None:
        mlp = TiledMLP(mlp, tile)
    x = torch.randn(B, T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    return mlp, x


def _largest_saved(tile: int | None) -> int:
    """numel of the largest tensor autograd keeps for backward through one MLP."""
    mlp, x = _mlp_case(tile)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mlp(x)
    out.sum().backward()
    return max(sizes)


class _LargestIntermediate(TorchDispatchMode):
    """Largest tensor with a trailing intermediate_size dimension that any op produces (forward or backward),
    in tokens; weights and their gradients ([H, I]) are told apart by their shape."""

    def __init__(self):
        super().__init__()
        self.tokens = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == I and tuple(t.shape) != (H, I):
                self.tokens = max(self.tokens, t.numel() // I)
        return out


@pytest.mark.parametrize("tile", [1, 5, 16, 64])
def test_tiled_mlp_never_holds_the_whole_intermediate(tile):
    untiled, tiled = _largest_saved(None), _largest_saved(tile)
    assert untiled == B * T * I  # the untiled MLP saves [B, T, intermediate] tensors for backward
    assert tiled <= untiled * tile / T
    assert tiled <= tile * H  # only the tile inputs: one tile, hidden wide

    for size, bound in ((None, B * T), (tile, tile)):
        mlp, x = _mlp_case(size)
        with _LargestIntermediate() as seen:
            mlp(x).sum().backward()
        assert seen.tokens == bound, (size, seen.tokens)


def test_apply_tiled_mlp_errors():
    with pytest.raises(ConfigError, match="tile_tokens"):
        apply_tiled_mlp(_tiny("qwen2"), 0)
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]))
    with pytest.raises(ConfigError, match="no decoder layer"):
        apply_tiled_mlp(model, 4)
    hooked = _tiny("qwen2")
    hooked.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    with pytest.raises(ConfigError, match="hooks"):
        apply_tiled_mlp(hooked, 4)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_checkpointing_with_offload_is_exact(arch):
    plain = _tiny(arch)
    ckpt, offloaded = copy.deepcopy(plain), copy.deepcopy(plain)
    assert enable_checkpointing(ckpt, offload=False) is contextlib.nullcontext
    context = enable_checkpointing(offloaded, offload=True)  # CPU-only: activations already on the host
    assert context is contextlib.nullcontext
    assert offloaded.model.layers[1].gradient_checkpointing
    want = _loss_and_grads(plain)
    _assert_same(_loss_and_grads(ckpt), want)
    _assert_same(_loss_and_grads(offloaded, context), want)


def test_offload_fallback_for_transformers_without_offload(monkeypatch):
    """An older transformers (no `offload` argument): checkpointing is still enabled, and each forward runs under
    save_on_cpu. Pretend there is an accelerator so the fallback engages; on a CUDA-less host save_on_cpu copies
    into unpinned memory, which exercises its pack/unpack path with the exact same numbers."""
    plain = _tiny("llama")
    model = copy.deepcopy(plain)
    calls = []

    def old_enable(activation_checkpointing_kwargs=None):
        calls.append(activation_checkpointing_kwargs)
        type(model).activation_checkpointing_enable(model, activation_checkpointing_kwargs)

    monkeypatch.setattr(model, "activation_checkpointing_enable", old_enable)
    monkeypatch.setattr(activation, "_accelerator_type", lambda: "cuda")
    context = enable_checkpointing(model, offload=True)
    assert calls == [{"use_reentrant": False}] and model.model.layers[0].gradient_checkpointing
    assert context is not contextlib.nullcontext
    assert isinstance(context(), torch.autograd.graph.save_on_cpu)
    _assert_same(_loss_and_grads(model, context), _loss_and_grads(plain))
