"""Selective activation checkpointing (`gradient_checkpointing_policy: selective`): the same loss and gradients as
whole-layer recompute and as no checkpointing (float64), the matmuls really not recomputed in backward, the same
run under sequence parallelism, and the combinations it cannot serve refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longtune.config import load_config
from longtune.errors import ConfigError
from longtune.parallel.activation import SELECTIVE_SAVED_OPS, apply_tiled_mlp, enable_checkpointing
from tests.conftest import base_overrides
from tests.launch import final_params, launch, max_rel_diff, metric_rows

B, T, H, I, V = 2, 29, 32, 64, 64
TOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(attn: str) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
                         attn_implementation=attn)
    return Qwen2ForCausalLM(config).to(torch.float64).train()


class _CountMatmuls(TorchDispatchMode):
    """Counts the saved-op kinds (matmuls, fused attention) that run while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SELECTIVE_SAVED_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _run(model) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients, and how many matmuls the backward ran (recomputed forward matmuls included)."""
    g = torch.Generator().manual_seed(1)
    input_ids, labels = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=labels).loss
    counter = _CountMatmuls()
    with counter:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, counter.count


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_selective_equals_full_and_recomputes_no_matmul(attn):
    plain = _tiny(attn)
    full, selective = copy.deepcopy(plain), copy.deepcopy(plain)
    enable_checkpointing(full, policy="full")
    enable_checkpointing(selective, policy="selective")
    want_loss, want_grads, backward_matmuls = _run(plain)
    results = {"full": _run(full), "selective": _run(selective)}
    for name, (loss, grads, _) in results.items():
        assert abs(loss - want_loss) <= TOL, name
        assert grads.keys() == want_grads.keys() and grads
        for key in grads:
            assert (grads[key] - want_grads[key]).abs().max().item() <= TOL, (name, key)
    # full recomputes every forward matmul of the layers inside backward; selective reuses the saved outputs,
    # so its backward runs exactly the matmuls of a model without checkpointing.
    assert results["selective"][2] == backward_matmuls
    assert results["full"][2] > backward_matmuls


def test_selective_with_lora_matches_full():
    from peft import LoraConfig, get_peft_model

    def lora():
        torch.manual_seed(5)
        return get_peft_model(_tiny("sdpa"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))

    full, selective = lora(), lora()
    enable_checkpointing(full, policy="full")
    enable_checkpointing(selective, policy="selective")
    (loss_a, grads_a, _), (loss_b, grads_b, _) = _run(full), _run(selective)
    assert abs(loss_a - loss_b) <= TOL and grads_a.keys() == grads_b.keys() and grads_a
    assert max((grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a) <= TOL


def test_selective_refuses_tiled_mlp_and_offload(tmp_path):
    model = _tiny("sdpa")
    apply_tiled_mlp(model, 8)
    with pytest.raises(ConfigError, match="tiled_mlp_tokens"):
        enable_checkpointing(model, policy="selective")
    with pytest.raises(ConfigError, match="offload_activations"):
        enable_checkpointing(_tiny("sdpa"), offload=True, policy="selective")
    base = base_overrides(tmp_path / "d.json", tmp_path / "out")
    for extra, key in ((["gradient_checkpointing=false"], "gradient_checkpointing"),
                       (["gradient_checkpointing=true", "offload_activations=true"], "offload_activations"),
                       (["gradient_checkpointing=true", "tiled_mlp_tokens=16"], "tiled_mlp_tokens")):
        with pytest.raises(ConfigError, match=key) as info:
            load_config(None, [*base, "gradient_checkpointing_policy=selective", *extra])
        assert "\n" not in str(info.value)


def test_selective_under_sequence_parallelism_matches_single_process(alpaca_file, tmp_path):
    """sp=2 (zigzag ring, FSDP) with selective checkpointing == sp=1 without checkpointing: losses and parameters
    after 3 steps."""
    from longtune.trainer import train

    reference = tmp_path / "sp1"
    train(load_config(None, base_overrides(alpaca_file, reference, per_device_train_batch_size=2)))
    out = tmp_path / "sp2_selective"
    launch(2, base_overrides(alpaca_file, out, per_device_train_batch_size=2, sequence_parallel_size=2,
                              sequence_parallel_mode="zigzag_ring", gradient_checkpointing=True,
                              gradient_checkpointing_policy="selective"))
    want = [r["loss"] for r in metric_rows(reference) if "loss" in r]
    got = [r["loss"] for r in metric_rows(out) if "loss" in r]
    assert len(got) == len(want) == 3
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-10
    assert max_rel_diff(final_params(out), final_params(reference)) <= 1e-8


@pytest.mark.slow
def test_bench_measures_both_policies_in_one_run(tmp_path, capsys):
    """`longtune bench --checkpointing full,selective`: both rows on the same model and length, the same losses,
    selective holding more live tensor memory (it keeps the matmul outputs), and their ratios reported."""
    import json

    from longtune.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--lengths", "256", "--steps", "2", "--tensor-memory",
                 "--checkpointing", "full,selective", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["checkpoint_policy"]: r for r in report["rows"]}
    assert set(rows) == {"full", "selective"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["selective"]["losses"] == pytest.approx(rows["full"]["losses"], rel=1e-6)
    assert rows["selective"]["peak_tensor_mib"] > rows["full"]["peak_tensor_mib"]
    (ratio,) = report["checkpointing_comparisons"]
    assert ratio["tokens_per_s_ratio"] == round(rows["selective"]["tokens_per_s"] / rows["full"]["tokens_per_s"], 3)
    assert "selective/full checkpointing peak memory" in capsys.readouterr().out
