"""float16 training with dynamic loss scaling: the loss falls, an overflow skips its step (no optimizer or
schedule step, scale halved) on every rank, and a resume after a skipped step is exact, scale included."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from longtune.config import load_config
from longtune.loss_scale import LossScaler
from longtune.trainer import TrainCallbacks, train
from tests.conftest import base_overrides
from tests.distributed_utils import free_port
from tests.launch import launch, metric_rows

OVERFLOW_STEP = 3


def _fp16_overrides(alpaca_file: Path, out: Path, **extra) -> list[str]:
    values = dict(dtype="auto", fp16=True, finetuning_type="lora", learning_rate=1e-2, max_steps=6)
    values.update(extra)
    return base_overrides(alpaca_file, out, **values)


class OverflowAt:
    """after_backward hook: writes an inf into one gradient at `step` (on `rank` only, if given), and keeps a copy
    of the trainable parameters as they were before each step's optimizer update."""

    def __init__(self, step: int, rank: int | None = None):
        self.step, self.rank = step, rank
        self.params_before: dict[int, list[torch.Tensor]] = {}

    def __call__(self, step: int, params: list[torch.nn.Parameter]) -> None:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        self.params_before[step] = [p.detach().clone() for p in local]
        here = self.rank is None or int(os.environ.get("RANK", "0")) == self.rank
        if step == self.step and here:
            grad = next(p.grad for p in params if p.grad is not None)
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("inf")


def test_fp16_trains_and_an_overflow_skips_its_step(alpaca_file, tmp_path):
    hook = OverflowAt(OVERFLOW_STEP)
    result = train(load_config(None, _fp16_overrides(alpaca_file, tmp_path / "run")), log=lambda _: None,
                   callbacks=TrainCallbacks(after_backward=hook.__call__))
    rows = result.metrics
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1, [r["loss"] for r in rows]
    start = LossScaler().scale
    assert [r["loss_scale"] for r in rows] == [start] * (OVERFLOW_STEP - 1) + [start / 2] * (7 - OVERFLOW_STEP)
    assert [r["skipped_steps"] for r in rows] == [0] * (OVERFLOW_STEP - 1) + [1] * (7 - OVERFLOW_STEP)
    skipped = rows[OVERFLOW_STEP - 1]
    assert skipped["grad_norm"] is None and all(r["grad_norm"] > 0 for r in rows if r is not skipped)
    # The skipped step changed no parameter and did not advance the schedule; the steps around it did both.
    before = hook.params_before
    assert all(torch.equal(a, b) for a, b in zip(before[OVERFLOW_STEP], before[OVERFLOW_STEP + 1]))
    assert not all(torch.equal(a, b) for a, b in zip(before[OVERFLOW_STEP - 1], before[OVERFLOW_STEP]))
    assert rows[OVERFLOW_STEP]["lr"] == skipped["lr"] != rows[OVERFLOW_STEP - 2]["lr"]
    assert all(p.dtype == torch.float32 for p in before[1])  # fp32 masters under fp16 compute


def test_fp16_resume_after_a_skipped_step_is_exact(alpaca_file, tmp_path):
    """Stop right after checkpoint-4 (step 3 was skipped), resume: steps 5-6 equal the uninterrupted run, and so
    do the loss scale and the skipped-step count (a resume that forgot the scale would restart at 2**16)."""
    common = dict(save_steps=4)
    full = train(load_config(None, _fp16_overrides(alpaca_file, tmp_path / "full", **common)), log=lambda _: None,
                 callbacks=TrainCallbacks(after_backward=OverflowAt(OVERFLOW_STEP)))

    def stop_after_4(step: int, path: Path) -> None:
        if step == 4:
            raise KeyboardInterrupt("simulated kill after step 4")

    cut = _fp16_overrides(alpaca_file, tmp_path / "cut", **common)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, cut), log=lambda _: None,
              callbacks=TrainCallbacks(after_backward=OverflowAt(OVERFLOW_STEP), on_save=stop_after_4))
    assert json.loads((tmp_path / "cut" / "checkpoint-4" / "loss_scale.json").read_text())["skipped_steps"] == 1
    resumed = train(load_config(None, [*cut, "resume_from_checkpoint=true"]), log=lambda _: None)
    keys = ("step", "loss", "grad_norm", "lr", "loss_scale", "skipped_steps")
    want = [{k: r[k] for k in keys} for r in full.metrics]
    got = [{k: r[k] for k in keys} for r in metric_rows(tmp_path / "cut")]
    assert got == want


def _fp16_rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(load_config(None, overrides), log=lambda _: None,
          callbacks=TrainCallbacks(after_backward=OverflowAt(OVERFLOW_STEP, rank=1).__call__))


@pytest.mark.slow
def test_fp16_under_sp_tracks_one_process_and_skips_on_every_rank(alpaca_file, tmp_path):
    """sp=2 with FSDP2 (fp16 compute, fp32 masters, sharded gradients): an overflow on rank 1 only makes both
    ranks skip the step; the losses track sp=1 to fp16 precision."""
    common = dict(packing=True, per_device_train_batch_size=2)
    launch(1, _fp16_overrides(alpaca_file, tmp_path / "ref", **common))
    overrides = _fp16_overrides(alpaca_file, tmp_path / "sp2", sequence_parallel_size=2, **common)
    mp.spawn(_fp16_rank, args=(2, free_port(), overrides, str(tmp_path)), nprocs=2, join=True)
    ref, got = metric_rows(tmp_path / "ref"), metric_rows(tmp_path / "sp2")
    assert [r["skipped_steps"] for r in got] == [0, 0, 1, 1, 1, 1]
    assert [r["skipped_steps"] for r in ref] == [0] * 6
    # Up to the skip the two runs train the same steps.
    for a, b in zip(got[:OVERFLOW_STEP], ref[:OVERFLOW_STEP]):
        assert abs(a["loss"] - b["loss"]) <= 1e-2 * abs(b["loss"]), (got, ref)
