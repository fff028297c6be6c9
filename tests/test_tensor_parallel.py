"""Tensor parallelism through the real CLI (torchrun, gloo, float64): tp=2 (and tp=2 x sp=2) runs give the same
per-step losses and final parameters as one process; bad tp settings fail with one line naming the key."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.conftest import base_overrides
from tests.launch import final_params, launch, metric_rows


def _curve(out: Path, key: str) -> list[float]:
    return [r[key] for r in metric_rows(out) if "loss" in r]


def _assert_same_run(ref_out: Path, out: Path, label: str, steps: int = 3) -> None:
    """Same per-step loss and gradient norm (the clipped norm over DTensors of mixed meshes), same parameters."""
    for key in ("loss", "grad_norm"):
        ref, got = _curve(ref_out, key), _curve(out, key)
        assert len(got) == len(ref) == steps, label
        for a, b in zip(got, ref):
            assert abs(a - b) <= 1e-9 * max(1.0, abs(b)), (label, key, got, ref)
    ref_params, params = final_params(ref_out), final_params(out)
    assert params.keys() == ref_params.keys(), label
    worst = max(float((params[k] - ref_params[k]).abs().max() / ref_params[k].abs().max()) for k in params)
    assert worst <= 1e-9, (label, worst)


def _final_logits(final_dir: Path) -> torch.Tensor:
    """The logits of `final/` loaded by plain transformers (no longtune), on a fixed batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(final_dir), dtype=torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_sft_tp2_matches_one_process(alpaca_file, tmp_path):
    """Clipping active (max_grad_norm below every step's norm), GA 2; `final/` of the tp=2 run is a plain full
    model: transformers loads it and gives the one-process run's logits."""
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0.05, val_size=4,
                  eval_steps=2)
    launch(1, base_overrides(alpaca_file, tmp_path / "ref", **common))
    launch(2, base_overrides(alpaca_file, tmp_path / "tp2", tensor_parallel_size=2, **common))
    _assert_same_run(tmp_path / "ref", tmp_path / "tp2", "sft tp=2")
    # Evaluation runs the vocab-parallel loss without gradients.
    ref_eval = [r["eval_loss"] for r in metric_rows(tmp_path / "ref") if "eval_loss" in r]
    tp_eval = [r["eval_loss"] for r in metric_rows(tmp_path / "tp2") if "eval_loss" in r]
    assert len(ref_eval) == len(tp_eval) == 2 and max(abs(a - b) for a, b in zip(ref_eval, tp_eval)) <= 1e-9
    assert min(_curve(tmp_path / "ref", "grad_norm")) > 0.05
    ref_logits, logits = _final_logits(tmp_path / "ref" / "final"), _final_logits(tmp_path / "tp2" / "final")
    assert float((logits - ref_logits).abs().max()) <= 1e-9 * float(ref_logits.abs().max())


