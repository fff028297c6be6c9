"""End-to-end sequence-parallel parity through the real CLI (`torchrun -m longtune train`), float64 on CPU/gloo:
sp=1 vs sp=2 / sp=4 / dp=2 x sp=2 give the same per-step loss and the same parameters after 3 optimizer steps,
with gradient accumulation 2 and packed rows (several documents per row)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import base_overrides
from tests.launch import final_params, launch, metric_rows


def _result(out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    return [r["loss"] for r in metric_rows(out) if "loss" in r], final_params(out)


def _assert_same(ref, got, label):
    ref_losses, ref_params = ref
    losses, params = got
    assert len(losses) == len(ref_losses) == 3, label
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-9, (label, losses, ref_losses)
    assert params.keys() == ref_params.keys()
    worst = max(float((params[k] - ref_params[k]).abs().max() / ref_params[k].abs().max()) for k in params)
    assert worst <= 1e-8, (label, worst)


# (name, nproc, per-device batch, extra overrides); every variant sees 4 rows per optimizer step.
VARIANTS = [
    ("sp2_ring", 2, 2, {"sequence_parallel_size": 2, "sequence_parallel_mode": "zigzag_ring"}),
    ("sp2_ring_math_kernel", 2, 2, {"sequence_parallel_size": 2, "sequence_parallel_mode": "zigzag_ring",
                                    "attention_kernel": "math", "fsdp": False}),
    ("sp2_ulysses", 2, 2, {"sequence_parallel_size": 2, "sequence_parallel_mode": "ulysses"}),
    ("sp2_llama3", 2, 2, {"sequence_parallel_size": 2, "sequence_parallel_mode": "llama3"}),
    ("sp4_auto_hybrid", 4, 2, {"sequence_parallel_size": 4}),
    ("sp4_ring", 4, 2, {"sequence_parallel_size": 4, "sequence_parallel_mode": "zigzag_ring"}),
    ("dp2_sp2", 4, 1, {"sequence_parallel_size": 2}),
]


@pytest.fixture(scope="module")
def sft_reference(alpaca_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "ref"
    launch(1, base_overrides(alpaca_file, out, packing=True, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2))
    return _result(out)


@pytest.mark.parametrize("name,nproc,bs,extra", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_sft_packed_parity(sft_reference, alpaca_file, tmp_path, name, nproc, bs, extra):
    out = tmp_path / name
    launch(nproc, base_overrides(alpaca_file, out, packing=True, per_device_train_batch_size=bs,
                                  gradient_accumulation_steps=2, **extra))
    _assert_same(sft_reference, _result(out), name)


def test_pt_parity_and_llama(saved_models, tmp_path):
    """Pretraining (packed by default) on a saved Llama with tied embeddings: sp=1 vs sp=2 vs dp=2 x sp=2."""
    common = dict(stage="pt", dataset="builtin:pt_demo", max_samples=40, cutoff_len=64,
                  model_name_or_path=str(saved_models["llama"]), gradient_accumulation_steps=2)
    ref_out = tmp_path / "ref"
    launch(1, base_overrides(Path("unused"), ref_out, per_device_train_batch_size=2, **common))
    ref = _result(ref_out)
    for name, nproc, bs, extra in (("sp2", 2, 2, {"sequence_parallel_size": 2}),
                                   ("dp2_sp2", 4, 1, {"sequence_parallel_size": 2})):
        out = tmp_path / name
        launch(nproc, base_overrides(Path("unused"), out, per_device_train_batch_size=bs, **common, **extra))
        _assert_same(ref, _result(out), name)


def test_impossible_sp_degree_fails_before_loading(alpaca_file, tmp_path, capsys, monkeypatch):
    import longtune.parallel.parallelize as parallelize_mod
    from longtune.cli import main

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the SP settings were checked")

    monkeypatch.setattr(parallelize_mod, "load_model", must_not_load)
    rc = main(["train", *base_overrides(alpaca_file, tmp_path / "x", sequence_parallel_size=2)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("ConfigError: key 'sequence_parallel_size': 2 does not divide the world size 1")


@pytest.mark.parametrize(
    "mode,heads,kv,sp,pattern",
    [
        ("ulysses", 4, 2, 3, r"ulysses needs num_attention_heads \(4\) divisible by sequence_parallel_size \(3\)"),
        ("hybrid", 4, 2, 2, r"hybrid needs a Ulysses degree strictly between 1 and sp=2"),
        ("hybrid", 3, 1, 4, r"hybrid needs a Ulysses degree strictly between 1 and sp=4 that divides "
                            r"num_attention_heads=3"),
    ],
)
def test_impossible_sp_modes_are_refused(mode, heads, kv, sp, pattern):
    from longtune.config import ParallelConfig
    from longtune.errors import ConfigError
    from longtune.parallel.sequence import resolve_sp_mode

    with pytest.raises(ConfigError, match=pattern):
        resolve_sp_mode(ParallelConfig(sequence_parallel_mode=mode), heads, kv, sp)


@pytest.mark.parametrize("heads,kv,sp,want", [(4, 1, 4, ("hybrid", 2)), (8, 4, 4, ("hybrid", 2)),
                                              (12, 1, 12, ("hybrid", 6)), (12, 4, 12, ("hybrid", 4))])
def test_explicit_hybrid_degree(heads, kv, sp, want):
    """Explicit hybrid picks the Ulysses degree from the query heads (K/V replicated when kv_heads is smaller),
    preferring a degree that divides the K/V heads."""
    from longtune.config import ParallelConfig
    from longtune.parallel.sequence import resolve_sp_mode

    assert resolve_sp_mode(ParallelConfig(sequence_parallel_mode="hybrid"), heads, kv, sp) == want


def test_hybrid_on_mqa_model_matches_single_process(tmp_path):
    """kv_heads=1 (MQA) under hybrid sp=4 (Ulysses 2 x ring 2, K/V replicated): same losses and parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from longtune.models.builtin import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    torch.manual_seed(5)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    path = tmp_path / "mqa"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    common = dict(stage="pt", dataset="builtin:pt_demo", max_samples=16, cutoff_len=64, model_name_or_path=str(path),
                  per_device_train_batch_size=2)
    launch(1, base_overrides(Path("unused"), tmp_path / "ref", **common))
    launch(4, base_overrides(Path("unused"), tmp_path / "hybrid", sequence_parallel_size=4,
                             sequence_parallel_mode="hybrid", **common))
    _assert_same(_result(tmp_path / "ref"), _result(tmp_path / "hybrid"), "hybrid_mqa")


