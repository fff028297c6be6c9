"""The data of a run: the optimizer steps (planned over in-memory examples, or read from the stream) and the
eval examples, in the shape the stage trains on (the stage loads them through the data package)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from longtune.config import Config
from longtune.data import DataStats
from longtune.data.packing import PackingStats, pack_examples
from longtune.errors import ConfigError, DataError
from longtune.parallel.mesh import ParallelDims
from longtune.stages import Stage
from longtune.steps import PlannedSteps, StreamedSteps, plan_steps


@dataclass
class TrainingData:
    steps: PlannedSteps | StreamedSteps
    train_examples: list  # in memory only: streaming holds a window of them at a time
    eval_examples: list
    streamed_packing: PackingStats | None  # streaming with packing: what was packed so far

    def packing_metrics(self) -> dict[str, float]:
        """What a metrics row adds about packing (streamed runs only: in-memory packing is logged once)."""
        if self.streamed_packing is None:
            return {}
        return {"packing_efficiency": round(self.streamed_packing.efficiency, 4)}


def setup_data(cfg: Config, stage: Stage, tokenizer: Any, dims: ParallelDims,
               log: Callable[[str], None]) -> TrainingData:
    if cfg.data.streaming:
        steps, evals, streamed_packing = load_streaming(cfg, stage, tokenizer, dims, log)
        train: list = []
    else:
        streamed_packing = None
        train, evals = load_datasets(cfg, stage, tokenizer, dims, log)
        if cfg.packing:
            train, stats = pack_examples(train, cfg.data.cutoff_len)
            log(f"packing: {stats.documents} examples -> {stats.rows} rows of {stats.capacity}, "
                f"efficiency {stats.efficiency:.1%}")
        steps = PlannedSteps(plan_steps(len(train), cfg.train, dims.dp), train)
    if cfg.packing and evals:
        evals, _ = pack_examples(evals, cfg.data.cutoff_len)
    return TrainingData(steps, train, evals, streamed_packing)


def load_datasets(cfg: Config, stage: Stage, tokenizer: Any, dims: ParallelDims,
                  log: Callable[[str], None]) -> tuple[list, list]:
    """Train and eval examples. The main rank tokenizes first (and fills the cache); the others then read it."""
    d = cfg.data
    with dims.main_rank_first():
        train, stats = stage.load_examples(cfg, tokenizer, "train")
        evals = stage.load_examples(cfg, tokenizer, "eval")[0] if d.eval_dataset else []
    log(
        f"data: {stats.rows} rows -> {len(train)} examples ({stats.truncated} truncated, {stats.dropped} dropped, "
        f"{stats.skipped} skipped), {stats.tokens} tokens, {stats.trained_tokens} trained"
        f"{' (from cache)' if stats.cache_hit else ''}"
    )
    for message in stats.skipped_examples:
        log(f"  skipped: {message}")
    if not d.eval_dataset and d.val_size > 0:
        n_val = int(d.val_size) if d.val_size >= 1 else max(1, round(d.val_size * len(train)))
        if n_val >= len(train):
            raise ConfigError(f"key 'val_size': {d.val_size} leaves no training examples out of {len(train)}")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
        held = set(order[:n_val])
        evals = [train[i] for i in sorted(held)]
        train = [e for i, e in enumerate(train) if i not in held]
    if not train:
        raise DataError(f"dataset {','.join(d.dataset)}: no training examples left after preprocessing")
    return train, evals


def load_streaming(
    cfg: Config, stage: Stage, tokenizer: Any, dims: ParallelDims, log: Callable[[str], None]
) -> tuple[StreamedSteps, list, PackingStats | None]:
    """Streaming: the steps read from the training stream, the eval examples in memory (eval_dataset, or the
    first val_size examples of the stream), and the packing statistics so far (None without packing)."""
    from longtune.data.streaming import held_out_examples, training_stream, whole_file_notices

    d = cfg.data
    for notice in whole_file_notices(cfg):
        log(notice)
    packing = PackingStats(0, 0, 0, d.cutoff_len)

    def open_epoch(epoch: int):
        stats = DataStats(0, 0, 0, 0, 0, 0)
        yield from training_stream(cfg, tokenizer, epoch=epoch, stats=stats, packing_stats=packing)
        log(f"data: pass {epoch + 1} over the stream read {stats.rows} rows -> {stats.kept} kept "
            f"({stats.truncated} truncated, {stats.dropped} dropped, {stats.skipped} skipped), {stats.tokens} tokens")
        for message in stats.skipped_examples:
            log(f"  skipped: {message}")

    t = cfg.train
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * dims.dp
    steps = StreamedSteps(open_epoch, per_step, t.max_steps)
    evals: list = []
    if d.eval_dataset:
        with dims.main_rank_first():  # the main rank tokenizes the eval set first and fills the cache
            evals = stage.load_examples(cfg, tokenizer, "eval")[0]
    else:
        evals = held_out_examples(cfg, tokenizer)  # the first val_size examples of the stream, if any
    log(
        f"data: streaming {','.join(d.dataset)} ({d.mix_strategy}): shuffle buffer {d.buffer_size}"
        f"{f', packing windows of {d.packing_buffer} documents' if cfg.packing else ''}; every rank reads and "
        f"tokenizes the stream; {len(evals)} eval examples in memory"
    )
    return steps, evals, packing if cfg.packing else None