@pytest.fixture(scope="module")
def pt_reference(saved_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "pt_ref"
    launch(1, _pt_overrides(saved_models, out, per_device_train_batch_size=2))
    return out


def _pt_overrides(saved_models, out: Path, **extra) -> list[str]:
    """Pretraining, packed (several documents per row), on a saved Llama (tied embeddings), GA 2."""
    return base_overrides(Path("unused"), out, stage="pt", dataset="builtin:pt_demo", max_samples=40, cutoff_len=64,
                          model_name_or_path=str(saved_models["llama"]), gradient_accumulation_steps=2, **extra)


@pytest.mark.parametrize("mode", ["zigzag_ring", pytest.param("ulysses", marks=pytest.mark.slow)])
def test_pt_packed_tp2_sp2_matches_one_process(pt_reference, saved_models, tmp_path, mode):
    """4 processes: tp=2 splits the 4 query / 2 K/V heads to 2 / 1 per rank, then SP (ring or Ulysses, which
    replicates the single local K/V head) splits the sequence."""
    out = tmp_path / mode
    launch(4, _pt_overrides(saved_models, out, per_device_train_batch_size=2, tensor_parallel_size=2,
                            sequence_parallel_size=2, sequence_parallel_mode=mode))
    _assert_same_run(pt_reference, out, f"pt tp=2 x sp=2 {mode}")


def _dpo_overrides(out: Path, **extra) -> list[str]:
    values = dict(stage="dpo", dataset="builtin:dpo_demo", max_samples=24, cutoff_len=64, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, lr_scheduler_type="constant", val_size=6, eval_steps=2)
    values.update(extra)
    return base_overrides(Path("unused"), out, **values)


DPO_KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen")


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["full", "lora"])
def test_dpo_tp2_matches_one_process(tmp_path, ftype):
    """DPO (live frozen reference: a tp-split copy for full, the adapter-disabled policy for LoRA): step 0 is
    ln 2; every logged metric, the eval rows and the final parameters equal the one-process run."""
    extra = dict(finetuning_type=ftype, learning_rate=5e-3 if ftype == "lora" else 1e-3)
    launch(1, _dpo_overrides(tmp_path / "ref", **extra))
    launch(2, _dpo_overrides(tmp_path / "tp2", tensor_parallel_size=2, **extra))
    ref, got = metric_rows(tmp_path / "ref"), metric_rows(tmp_path / "tp2")
    assert len(ref) == len(got) and any("eval_loss" in r for r in ref)
    assert abs(got[0]["loss"] - math.log(2)) <= 1e-12
    for a, b in zip(ref, got):
        for key in [k for k in a if k in DPO_KEYS or k.startswith("eval_")]:
            assert abs(a[key] - b[key]) <= 1e-9 * max(1.0, abs(a[key])), (ftype, key, a[key], b[key])
    ref_params, params = final_params(tmp_path / "ref"), final_params(tmp_path / "tp2")
    assert params.keys() == ref_params.keys()
    assert max(float((params[k] - ref_params[k]).abs().max() / ref_params[k].abs().max()) for k in params) <= 1e-9


@pytest.mark.slow
def test_lora_sft_tp2_matches_one_process(alpaca_file, tmp_path):
    """LoRA on every linear layer: the adapters of colwise projections split lora_B, of rowwise ones lora_A; the
    saved adapter (full tensors) equals the one-process adapter."""
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, finetuning_type="lora",
                  learning_rate=5e-3, lora_target="all")
    launch(1, base_overrides(alpaca_file, tmp_path / "ref", **common))
    launch(2, base_overrides(alpaca_file, tmp_path / "tp2", tensor_parallel_size=2, **common))
    _assert_same_run(tmp_path / "ref", tmp_path / "tp2", "lora tp=2")


