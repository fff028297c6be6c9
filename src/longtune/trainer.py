"""The training loop, top to bottom: set up the run directory, data, model and optimizer; then for each optimizer
step collate its micro-batches, divide every token loss by the number of loss tokens in the whole step, step,
log, evaluate and checkpoint.

Dividing by the step's global token count (not averaging per-micro-batch means) is what makes
`batch 4 x GA 1 == batch 1 x GA 4` exact.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from longtune.checkpoint import (
    complete_checkpoints,
    load_model_weights,
    load_training_state,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint,
    save_model_dir,
)
from longtune.config import Config, TrainConfig, save_config
from longtune.data import Example, load_examples
from longtune.data.collate import Batch, collate
from longtune.errors import ConfigError, DataError
from longtune.models.loader import DTYPES, apply_finetuning, load_model, load_tokenizer, unwrap_base
from longtune.optim import build_optimizer, lr_lambda
from longtune.stages import STAGE_LOSSES

RUN_ARTEFACTS = ("metrics.jsonl", "train_config.yaml", "loss.png", "final", "runs")


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    global_step: int
    metrics: list[dict[str, Any]]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class StepPlan:
    """Which examples each optimizer step uses: a seeded permutation per epoch, cut into steps of
    batch*GA examples (the last step of an epoch may be smaller), each cut into micro-batches of `batch`."""

    num_examples: int
    batch_size: int
    grad_accum: int
    seed: int
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / (self.batch_size * self.grad_accum))

    def epoch_of(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps."""
        return step / self.steps_per_epoch

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        per_step = self.batch_size * self.grad_accum
        ids = order[index * per_step : (index + 1) * per_step].tolist()
        return [ids[i : i + self.batch_size] for i in range(0, len(ids), self.batch_size)]


def plan_steps(num_examples: int, t: TrainConfig) -> StepPlan:
    probe = StepPlan(num_examples, t.per_device_train_batch_size, t.gradient_accumulation_steps, t.seed, 0)
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * probe.steps_per_epoch)
    return StepPlan(num_examples, t.per_device_train_batch_size, t.gradient_accumulation_steps, t.seed, max(total, 1))