@pytest.mark.parametrize("heads,kv,sp,want", [(4, 2, 2, ("ulysses", 2)), (4, 2, 4, ("hybrid", 2)),
                                              (28, 4, 8, ("hybrid", 4)), (4, 1, 4, ("zigzag_ring", 1)),
                                              (32, 8, 8, ("ulysses", 8))])
def test_auto_mode_choice(heads, kv, sp, want):
    from longtune.config import ParallelConfig
    from longtune.parallel.sequence import resolve_sp_mode

    assert resolve_sp_mode(ParallelConfig(), heads, kv, sp) == want


def test_resume_under_sp_with_sharded_optimizer(alpaca_file, tmp_path):
    """sp=2 with FSDP2: stop after step 3 (sharded optimizer checkpoint), resume to step 6, same losses as an
    uninterrupted run. A constant schedule makes the 3-step run's schedule identical to the 6-step run's."""
    common = dict(packing=True, per_device_train_batch_size=2, sequence_parallel_size=2, save_steps=3,
                  lr_scheduler_type="constant", warmup_steps=0)
    full = tmp_path / "full"
    launch(2, base_overrides(alpaca_file, full, max_steps=6, **common))
    cut = tmp_path / "cut"
    launch(2, base_overrides(alpaca_file, cut, max_steps=3, **common))
    assert (cut / "checkpoint-3" / "optimizer_sharded").is_dir()
    launch(2, base_overrides(alpaca_file, cut, max_steps=6, resume_from_checkpoint=True, **common))
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    want = [r["loss"] for r in rows if "loss" in r]
    got = [r["loss"] for r in resumed if "loss" in r]
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-12, (got, want)


def test_lora_under_sp_matches_single_process(alpaca_file, tmp_path):
    common = dict(packing=True, per_device_train_batch_size=2, finetuning_type="lora", learning_rate=5e-3,
                  gradient_accumulation_steps=2)
    launch(1, base_overrides(alpaca_file, tmp_path / "ref", **common))
    launch(2, base_overrides(alpaca_file, tmp_path / "sp2", sequence_parallel_size=2, **common))
    _assert_same(_result(tmp_path / "ref"), _result(tmp_path / "sp2"), "lora sp2")


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_low_precision_fsdp_under_sp(alpaca_file, tmp_path, dtype, tol):
    """FSDP2 + SP in float32 and bf16 (fp32 master weights, bf16 compute) run on gloo and track sp=1."""
    common = dict(packing=True, per_device_train_batch_size=2, dtype=dtype)
    launch(1, base_overrides(alpaca_file, tmp_path / "ref", **common))
    launch(2, base_overrides(alpaca_file, tmp_path / "sp2", sequence_parallel_size=2, **common))
    ref = [r["loss"] for r in metric_rows(tmp_path / "ref") if "loss" in r]
    got = [r["loss"] for r in metric_rows(tmp_path / "sp2") if "loss" in r]
    assert all(abs(a - b) <= tol * abs(b) for a, b in zip(got, ref)), (got, ref)


def test_deepspeed_zero3_offload_json_maps_to_fsdp_offload(alpaca_file, tmp_path):
    """A LLaMA-Factory-style `deepspeed: ds_z3_offload_config.json` runs as FSDP2 with CPU offload, exactly."""
    ds = tmp_path / "ds_z3_offload_config.json"
    ds.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}}}))
    common = dict(packing=True, per_device_train_batch_size=2)
    launch(1, base_overrides(alpaca_file, tmp_path / "ref", **common))
    launch(2, base_overrides(alpaca_file, tmp_path / "ds", sequence_parallel_size=2, deepspeed=str(ds), **common))
    _assert_same(_result(tmp_path / "ref"), _result(tmp_path / "ds"), "deepspeed z3 offload")
