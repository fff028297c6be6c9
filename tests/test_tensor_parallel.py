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