@pytest.mark.slow
def test_resume_under_tp2_and_reshard_to_tp1(alpaca_file, tmp_path):
    """A tp=2 run stopped after checkpoint-2 and resumed (tp=2, and tp=1 x dp=2: DCP reshards the optimizer
    state) gives the uninterrupted run's steps 3-4 and final parameters."""
    common = dict(gradient_accumulation_steps=2, max_steps=4, save_steps=2)
    full = tmp_path / "full"
    launch(2, base_overrides(alpaca_file, full, per_device_train_batch_size=2, tensor_parallel_size=2, **common))
    for label, extra in (("tp2", dict(per_device_train_batch_size=2, tensor_parallel_size=2)),
                         ("dp2", dict(per_device_train_batch_size=1))):
        out = tmp_path / label
        launch(2, base_overrides(alpaca_file, out, resume_from_checkpoint=str(full / "checkpoint-2"),
                                 **common, **extra))
        resumed = [r for r in metric_rows(out) if "loss" in r]
        expected = [r for r in metric_rows(full) if "loss" in r][2:]
        assert [r["step"] for r in resumed] == [3, 4], label
        for a, b in zip(resumed, expected):
            assert abs(a["loss"] - b["loss"]) <= 1e-9 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-9, (label, a, b)
        params, ref_params = final_params(out), final_params(full)
        assert max(float((params[k] - ref_params[k]).abs().max() / ref_params[k].abs().max())
                   for k in params) <= 1e-9, label


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["kto", "rm"])
def test_kto_and_rm_tp2_match_one_process(tmp_path, stage):
    """KTO (LoRA, KL documents in each row) and the reward model (full, a replicated value head) under tp=2."""
    extra = (dict(stage="kto", dataset="builtin:kto_demo", finetuning_type="lora", learning_rate=5e-3)
             if stage == "kto" else dict(stage="rm", finetuning_type="full"))
    launch(1, _dpo_overrides(tmp_path / "ref", **extra))
    launch(2, _dpo_overrides(tmp_path / "tp2", tensor_parallel_size=2, **extra))
    ref, got = metric_rows(tmp_path / "ref"), metric_rows(tmp_path / "tp2")
    assert len(ref) == len(got) > 3
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        for key in [k for k in a if isinstance(a[k], float) and "per_s" not in k and "mem" not in k]:
            assert abs(a[key] - b[key]) <= 1e-9 * max(1.0, abs(a[key])), (stage, key, a[key], b[key])
    ref_params, params = final_params(tmp_path / "ref"), final_params(tmp_path / "tp2")
    assert max(float((params[k] - ref_params[k]).abs().max() / ref_params[k].abs().max()) for k in params) <= 1e-9


def test_rank_layout_is_dp_major_tp_innermost():
    """rank = (dp * sp + s) * tp + t: the tp ranks of one group are consecutive; an SP group holds one tp
    coordinate; every (dp, sp, tp) coordinate appears once."""
    from longtune.parallel.mesh import ParallelDims

    dp, sp, tp = 2, 2, 2
    coords = [(d.dp_rank, d.sp_rank, d.tp_rank) for d in (ParallelDims(dp=dp, sp=sp, tp=tp, rank=r) for r in range(8))]
    assert coords == [(a, b, c) for a in range(dp) for b in range(sp) for c in range(tp)]
    dims = ParallelDims(dp=dp, sp=sp, tp=tp, rank=5)
    assert dims.world_size == 8 and dims.data_parallel_size == 4
    assert dims.sp_group_ranks(1, 1) == [5, 7] and dims.sp_group_ranks(0, 0) == [0, 2]
    assert dims.role() == "rank 5/8: dp 1/2 sp 0/2 tp 1/2 on cpu"


