"""metrics.jsonl (and TensorBoard) of a run: which steps are logged, what a training row holds, and how the
stages' (sum, count) metric vectors become means."""

from __future__ import annotations

import json
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from longtune.errors import ConfigError
from longtune.io import atomic_write_text


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident set.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def metric_means(names: tuple[str, ...], sums: torch.Tensor) -> dict[str, float]:
    """(sum, count) pairs, already summed over ranks and micro-batches, to means."""
    pairs = sums.view(-1, 2)
    return {name: float(pairs[i, 0] / pairs[i, 1]) for i, name in enumerate(names) if float(pairs[i, 1]) > 0}


@dataclass(frozen=True)
class WandbRun:
    """What `report_to: wandb` starts: a run named after the config (WANDB_* environment variables, such as
    WANDB_MODE=offline or WANDB_PROJECT, keep their usual meaning)."""

    project: str
    name: str
    directory: Path
    config: dict[str, Any]

    def start(self) -> Any:
        try:
            import wandb
        except ImportError:
            raise ConfigError("key 'report_to': wandb is not installed (pip install wandb, or longtune[wandb])") from None
        return wandb.init(project=os.environ.get("WANDB_PROJECT", self.project), name=self.name,
                          dir=str(self.directory), config=self.config)


class MetricsLog:
    """metrics.jsonl plus optional TensorBoard; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None, tensorboard_dir: Path | None,
                 log: Callable[[str], None] = print, logging_steps: int = 1, wandb: WandbRun | None = None):
        self.path = path
        self.logging_steps = logging_steps
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            self.rows = [r for r in self._read_rows(path, log) if r["step"] <= resume_step]
            # Never rewrite in place: a kill mid-write would leave the history truncated.
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))
        elif path.exists():
            path.unlink()
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "key 'report_to': tensorboard is not installed (pip install tensorboard)"
                ) from None
            self.writer = SummaryWriter(str(tensorboard_dir))
        self.wandb = wandb.start() if wandb is not None else None

    @staticmethod
    def _read_rows(path: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
        """The rows of an earlier metrics.jsonl; a line torn by a crash mid-write is dropped with a notice."""
        rows = []
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                log(f"notice: {path} line {number} is not a complete metrics row (cut by a crash?); dropped")
                continue
            rows.append(row)
        return rows

    def should_log(self, step: int, total_steps: int) -> bool:
        """The first step, every `logging_steps`, and the last."""
        return step == 1 or step % self.logging_steps == 0 or step == total_steps

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key if "/" in key else f"train/{key}", value, row["step"])
        if self.wandb is not None:
            self.wandb.log({key if "/" in key else f"train/{key}": value for key, value in row.items()
                            if key != "step" and isinstance(value, (int, float))}, step=row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