def prepare_output_dir(cfg: Config) -> Path | None:
    """Create output_dir; return the checkpoint to resume from, if any. Refuses to mix two runs."""
    out = Path(cfg.train.output_dir or "")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"key 'output_dir': '{out}' exists and is not a directory")
    resume = resolve_resume(out, cfg.train.resume_from_checkpoint)
    if resume is None and out.is_dir() and any(out.iterdir()):
        if not cfg.train.overwrite_output_dir:
            raise ConfigError(
                f"key 'output_dir': '{out}' is not empty; set overwrite_output_dir: true to replace it "
                "or resume_from_checkpoint: true to continue it"
            )
        for name in RUN_ARTEFACTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for _, ckpt in complete_checkpoints(out):
            shutil.rmtree(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    return resume


def load_datasets(cfg: Config, tokenizer: Any, log: Callable[[str], None]) -> tuple[list[Example], list[Example]]:
    d = cfg.data
    common = dict(
        dataset_dir=d.dataset_dir,
        tokenizer=tokenizer,
        template=d.template,
        stage=cfg.train.stage,
        cutoff_len=d.cutoff_len,
        train_on_prompt=d.train_on_prompt,
        max_samples=d.max_samples,
    )
    train, stats = load_examples(list(d.dataset), **common)
    log(
        f"data: {stats.rows} rows -> {stats.kept} examples ({stats.truncated} truncated, {stats.dropped} dropped), "
        f"{stats.tokens} tokens, {stats.trained_tokens} trained"
    )
    evals: list[Example] = []
    if d.eval_dataset:
        evals, _ = load_examples(list(d.eval_dataset), **common)
    elif d.val_size > 0:
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


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident set.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLog:
    """metrics.jsonl plus optional TensorBoard; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None, tensorboard_dir: Path | None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in kept if r["step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
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

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key if "/" in key else f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def evaluate(model: nn.Module, examples: list[Example], cfg: Config, pad_id: int) -> tuple[float, int]:
    """Token-weighted mean loss over the whole eval set."""
    loss_fn = STAGE_LOSSES[cfg.train.stage]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bs = cfg.train.per_device_eval_batch_size
    with torch.no_grad():
        for i in range(0, len(examples), bs):
            out = loss_fn(model, collate(examples[i : i + bs], pad_id), cfg.train.loss_chunk_size)
            total += float(out.loss_sum)
            count += int(out.count)
    model.train(was_training)
    return total / max(count, 1), count


def train(cfg: Config, log: Callable[[str], None] = print) -> RunResult:
    t = cfg.train
    resume_ckpt = prepare_output_dir(cfg)
    out = Path(t.output_dir or "")
    set_seed(t.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[cfg.compute_dtype]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("key 'bf16': this GPU does not support bfloat16; use fp16: true")

    tokenizer = load_tokenizer(cfg.model)
    train_examples, eval_examples = load_datasets(cfg, tokenizer, log)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    model = load_model(cfg.model, dtype)
    model = apply_finetuning(model, cfg.model)
    if t.gradient_checkpointing:
        base = unwrap_base(model)
        # transformers 5.x renamed the switch; non-reentrant checkpointing works with frozen embeddings (LoRA).
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())

    plan = plan_steps(len(train_examples), t)
    optimizer = build_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, plan.total_steps))
    start_step, tokens_seen = 0, 0
    if resume_ckpt is not None:
        load_model_weights(model, resume_ckpt)
        state = load_training_state(resume_ckpt, optimizer, scheduler)
        start_step, tokens_seen = state.global_step, state.tokens_seen
        log(f"resumed from {resume_ckpt} at step {start_step}")
    save_config(cfg, out / "train_config.yaml")
    metrics = MetricsLog(
        out / "metrics.jsonl",
        start_step if resume_ckpt is not None else None,
        out / "runs" if t.report_to == "tensorboard" else None,
    )
    log(
        f"run: {out} | {len(train_examples)} train / {len(eval_examples)} eval examples | "
        f"{plan.total_steps} steps ({plan.steps_per_epoch}/epoch) | trainable {trainable:,} of {total_params:,} "
        f"params | {cfg.model.finetuning_type} | {dtype} on {device}"
    )

    loss_fn = STAGE_LOSSES[t.stage]
    params = [p for p in model.parameters() if p.requires_grad]
    eval_every = t.eval_steps or t.logging_steps
    progress = _progress_bar(plan.total_steps, start_step, disabled=t.disable_tqdm)
    step = start_step
    try:
        for step in range(start_step + 1, plan.total_steps + 1):
            started = time.perf_counter()
            step_ids = plan.micro_batches(step - 1)
            batches: list[Batch] = [collate([train_examples[i] for i in ids], pad_id) for ids in step_ids]
            # The divisor of every token loss in this step: all loss tokens of all its micro-batches.
            step_tokens = sum(b.num_loss_tokens for b in batches)
            input_tokens = sum(len(train_examples[i].input_ids) for ids in step_ids for i in ids)
            loss_total = torch.zeros((), dtype=torch.float64, device=device)
            for batch in batches:
                result = loss_fn(model, batch, t.loss_chunk_size)
                (result.loss_sum / max(step_tokens, 1)).backward()
                loss_total += result.loss_sum.detach().to(torch.float64)
            max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            tokens_seen += step_tokens
            loss = float(loss_total) / max(step_tokens, 1)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}; lower learning_rate or use bf16/fp32")
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{input_tokens / elapsed:.0f}")
            if step == 1 or step % t.logging_steps == 0 or step == plan.total_steps:
                metrics.write(
                    {
                        "step": step,
                        "epoch": round(plan.epoch_of(step), 4),
                        "loss": loss,
                        "grad_norm": grad_norm,
                        "lr": lr,
                        "tokens": step_tokens,
                        "input_tokens": input_tokens,
                        "tokens_per_s": input_tokens / elapsed,
                        "peak_mem_gib": round(peak_memory_gib(device), 4),
                    }
                )
            if eval_examples and _eval_due(t, step, eval_every, plan):
                eval_loss, eval_tokens = evaluate(model, eval_examples, cfg, pad_id)
                metrics.write(
                    {"step": step, "epoch": round(plan.epoch_of(step), 4), "eval_loss": eval_loss,
                     "eval_tokens": eval_tokens}
                )
                progress.write(f"step {step}: eval_loss {eval_loss:.4f}")
            if (t.save_steps and step % t.save_steps == 0) or step == plan.total_steps:
                save_checkpoint(
                    out, step, plan.epoch_of(step), tokens_seen, model, tokenizer,
                    None if t.save_only_model else optimizer, None if t.save_only_model else scheduler,
                )
                rotate_checkpoints(out, t.save_total_limit)
    finally:
        progress.close()
        metrics.close()

    final_dir = out / "final"
    tmp = out / ".tmp-final"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model_dir(model, tokenizer, tmp)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    tmp.replace(final_dir)
    if t.plot_loss:
        from longtune.plotting import plot_loss

        plot_loss(out / "metrics.jsonl", out / "loss.png")
    return RunResult(output_dir=out, final_dir=final_dir, global_step=step, metrics=metrics.rows)


def _eval_due(t: TrainConfig, step: int, every: int, plan: StepPlan) -> bool:
    if t.eval_strategy == "no":
        return False
    if step == plan.total_steps:
        return True
    if t.eval_strategy == "epoch":
        return step % plan.steps_per_epoch == 0
    return step % every == 0


def _progress_bar(total: int, initial: int, disabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disabled, file=sys.stderr,
                dynamic_ncols=True)
