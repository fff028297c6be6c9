"""Tensor parallelism through the real CLI (torchrun, gloo, float64): tp=2 (and tp=2 x sp=2) runs give the same
per-step losses and final parameters as one process; bad tp settings fail with one line naming the key."""

from __future__ import annotations

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


def test_sft_tp2_matches_one_process(alpaca_file, tmp_path):
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0.05)
    launch(1, base_overrides(alpaca_file, tmp_path / "ref", **common))
    launch(2, base_overrides(alpaca_file, tmp_path / "tp2", tensor_parallel_size=2, **common))
    _assert_same_run(tmp_path / "ref", tmp_path / "tp2", "sft tp=2")


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