def test_sp_mode_works_on_the_local_heads():
    """TP splits heads first: 8 query / 4 K/V heads at tp=2 leave 4 / 2 per rank; auto over sp=4 is then a
    hybrid of Ulysses 2 (gcd(2, 4)) x ring 2, and ulysses needs sp to divide the 4 local heads."""
    from longtune.config import ParallelConfig
    from longtune.errors import ConfigError
    from longtune.parallel.sequence import resolve_sp_mode

    assert resolve_sp_mode(ParallelConfig(), 8 // 2, 4 // 2, 4, tp=2) == ("hybrid", 2)
    assert resolve_sp_mode(ParallelConfig(), 8, 4, 4) == ("ulysses", 4)
    with pytest.raises(ConfigError, match=r"ulysses needs the local heads \(num_attention_heads / "
                                          r"tensor_parallel_size 4\) \(2\) divisible by sequence_parallel_size \(4\)"):
        resolve_sp_mode(ParallelConfig(sequence_parallel_mode="ulysses"), 8 // 4, 4 // 4, 4, tp=4)


@pytest.mark.parametrize("extra,nproc,pattern", [
    (dict(tensor_parallel_size=2), None,
     r"^ConfigError: key 'tensor_parallel_size': 2 x sequence_parallel_size 1 does not divide the world size 1 "),
    (dict(tensor_parallel_size=2, sequence_parallel_size=2), 6,
     r"^ConfigError: key 'tensor_parallel_size': 2 x sequence_parallel_size 2 does not divide the world size 6 "),
    (dict(tensor_parallel_size=4), 4,
     r"^ConfigError: key 'tensor_parallel_size': 4 does not divide the model's num_key_value_heads \(2\)"),
    (dict(tensor_parallel_size=3), 3,
     r"^ConfigError: key 'tensor_parallel_size': 3 does not divide the model's num_attention_heads \(4\)"),
    (dict(tensor_parallel_size=0), None, r"key 'tensor_parallel_size' must be >= 1, got 0"),
    (dict(tensor_parallel_size=2, finetuning_type="lora", use_dora=True), 2,
     r"^ConfigError: command line: key 'tensor_parallel_size' cannot split DoRA adapters"),
])
def test_bad_tensor_parallel_settings_fail_in_one_line(alpaca_file, tmp_path, capsys, extra, nproc, pattern):
    """Before any process starts (--nproc) or any weight loads."""
    from tests.test_errors import expect_one_line

    argv = ["train", *(["--nproc", str(nproc)] if nproc else []), *base_overrides(alpaca_file, tmp_path / "x", **extra)]
    expect_one_line(capsys, argv, pattern)


def test_unsupported_architecture_fails_in_one_line(alpaca_file, tmp_path, capsys):
    """Phi-3 fuses q/k/v into one projection: no plan, one line naming the key (from the config alone)."""
    from transformers import Phi3Config

    from tests.test_errors import expect_one_line

    model_dir = tmp_path / "phi3"
    Phi3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2).save_pretrained(str(model_dir))
    argv = ["train", "--nproc", "2", *base_overrides(alpaca_file, tmp_path / "x", tensor_parallel_size=2,
                                                      model_name_or_path=str(model_dir))]
    expect_one_line(capsys, argv, r"^ConfigError: key 'tensor_parallel_size': no tensor-parallel plan for "
                                  r"model_type 'phi3' \(supported: llama, qwen2")


def test_tensor_parallel_runs_under_fsdp_only():
    from longtune.errors import ConfigError
    from longtune.parallel.fsdp import plan_from_config

    assert plan_from_config(None, False, None, world_size=2, tp=2).enabled
    with pytest.raises(ConfigError, match=r"^key 'tensor_parallel_size': 2 runs under FSDP2; remove fsdp: false"):
        plan_from_config(False, False, None, world_size=2, tp=2)


# --- estimate: the tp terms ---------------------------------------------------------------------------------

def _rank_model_params(hf_config, tp: int) -> int:
    """Parameters of one tp rank, counted by transformers on a model whose layers have the local head and MLP
    counts (num_attention_heads / tp, num_key_value_heads / tp, intermediate_size / tp, same hidden size) and
    whose vocabulary is the head's local rows; an untied input embedding is whole on every rank."""
    from transformers import AutoModelForCausalLM

    local = hf_config.to_dict()
    untied_embedding_rest = 0 if hf_config.tie_word_embeddings else (
        (hf_config.vocab_size - hf_config.vocab_size // tp) * hf_config.hidden_size)
    local.update(vocab_size=hf_config.vocab_size // tp, num_attention_heads=hf_config.num_attention_heads // tp,
                 num_key_value_heads=hf_config.num_key_value_heads // tp,
                 intermediate_size=hf_config.intermediate_size // tp,
                 head_dim=hf_config.hidden_size // hf_config.num_attention_heads)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(type(hf_config).from_dict(local))
    return sum(p.numel() for p in model.parameters()) + untied_embedding_rest


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_estimate_params_per_tp_rank_match_a_local_model(family):
    from transformers import LlamaConfig, Qwen2Config

    from longtune.estimate import ModelShape

    kind = Qwen2Config if family == "qwen2" else LlamaConfig
    config = kind(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=family == "llama")
    shape = ModelShape.from_hf_config(config)
    for tp in (1, 2, 4):
        assert shape.params_per_rank(tp) == _rank_model_params(config, tp), (family, tp)


def test_estimate_divides_weights_and_mlp_by_tp_but_not_the_replicated_parts():
    from longtune.estimate import TrainSetup, estimate_memory, shape_from_name_or_path

    shape = shape_from_name_or_path("llama-3.1-8b")
    base = TrainSetup(tokens=65536, sp=2, world_size=8, fsdp=True, dtype="bfloat16", tiled_mlp_tokens=None)
    one, two = estimate_memory(shape, base), estimate_memory(shape, replace(base, tp=2))
    # FSDP shards tp=2's per-rank model (split layers, whole root) over the 4 data ranks.
    assert two.components["optimizer"] == 2 * shape.params_per_rank(2) * 4 // 4
    assert one.components["optimizer"] == 2 * shape.total_params * 4 // 8
    # Layer inputs are whole on every tp rank (same tokens), the layer's K/V and MLP widths are halved.
    assert two.components["activations"] == one.components["activations"]
    T, b = base.local_tokens, 2
    kv, inter = shape.kv_size, shape.intermediate_size
    halved = T * (2 * kv // 2 + 6 * inter // 2) * b
    assert one.components["layer_recompute"] - two.components["layer_recompute"] == halved
    # The vocab-parallel head: each rank's logits chunk covers V / tp (fp32 logits + bf16 copy, head grad buffer).
    C, V = min(base.loss_chunk_size, T), shape.vocab_size
    assert one.components["logits_chunk"] - two.components["logits_chunk"] == C * (V - V // 2) * (4 + b)


def test_estimate_cli_takes_tensor_parallel_size(capsys):
    from tests.test_bench_estimate import _run

    assert _run(["estimate", "--model", "llama-3.1-8b", "--gpus", "8", "tensor_parallel_size=2",
                 "sequence_parallel_size=2"]) == 0
    out = capsys.readouterr().out
    assert "tensor_parallel_size 2" in out and "| 4 |" in out and "| 8 |" not in out.split("per-GPU peak")[1]


@pytest.mark.slow
def test_sft_tp2_with_checkpointing_tiled_mlp_and_packing(alpaca_file, tmp_path):
    """The wrappers applied after TP (non-reentrant checkpointing recomputes through the split projections; the
    tiled MLP runs them per tile) and document-aware attention on the local heads."""
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, packing=True,
                  gradient_checkpointing=True, tiled_mlp_tokens=16)
    launch(1, base_overrides(alpaca_file, tmp_path / "ref", **common))
    launch(2, base_overrides(alpaca_file, tmp_path / "tp2", tensor_parallel_size=2, **common))
    _assert_same_run(tmp_path / "ref", tmp_path / "tp2", "sft tp=2 checkpointing + tiled MLP")


@pytest.mark.slow
def test_pt_tp2_sp4_hybrid_matches_one_process(pt_reference, saved_models, tmp_path):
    """8 processes: tp=2 leaves 2 / 1 heads per rank; explicit hybrid over sp=4 is Ulysses 2 (K/V replicated) x
    ring 2, its sub-groups built per (dp, tp) coordinate."""
    out = tmp_path / "hybrid"
    launch(8, _pt_overrides(saved_models, out, per_device_train_batch_size=2, tensor_parallel_size=2,
                            sequence_parallel_size=4, sequence_parallel_mode="hybrid"))
    _assert_same_run(pt_reference, out, "pt tp=2 x sp=4 hybrid")


@pytest.mark.slow
def test_bf16_dpo_tp2_first_step_is_ln2(tmp_path):
    """bf16 under FSDP x TP (fp32 masters, bf16 compute): the reference equals the policy at step 0, so the DPO
    loss is ln 2 within bf16 rounding, and the losses track the one-process bf16 run."""
    extra = dict(finetuning_type="full", dtype="bfloat16")
    launch(1, _dpo_overrides(tmp_path / "ref", **extra))
    launch(2, _dpo_overrides(tmp_path / "tp2", tensor_parallel_size=2, **extra))
    ref, got = _curve(tmp_path / "ref", "loss"), _curve(tmp_path / "tp2", "loss")
    assert abs(got[0] - math.log(2)) <= 1e-2, got
    assert all(abs(a - b) <= 2e-2 * abs(a) for a, b in zip(ref, got)), (ref, got)


# --- the plan on each family --------------------------------------------------------------------------------

FAMILY_CONFIGS = {
    "llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig",
    "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
}


def _tiny_family_model(family: str):
    import transformers

    config = getattr(transformers, FAMILY_CONFIGS[family])(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float64)


def _family_worker(rank: int, world_size: int, family: str) -> dict:
    """Loss and full gradients of the tp-split model and of its unsplit twin, on the same batch."""
    from torch.distributed.device_mesh import init_device_mesh

    from longtune.models.loader import decoder_layer_list
    from longtune.parallel.tensor import apply_tensor_parallel, check_tensor_parallel

    reference, model = _tiny_family_model(family), _tiny_family_model(family)
    check_tensor_parallel(model.config, world_size)
    apply_tensor_parallel(decoder_layer_list(model)[1], init_device_mesh("cpu", (world_size,)))
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, net in (("ref", reference), ("tp", model)):
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 for n, p in net.named_parameters()}
        out[name] = (float(loss.detach()), grads)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_each_family_splits_over_tp_exactly(family):
    """Every supported family under a tp=2 plan: same loss and gradients as the unsplit model (float64)."""
    from tests.distributed_utils import run_distributed

    for result in run_distributed(_family_worker, 2, family):
        (ref_loss, ref_grads), (loss, grads) = result["ref"], result["tp"]
        assert abs(loss - ref_loss) <= 1e-12, family
        for name, grad in ref_grads.items():
            assert torch.allclose(grads[name], grad, rtol=1e-9, atol=1e-12), (family, name)


def test_every_family_has_the_planned_linear_layers():
    """The module names the plan relies on exist in each supported family's decoder layer, as nn.Linear."""
    from torch import nn

    from longtune.models.loader import decoder_layer_list
    from longtune.parallel.tensor import TP_FAMILIES, plan_for

    assert sorted(TP_FAMILIES) == sorted(FAMILY_CONFIGS)
    for family in TP_FAMILIES:
        layer = decoder_layer_list(_tiny_family_model(family))[1][0]
        plan = plan_for(layer)
        assert all(isinstance(layer.get_submodule(p), nn.Linear) for p in plan.colwise + plan.rowwise), family


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["full", "lora"])
def test_qwen3_sft_tp2_sp2_matches_one_process(alpaca_file, tmp_path, ftype):
    """Qwen3 (per-head q/k norms) through the CLI, 4 processes tp=2 x sp=2 under FSDP; with LoRA the norms stay
    frozen (the tp plan re-creates their parameters; trained norms would change the losses of steps 3+)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from longtune.models.builtin import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    torch.manual_seed(5)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path / "qwen3")
    tok.save_pretrained(tmp_path / "qwen3")
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, packing=True, finetuning_type=ftype,
                  model_name_or_path=str(tmp_path / "qwen3"), learning_rate=5e-3 if ftype == "lora" else 1e-3)
    launch(1, base_overrides(alpaca_file, tmp_path / "ref", **common))
    launch(4, base_overrides(alpaca_file, tmp_path / "tp2sp2", tensor_parallel_size=2, sequence_parallel_size=2,
                             **common))
    _assert_same_run(tmp_path / "ref", tmp_path / "tp2sp2", f"qwen3 {ftype} tp=2 x sp=2")
