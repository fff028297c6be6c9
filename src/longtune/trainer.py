"""The training loop as a recipe: set up the run directory, data, model, reference and optimizer (each a function
below or in its owner's module), then for each optimizer step run `train_step` and let the metrics log, the
evaluator and the checkpointer decide whether to log, evaluate and save.

`train_step` divides every token loss by the number of loss tokens in the whole step (not per-micro-batch
means): that is what makes `batch 4 x GA 1 == batch 1 x GA 4` exact.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from longtune.checkpoint import load_model_weights, load_training_state
from longtune.config import Config, save_config
from longtune.data.collate import loss_token_count
from longtune.errors import ConfigError
from longtune.evaluation import Evaluator
from longtune.faults import RankStatus, is_peer_failure
from longtune.forward import RunParts, blank_like, forward_loss
from longtune.loss_scale import LossScaler
from longtune.metrics import MetricsLog, WandbRun, metric_means, peak_memory_gib
from longtune.models.loader import (
    DTYPES,
    check_not_prequantized,
    check_vocabulary,
    import_bitsandbytes,
    load_model_config,
    load_tokenizer,
    parameter_count,
    unwrap_base,
    vocabulary_grows,
)
from longtune.models.neftune import NEFTune
from longtune.optim import build_optimizer, lr_lambda
from longtune.parallel.fsdp import ShardingPlan, all_reduce_gradients, clip_gradients, gradient_scale, plan_from_config
from longtune.parallel.mesh import ParallelDims, init_parallel, shutdown_parallel
from longtune.parallel.parallelize import LOW_PRECISION, ModelRecipe, ParallelModel, build_model
from longtune.parallel.sequence import SequenceParallel
from longtune.parallel.tensor import check_tensor_parallel
from longtune.reference import build_live_reference, precompute_references
from longtune.run_dir import Checkpointer, check_output_dir, check_resume_settings, prepare_output_dir, run_settings
from longtune.stages import Stage, build_stage
from longtune.steps import PlannedSteps, StepData, StreamedSteps
from longtune.training_data import TrainingData, setup_data


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    global_step: int
    metrics: list[dict[str, Any]]


@dataclass
class TrainCallbacks:
    """Hooks into the loop (tests, tools): told of every finished step and every checkpoint written."""

    on_step_end: Callable[[int, dict[str, Any]], None] | None = None  # (step, its training metrics row)
    on_save: Callable[[int, Path], None] | None = None  # (step, checkpoint directory)
    # (step, trainable parameters): after the step's backward and gradient sum, before the overflow check and
    # the optimizer step (tests inject an fp16 overflow here)
    after_backward: Callable[[int, list[nn.Parameter]], None] | None = None


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config, log: Callable[[str], None] = print, callbacks: TrainCallbacks | None = None) -> RunResult:
    """Run one training job; every process of a multi-process launch calls this. A collective that fails
    because a peer died or stopped becomes a one-line PeerError naming that peer (see faults.py)."""
    t = cfg.train
    dims = init_parallel(cfg.parallel.sequence_parallel_size, t.ddp_timeout, cfg.parallel.tensor_parallel_size)
    status = RankStatus(t.output_dir, dims.rank, dims.world_size, t.ddp_timeout)
    if dims.world_size > 1:
        print(dims.role(), flush=True)  # every rank: which slice of data, sequence and layers it holds
    try:
        with tf32_allowed(t.tf32):
            result = _train(cfg, dims, log if dims.is_main else (lambda _: None), status, callbacks)
        status.finished()
        return result
    except BaseException as exc:
        if dims.world_size > 1 and is_peer_failure(exc):
            error = status.peer_error(exc)
            status.failed(str(error), because_of_peer=True)
            raise error from exc
        status.failed(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
        raise
    finally:
        shutdown_parallel(dims)


@contextlib.contextmanager
def tf32_allowed(tf32: bool | None) -> Iterator[None]:
    """`tf32`: TF32 matmuls and cuDNN convolutions for the run (null keeps torch's setting); restored afterwards,
    since these switches are process-wide."""
    if tf32 is None:
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@dataclass
class RunPlan:
    """What the checks before any weight loads settle."""

    resume: Path | None  # the verified checkpoint to resume from
    sharding: ShardingPlan
    settings: dict[str, Any]  # what checkpoints record about this run
    dtype: torch.dtype
    model_config: Any
    stage: Stage
    sequence: SequenceParallel


def setup_run(cfg: Config, dims: ParallelDims, log: Callable[[str], None]) -> RunPlan:
    """Everything that can be checked without weights, first (output_dir, resume settings, dtype, SP degree vs
    heads); then the main rank prepares output_dir."""
    resume = check_output_dir(cfg, dims, log)
    p = cfg.parallel
    sharding = plan_from_config(p.fsdp, p.offload_params, p.deepspeed, dims.world_size, log, dims.tp)
    settings = run_settings(cfg, dims, sharding.enabled)
    if resume is not None:
        check_resume_settings(resume, settings, log)
    dtype = compute_dtype(cfg, dims.device)
    model_config = load_model_config(cfg.model)
    check_not_prequantized(model_config, cfg.model)
    if cfg.model.quantization_bit is not None:
        import_bitsandbytes()
    check_tensor_parallel(model_config, dims.tp)
    stage = build_stage(cfg)
    # Rows of several documents (pairs, KTO's KL document) need document-aware attention even at sp=1.
    sequence = SequenceParallel(dims, p, model_config, packed=cfg.packing or stage.docs_per_row > 1, log=log)
    if dims.is_main:
        prepare_output_dir(cfg, resume)
    dims.barrier()
    return RunPlan(resume, sharding, settings, dtype, model_config, stage, sequence)


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The run's compute dtype, refusing what longtune cannot train in."""
    dtype = DTYPES[cfg.compute_dtype]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("key 'bf16': this GPU does not support bfloat16; use fp16: true")
    return dtype


def setup_model(cfg: Config, recipe: ModelRecipe, stage: Any, sequence: SequenceParallel, dims: ParallelDims,
                log: Callable[[str], None]) -> tuple[ParallelModel, NEFTune | None]:
    """The policy, parallelized, in training mode, with NEFTune's hook if configured."""
    policy = build_model(cfg.model, stage.model_task, recipe, dims, sequence, log)
    neftune = NEFTune(unwrap_base(policy.model).get_input_embeddings()) if cfg.data.neftune_noise_alpha else None
    policy.root.train()
    return policy, neftune


def setup_reference(cfg: Config, parts: RunParts, policy: ParallelModel, recipe: ModelRecipe, data: TrainingData,
                    sequence: SequenceParallel, log: Callable[[str], None]) -> Any:
    """Fill `parts.reference` for stages that use one; returns the eval reference when it was precomputed."""
    if not parts.stage.uses_reference:
        return None
    parts.reference = build_live_reference(cfg, policy, recipe, parts.dims, sequence, log)
    if not cfg.preference.precompute_ref_log_probs:
        return None
    parts.reference, eval_reference = precompute_references(parts, cfg, data.train_examples, data.eval_examples,
                                                            log)
    return eval_reference


@dataclass
class Optimization:
    """The optimizer side of a step: what steps the parameters and how their gradients are summed."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[nn.Parameter]
    backward_scale: float  # turns FSDP's gradient average into the sum (1 without FSDP)
    sharding: ShardingPlan
    loss_scaler: LossScaler | None = None  # float16 only


class Resumed(NamedTuple):
    start_step: int
    tokens_seen: int


def setup_optimizer(cfg: Config, policy: ParallelModel, sharding: ShardingPlan, dims: ParallelDims,
                    steps: PlannedSteps | StreamedSteps, resume: Path | None,
                    log: Callable[[str], None]) -> tuple[Optimization, Resumed]:
    """Optimizer and schedule; on resume, the weights, their state and the data position of the checkpoint."""
    root = policy.root
    optimizer = build_optimizer(root, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train, steps.total_steps))
    resumed = Resumed(0, 0)
    loss_scaler = LossScaler() if DTYPES[cfg.compute_dtype] == torch.float16 else None
    if resume is not None:
        load_model_weights(root, resume)
        state = load_training_state(resume, root, optimizer, scheduler, loss_scaler)
        resumed = Resumed(state.global_step, state.tokens_seen)
        replay = " (replaying the stream up to it: those rows are read and tokenized again)"
        log(f"resumed from {resume} at step {resumed.start_step}{replay if cfg.data.streaming else ''}")
        steps.skip(resumed.start_step)
    params = [p for p in root.parameters() if p.requires_grad]
    return Optimization(optimizer, scheduler, params, gradient_scale(sharding, dims), sharding, loss_scaler), resumed


def open_metrics(cfg: Config, dims: ParallelDims, resume: Path | None, start_step: int,
                 log: Callable[[str], None]) -> MetricsLog | None:
    """train_config.yaml and metrics.jsonl (main rank only)."""
    if not dims.is_main:
        return None
    out, t = Path(cfg.train.output_dir or ""), cfg.train
    save_config(cfg, out / "train_config.yaml")
    wandb = (WandbRun(t.project, t.run_name or out.name, out, cfg.to_flat_dict())
             if "wandb" in cfg.reporters else None)
    return MetricsLog(out / "metrics.jsonl", start_step if resume is not None else None,
                      out / "runs" if "tensorboard" in cfg.reporters else None, log, logging_steps=t.logging_steps,
                      wandb=wandb)


def log_banner(cfg: Config, data: TrainingData, policy: ParallelModel, dtype: torch.dtype, sharding: ShardingPlan,
               dims: ParallelDims, log: Callable[[str], None]) -> None:
    steps = data.steps
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    total_params = sum(parameter_count(p) for p in policy.model.parameters())
    per_epoch = f"{steps.steps_per_epoch}/epoch" if steps.steps_per_epoch is not None else "epoch length unknown"
    log(
        f"run: {Path(cfg.train.output_dir or '')} | "
        f"{'streamed' if cfg.data.streaming else len(data.train_examples)} train / {len(data.eval_examples)} "
        f"eval rows | "
        f"{steps.total_steps} steps ({per_epoch}) | trainable {trainable:,} of {total_params:,} "
        f"params | {cfg.model.finetuning_type} | {dtype} on {dims.device} x {dims.world_size}"
        f"{f' (dp {dims.dp} x sp {dims.sp} x tp {dims.tp})' if dims.tp > 1 else ''}"
        f"{' | FSDP2' + (' + CPU offload' if sharding.offload else '') if sharding.enabled else ''}"
    )


class StepResult(NamedTuple):
    loss: float  # the exact global-token-normalised loss of the step
    grad_norm: float
    lr: float
    tokens: int  # loss tokens of the step, all ranks
    input_tokens: int
    metrics: dict[str, float]  # the stage's metric means
    skipped: bool = False  # float16: gradients overflowed, the optimizer did not step


def train_step(parts: RunParts, cfg: Config, data: StepData, opt: Optimization, step: int,
               after_backward: Callable[[int, list[nn.Parameter]], None] | None = None) -> StepResult:
    """One optimizer step over this rank's micro-batches of `data` (blank ones where it has run out, so that
    every rank issues the same collectives). In float16 the backward loss carries the loss scale; a step whose
    gradients overflowed on any rank is skipped (no optimizer or schedule step) and the scale lowered."""
    t, dims, stage = cfg.train, parts.dims, parts.stage
    everyone = data.examples
    # The divisor of the step: all loss tokens (sft/pt) or pairs/examples (dpo/kto/rm) of all its micro-batches
    # on all ranks, known before the step.
    step_norm = sum(stage.normaliser(e) for e in everyone)
    step_tokens = sum(loss_token_count(e) for e in everyone)
    input_tokens = sum(len(e.input_ids) for e in everyone)
    loss_local = torch.zeros((), dtype=torch.float64, device=dims.device)
    metric_sums = torch.zeros(2 * len(stage.metric_names), dtype=torch.float64, device=dims.device)
    bs, ga = t.per_device_train_batch_size, t.gradient_accumulation_steps
    micro = data.micro_batches(bs, ga, dims.dp_rank)
    rounds = data.rounds(bs, ga)
    loss_scale = opt.loss_scaler.scale if opt.loss_scaler is not None else 1.0
    for index in range(rounds):
        if opt.sharding.enabled:
            # Syncing only on the last micro-batch keeps unsharded gradients of every layer until then.
            parts.root.set_requires_gradient_sync(cfg.parallel.gradient_sync_every_micro_batch
                                                  or index == rounds - 1)
        if index < len(micro):
            rows, ids = micro[index]
        else:
            rows, ids = [blank_like(everyone[0])], ([] if data.ids is not None else None)
        result = forward_loss(parts, rows, ids, cfg)
        (result.loss_sum * (opt.backward_scale * loss_scale / max(step_norm, 1))).backward()
        loss_local += result.loss_sum.detach().to(torch.float64)
        if result.metrics is not None:
            metric_sums += result.metrics.to(dims.device)
    if not opt.sharding.enabled:
        all_reduce_gradients(opt.params, dims)
    if after_backward is not None:
        after_backward(step, opt.params)
    lr = opt.scheduler.get_last_lr()[0]
    overflow = False
    if opt.loss_scaler is not None:
        overflow = opt.loss_scaler.found_overflow(opt.params, dims)
        opt.loss_scaler.update(overflow)
    if overflow:
        grad_norm = float("nan")
    else:
        if opt.loss_scaler is not None:
            opt.loss_scaler.unscale(opt.params)
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        grad_norm = clip_gradients(opt.params, max_norm, dims)
        opt.optimizer.step()
        opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    loss = float(dims.all_reduce_sum(loss_local)) / max(step_norm, 1)
    step_metrics = metric_means(stage.metric_names, dims.all_reduce_sum(metric_sums))
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {step}; lower learning_rate or check the data")
    return StepResult(loss, grad_norm, lr, step_tokens, input_tokens, step_metrics, overflow)


def training_row(step: int, step_data: StepData, result: StepResult, elapsed: float, dims: ParallelDims,
                 data: TrainingData, loss_scaler: LossScaler | None = None) -> dict[str, Any]:
    """The metrics.jsonl row of a training step; float16 adds the loss scale after the step and the number of
    steps skipped so far (a skipped step's grad_norm is null)."""
    row = {"step": step, "epoch": round(step_data.epoch, 4), "loss": result.loss,
           "grad_norm": None if result.skipped else result.grad_norm,
           "lr": result.lr, "tokens": result.tokens, "input_tokens": result.input_tokens,
           "tokens_per_s": result.input_tokens / elapsed, "peak_mem_gib": round(peak_memory_gib(dims.device), 4),
           **data.packing_metrics(), **result.metrics}
    if loss_scaler is not None:
        row.update(loss_scale=loss_scaler.scale, skipped_steps=loss_scaler.skipped_steps)
    return row


def _train(cfg: Config, dims: ParallelDims, log: Callable[[str], None], status: RankStatus | None = None,
           callbacks: TrainCallbacks | None = None) -> RunResult:
    t, out = cfg.train, Path(cfg.train.output_dir or "")
    callbacks = callbacks or TrainCallbacks()
    status = status or RankStatus(None, dims.rank, 1, t.ddp_timeout)

    # Checks before anything heavy (output_dir, resume, sharding, dtype, SP degree vs heads); the run directory.
    status.phase("checking output_dir and resume")
    run = setup_run(cfg, dims, log)
    stage, sequence, sharding, dtype, resume = run.stage, run.sequence, run.sharding, run.dtype, run.resume
    set_seed(t.seed)

    # Tokenizer, data, model, reference, optimizer.
    status.phase("loading the tokenizer, data and model")
    tokenizer = load_tokenizer(cfg.model)
    check_vocabulary(tokenizer, run.model_config, resizes=vocabulary_grows(cfg.model))
    data = setup_data(cfg, stage, tokenizer, dims, log)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    recipe = ModelRecipe.for_training(cfg, dtype, sharding)
    policy, neftune = setup_model(cfg, recipe, stage, sequence, dims, log)
    autocast = dtype if dtype in LOW_PRECISION and not sharding.enabled else None
    parts = RunParts(policy.root, dims, sequence, stage, pad_id, neftune, int(run.model_config.hidden_size),
                     autocast, forward_context=policy.forward_context)
    eval_reference = setup_reference(cfg, parts, policy, recipe, data, sequence, log)
    opt, (start_step, tokens_seen) = setup_optimizer(cfg, policy, sharding, dims, data.steps, resume, log)
    metrics = open_metrics(cfg, dims, resume, start_step, log)
    evaluator = Evaluator(parts, data.eval_examples, cfg, eval_reference)
    checkpointer = Checkpointer(cfg, dims, policy.root, tokenizer, opt.optimizer, opt.scheduler, run.settings,
                                on_save=callbacks.on_save, loss_scaler=opt.loss_scaler)
    log_banner(cfg, data, policy, dtype, sharding, dims, log)

    total_steps = data.steps.total_steps
    progress = _progress_bar(total_steps, start_step, disabled=t.disable_tqdm or not dims.is_main)
    step = start_step
    try:
        for step in range(start_step + 1, total_steps + 1):
            status.phase(f"step {step}")
            started = time.perf_counter()
            step_data = data.steps.step(step - 1)
            result = train_step(parts, cfg, step_data, opt, step, callbacks.after_backward)
            elapsed = time.perf_counter() - started
            tokens_seen += result.tokens
            progress.update(1)
            progress.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.input_tokens / elapsed:.0f}")
            row = training_row(step, step_data, result, elapsed, dims, data, opt.loss_scaler)

            # Once in a while: log, evaluate, save.
            if metrics is not None and metrics.should_log(step, total_steps):
                metrics.write(row)
            if evaluator.should_evaluate(step, total_steps, step_data.ends_epoch):
                result_eval = evaluator.evaluate()
                if metrics is not None:
                    metrics.write({"step": step, "epoch": round(step_data.epoch, 4), **result_eval})
                    progress.write(f"step {step}: eval_loss {result_eval['eval_loss']:.4f}")
            if checkpointer.should_save(step, total_steps, step_data.ends_epoch):
                status.phase(f"saving checkpoint-{step}")
                checkpointer.save(step, step_data.epoch, tokens_seen)
            if callbacks.on_step_end is not None:
                callbacks.on_step_end(step, row)
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
        if neftune is not None:
            neftune.remove()

    # The final model (and the loss plot).
    final_dir = checkpointer.save_final(policy.model)
    if dims.is_main and t.plot_loss:
        from longtune.plotting import plot_loss

        plot_loss(out / "metrics.jsonl", out / "loss.png")
    dims.barrier()
    return RunResult(output_dir=out, final_dir=final_dir, global_step=step,
                     metrics=metrics.rows if metrics is not None else [])


def _progress_bar(total: int, initial: int, disabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disabled, file=sys.stderr,
                dynamic_ncols=True)
