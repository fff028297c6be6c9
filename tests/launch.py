"""Run `longtune train` as a user would (one process, or torchrun with N processes) and read the run back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def launch(nproc: int, overrides: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if nproc == 1:
        cmd = [sys.executable, "-m", "longtune", "train", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "longtune", "train", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def final_params(out: Path) -> dict[str, torch.Tensor]:
    params = {}
    for f in sorted((out / "final").glob("*.safetensors")):
        params.update(load_file(str(f)))
    return params


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)


def crash_after_save(step: int):
    """Loop callbacks that stop the run with KeyboardInterrupt once checkpoint-`step` is written (a kill right
    after a save), through the trainer's public hook."""
    from longtune.trainer import TrainCallbacks

    def on_save(saved_step: int, path: Path) -> None:
        if saved_step == step:
            raise KeyboardInterrupt(f"simulated kill after step {step}")

    return TrainCallbacks(on_save=on_save)
