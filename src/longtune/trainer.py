"""The training loop, top to bottom: set up the run directory, data, model and optimizer; then for each optimizer
step (its examples from memory or from the stream: steps.py) collate its micro-batches, divide every token loss by
the number of loss tokens in the whole step, step, log, evaluate and checkpoint.

Dividing by the step's global token count (not averaging per-micro-batch means) is what makes
`batch 4 x GA 1 == batch 1 x GA 4` exact.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from longtune.checkpoint import (
    TrainerState,
    complete_checkpoints,
    load_model_weights,
    load_training_state,
    read_state,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint,
    save_model_dir,
)
from longtune.config import Config, TrainConfig, save_config
from longtune.data import DataStats, examples_from_config
from longtune.data.collate import IGNORE_INDEX, Batch, collate, loss_token_count
from longtune.data.packing import PackingStats, pack_examples
from longtune.errors import ConfigError, DataError, LongtuneError
from longtune.faults import STATUS_DIR, RankStatus, is_peer_failure
from longtune.io import atomic_dir, atomic_write_text
from longtune.models.loader import (
    DTYPES,
    apply_finetuning,
    check_vocabulary,
    decoder_layer_list,
    load_model,
    load_model_config,
    load_tokenizer,
    unwrap_base,
)
from longtune.models.neftune import NEFTune, neftune_scales
from longtune.optim import build_optimizer, lr_lambda
from longtune.parallel.activation import apply_tiled_mlp, enable_checkpointing
from longtune.parallel.fsdp import RootForward, apply_fsdp, full_state_dict, gradient_scale, plan_from_config
from longtune.parallel.mesh import ParallelDims, init_parallel, shutdown_parallel
from longtune.parallel.sequence import SequenceParallel
from longtune.reference import (
    PrecomputedReference,
    build_live_reference,
    cache_path,
    load_table,
    precompute_table,
    reference_fingerprint,
    save_table,
)
from longtune.stages import build_stage
from longtune.steps import PlannedSteps, StreamedSteps, plan_steps

RUN_ARTEFACTS = ("metrics.jsonl", "train_config.yaml", "loss.png", "final", "runs")
RUN_RECORD = ".longtune-run.json"  # what longtune wrote into output_dir: all that overwrite_output_dir may remove
TEMP_PREFIXES = (".tmp-checkpoint-", ".tmp-final")  # left by a run killed mid-save


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


def recorded_artefacts(out: Path) -> set[str]:
    """Names in output_dir that an earlier longtune run recorded writing (empty without a record)."""
    try:
        return set(json.loads((out / RUN_RECORD).read_text()).get("written", []))
    except (OSError, ValueError, AttributeError):
        return set()


def _check_writable(out: Path) -> None:
    """Fail before any work if output_dir (or the folder it will be made in) cannot be written."""
    probe_dir = out
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as exc:
        raise ConfigError(f"key 'output_dir': '{probe_dir}' is not writable ({exc.strerror or exc}); "
                          "choose a writable output_dir") from None


def _check_output_dir_main(cfg: Config, log: Callable[[str], None]) -> Path | None:
    out = Path(cfg.train.output_dir or "")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"key 'output_dir': '{out}' exists and is not a directory")
    _check_writable(out)
    resume = resolve_resume(out, cfg.train.resume_from_checkpoint, log)
    if resume is None and out.is_dir() and any(c.name != STATUS_DIR for c in out.iterdir()):
        if not cfg.train.overwrite_output_dir:
            raise ConfigError(
                f"key 'output_dir': '{out}' is not empty; set overwrite_output_dir: true to replace it "
                "or resume_from_checkpoint: true to continue it"
            )
        ours = recorded_artefacts(out)
        for name in RUN_ARTEFACTS:
            if (out / name).exists() and name not in ours:
                raise ConfigError(
                    f"key 'overwrite_output_dir': '{out / name}' was not written by a longtune run (no record in "
                    f"{RUN_RECORD}), so it is not replaced; move it away or choose another output_dir"
                )
    return resume


def check_output_dir(cfg: Config, dims: ParallelDims | None = None, log: Callable[[str], None] = print) -> Path | None:
    """Read-only checks (plus a write probe); returns the verified checkpoint to resume from, if any. The main
    rank checks (hashing a checkpoint once) and tells the others, so every rank fails alike or resumes alike."""
    outcome: list[Any] = [None]
    if dims is None or dims.is_main:
        try:
            resume = _check_output_dir_main(cfg, log)
            outcome = [("ok", None if resume is None else str(resume))]
        except LongtuneError as exc:
            if dims is None or dims.world_size == 1:
                raise
            outcome = [("error", type(exc).__name__, str(exc))]
    if dims is not None and dims.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(outcome, src=0)
    if outcome[0][0] == "error":
        import longtune.errors as errors

        raise getattr(errors, outcome[0][1], ConfigError)(outcome[0][2])
    return None if outcome[0][1] is None else Path(outcome[0][1])


def preflight(cfg: Config) -> None:
    """Checks the launching process of `--nproc N` runs before the ranks start (each would report the same
    error): the output directory (not the resume checkpoint: the ranks verify that) and the model directory."""
    if cfg.train.resume_from_checkpoint in (None, False):
        _check_output_dir_main(cfg, lambda _: None)
    load_model_config(cfg.model)


def run_settings(cfg: Config, dims: ParallelDims, sharded: bool) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it, for `check_resume_settings`."""
    return {"stage": cfg.train.stage, "finetuning_type": cfg.model.finetuning_type, "lora_rank": cfg.model.lora_rank,
            "dtype": cfg.compute_dtype, "max_steps": cfg.train.max_steps,
            "num_train_epochs": cfg.train.num_train_epochs, "learning_rate": cfg.train.learning_rate,
            "world_size": dims.world_size, "sequence_parallel_size": dims.sp, "fsdp": sharded}


def check_resume_settings(ckpt: Path, now: dict[str, Any], log: Callable[[str], None]) -> TrainerState:
    """Refuse a resume whose checkpoint cannot fit the model being built; say what else changed."""
    state = read_state(ckpt)
    assert state is not None
    before = state.run
    must_match = ["stage", "finetuning_type"] + (["lora_rank"] if now["finetuning_type"] == "lora" else [])
    for key in must_match:
        if key in before and before[key] != now[key]:
            raise ConfigError(f"key '{key}': {now[key]!r}, but {ckpt.name} was written with {key}: {before[key]!r}; "
                              f"resume with {key}: {before[key]} (or start a new run)")
    if "fsdp" in before and before["fsdp"] != now["fsdp"]:
        if before["fsdp"]:
            fix = f"--nproc {before['world_size']} (FSDP is on by default with several processes)"
        else:
            fix = f"fsdp: false with {before['world_size']} process(es)"
        raise ConfigError(f"key 'resume_from_checkpoint': {ckpt.name} was written {'with' if before['fsdp'] else 'without'}"
                          f" FSDP by {before['world_size']} process(es), this launch has {now['world_size']} "
                          f"{'with' if now['fsdp'] else 'without'} FSDP; resume with {fix}")
    changed = [f"{key} {before[key]} -> {now[key]}" for key in ("dtype", "max_steps", "num_train_epochs",
                                                                "learning_rate", "world_size", "sequence_parallel_size")
               if key in before and before[key] != now[key]]
    if changed:
        log(f"notice: resuming {ckpt.name} with changed settings: {', '.join(changed)} (the loss curve will not "
            "match an uninterrupted run)")
    return state


def prepare_output_dir(cfg: Config, resume: Path | None) -> None:
    """Create output_dir (main rank only). Remove half-written temp dirs; with overwrite_output_dir, remove only
    what an earlier run recorded writing (and its checkpoints); record what this run will write."""
    out = Path(cfg.train.output_dir or "")
    ours = recorded_artefacts(out) if out.is_dir() else set()
    if out.is_dir():
        for child in out.iterdir():
            if child.is_dir() and child.name.startswith(TEMP_PREFIXES):
                shutil.rmtree(child, ignore_errors=True)
    if resume is None and out.is_dir():
        for name in RUN_ARTEFACTS:
            target = out / name
            if name not in ours:
                continue  # check_output_dir refused the run if a user's file has this name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for _, ckpt in complete_checkpoints(out):
            shutil.rmtree(ckpt)
        ours = set()
    elif resume is not None:
        # A crash between a save and its rotation leaves one checkpoint too many; never the one resumed from.
        rotate_checkpoints(out, cfg.train.save_total_limit, keep_also=resume)
    out.mkdir(parents=True, exist_ok=True)
    written = {"metrics.jsonl", "train_config.yaml", "final"}
    if cfg.train.plot_loss:
        written.add("loss.png")
    if cfg.train.report_to == "tensorboard":
        written.add("runs")
    record = out / RUN_RECORD
    atomic_write_text(record, json.dumps({"written": sorted(ours | written)}))


def load_split(cfg: Config, tokenizer: Any, split: str):
    """Examples of one split in the shape the stage needs (pairs for dpo/rm, example + KL doc for kto)."""
    if cfg.train.stage in ("dpo", "rm"):
        from longtune.data.preference import load_pair_examples

        return load_pair_examples(cfg, tokenizer, split)
    if cfg.train.stage == "kto":
        from longtune.data.preference import load_kto_examples

        return load_kto_examples(cfg, tokenizer, split)
    return examples_from_config(cfg, tokenizer, split)


def load_datasets(cfg: Config, tokenizer: Any, dims: ParallelDims, log: Callable[[str], None]) -> tuple[list, list]:
    """Train and eval examples. The main rank tokenizes first (and fills the cache); the others then read it."""
    d = cfg.data
    with dims.main_rank_first():
        train, stats = load_split(cfg, tokenizer, "train")
        evals = load_split(cfg, tokenizer, "eval")[0] if d.eval_dataset else []
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
    cfg: Config, tokenizer: Any, dims: ParallelDims, log: Callable[[str], None]
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
            evals = load_split(cfg, tokenizer, "eval")[0]
    else:
        evals = held_out_examples(cfg, tokenizer)  # the first val_size examples of the stream, if any
    log(
        f"data: streaming {','.join(d.dataset)} ({d.mix_strategy}): shuffle buffer {d.buffer_size}"
        f"{f', packing windows of {d.packing_buffer} documents' if cfg.packing else ''}; every rank reads and "
        f"tokenizes the stream; {len(evals)} eval examples in memory"
    )
    return steps, evals, packing if cfg.packing else None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident set.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLog:
    """metrics.jsonl plus optional TensorBoard; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None, tensorboard_dir: Path | None,
                 log: Callable[[str], None] = print):
        self.path = path
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


@dataclass
class RunParts:
    """What the loop needs besides the config: built once in `train`, passed explicitly."""

    root: RootForward  # the model inside the (possibly FSDP-sharded) root module
    dims: ParallelDims
    sequence: SequenceParallel
    stage: Any
    pad_id: int
    neftune: NEFTune | None
    hidden_size: int
    autocast_dtype: torch.dtype | None  # bf16 compute over fp32 master weights without FSDP
    reference: Any = None  # callable giving per-sequence reference sums, for stages that use one
    forward_context: Callable[[], Any] = contextlib.nullcontext  # activation offload (save_on_cpu fallback)


def forward_loss(parts: RunParts, rows: list, ids: list[int] | None, cfg: Config, reference: Any = None):
    """This rank's StageOutput for one micro-batch of examples (`ids`: their indices, for precomputed refs)."""
    batch = collate(rows, parts.pad_id)
    scale = None
    if parts.neftune is not None and parts.root.training:
        scale = neftune_scales(batch, float(cfg.data.neftune_noise_alpha or 0.0), parts.hidden_size)
    inputs = parts.sequence.prepare(batch, parts.pad_id, parts.dims.device, neftune_scale=scale)
    if parts.neftune is not None:
        parts.neftune.scale = inputs.neftune_scale
    if hasattr(rows[0], "desirable"):
        inputs.flags = torch.tensor([bool(getattr(r, "desirable", False)) for r in rows], device=parts.dims.device)
    autocast = (torch.autocast(parts.dims.device.type, dtype=parts.autocast_dtype)
                if parts.autocast_dtype is not None else contextlib.nullcontext())
    with autocast, parts.forward_context():
        if parts.stage.uses_reference:
            inputs.reference = (reference or parts.reference)(parts.stage, inputs, cfg.train.loss_chunk_size, ids)
        return parts.root(parts.stage.loss, inputs, cfg.train.loss_chunk_size)


def blank_like(example) -> SimpleNamespace:
    """The same tokens with no label: a micro-batch that adds nothing to the loss, run by a rank that has run
    out of real micro-batches so that every rank issues the same collectives (FSDP, SP)."""
    return SimpleNamespace(input_ids=list(example.input_ids), labels=[IGNORE_INDEX] * len(example.input_ids),
                           doc_lengths=getattr(example, "doc_lengths", None), desirable=False)


def metric_means(names: tuple[str, ...], sums: torch.Tensor) -> dict[str, float]:
    """(sum, count) pairs, already summed over ranks and micro-batches, to means."""
    pairs = sums.view(-1, 2)
    return {name: float(pairs[i, 0] / pairs[i, 1]) for i, name in enumerate(names) if float(pairs[i, 1]) > 0}


def evaluate(parts: RunParts, examples: list, cfg: Config, reference: Any = None) -> dict[str, float]:
    """Mean loss over the whole eval set (rows split over dp, sequences over sp) and the stage's metrics."""
    root, dims, stage = parts.root, parts.dims, parts.stage
    was_training = root.training
    root.eval()
    sums = torch.zeros(2 + 2 * len(stage.metric_names), dtype=torch.float64, device=dims.device)
    bs = cfg.train.per_device_eval_batch_size
    mine = list(range(dims.dp_rank, len(examples), dims.dp))
    rounds = math.ceil(math.ceil(len(examples) / dims.dp) / bs)  # the same on every rank
    with torch.no_grad():
        for r in range(rounds):
            ids = mine[r * bs : (r + 1) * bs]
            rows = [examples[i] for i in ids] or [blank_like(examples[0])]
            out = forward_loss(parts, rows, ids, cfg, reference)
            sums[0] += out.loss_sum.to(torch.float64)
            sums[1] += out.count.to(torch.float64)
            if out.metrics is not None:
                sums[2:] += out.metrics.to(sums.device)
    dims.all_reduce_sum(sums)
    root.train(was_training)
    # sp ranks each hold their share of loss and count, so the sums are over the whole eval set
    result = {"eval_loss": float(sums[0] / sums[1].clamp_min(1)), "eval_count": int(round(float(sums[1])))}
    result.update({f"eval_{k}": v for k, v in metric_means(stage.metric_names, sums[2:]).items()})
    return result


def all_reduce_gradients(params: list[nn.Parameter], dims: ParallelDims) -> None:
    """Without FSDP: sum gradients over every rank. Each rank's loss is its share of one global sum (already
    divided by the step's global token count), so the sum is the gradient of the whole step."""
    if dims.world_size == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dims.all_reduce_sum(flat)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def train(cfg: Config, log: Callable[[str], None] = print) -> RunResult:
    """Run one training job; every process of a multi-process launch calls this. A collective that fails
    because a peer died or stopped becomes a one-line PeerError naming that peer (see faults.py)."""
    t = cfg.train
    dims = init_parallel(cfg.parallel.sequence_parallel_size, t.ddp_timeout)
    status = RankStatus(t.output_dir, dims.rank, dims.world_size, t.ddp_timeout)
    try:
        result = _train(cfg, dims, log if dims.is_main else (lambda _: None), status)
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


def precompute_references(parts: RunParts, cfg: Config, train_examples: list, eval_examples: list, log):
    """One pass of the live reference over all examples (cached on disk); then the live one is dropped."""
    dims, live = parts.dims, parts.reference
    docs_per_row = 2
    bs = cfg.train.per_device_train_batch_size
    tables = []
    for examples in (train_examples, eval_examples):
        if not examples:
            tables.append(None)
            continue
        path = cache_path(reference_fingerprint(cfg, examples), cfg.data.data_cache_dir)
        table = load_table(path, len(examples), docs_per_row)
        hit = [table is not None]
        if dims.world_size > 1:
            import torch.distributed as dist

            flags = torch.tensor([1.0 if hit[0] else 0.0], device=dims.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # use the cache only if every rank can read it
            hit = [bool(flags.item())]
        if not hit[0]:
            started = time.perf_counter()

            def run(reference, ids, examples=examples):
                rows = [examples[i] for i in ids] or [blank_like(examples[0])]
                batch = collate(rows, parts.pad_id)
                inputs = parts.sequence.prepare(batch, parts.pad_id, dims.device)
                return reference(parts.stage, inputs, cfg.train.loss_chunk_size, ids)

            table = precompute_table(live, parts.stage, examples, run, dims, bs, docs_per_row)
            if dims.is_main:
                save_table(table, path)
            log(f"reference log-probs: computed for {len(examples)} examples in "
                f"{time.perf_counter() - started:.1f}s, cached at {path}")
        else:
            log(f"reference log-probs: {len(examples)} examples from cache {path}")
        tables.append(table)
    # The caller replaces parts.reference with these tables, which drops the last reference to a frozen copy.
    train_ref = PrecomputedReference(tables[0])
    eval_ref = PrecomputedReference(tables[1]) if tables[1] is not None else None
    return train_ref, eval_ref


def _train(cfg: Config, dims: ParallelDims, log: Callable[[str], None], status: RankStatus | None = None) -> RunResult:
    t = cfg.train
    status = status or RankStatus(None, dims.rank, 1, t.ddp_timeout)
    status.phase("checking output_dir and resume")
    out = Path(t.output_dir or "")
    resume_ckpt = check_output_dir(cfg, dims, log)
    sharding = plan_from_config(cfg.parallel.fsdp, cfg.parallel.offload_params, cfg.parallel.deepspeed,
                                dims.world_size, log)
    settings = run_settings(cfg, dims, sharding.enabled)
    if resume_ckpt is not None:
        check_resume_settings(resume_ckpt, settings, log)
    device = dims.device
    dtype = DTYPES[cfg.compute_dtype]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("key 'bf16': this GPU does not support bfloat16; use fp16: true")
    if dtype == torch.float16:
        raise ConfigError("key 'fp16': float16 training needs loss scaling, which longtune does not do; use bf16")
    # Everything that can be checked without weights is checked first (SP degree vs heads, data).
    model_config = load_model_config(cfg.model)
    stage = build_stage(cfg)
    pairs = t.stage in ("dpo", "kto", "rm")  # two documents per row: document-aware attention even at sp=1
    sequence = SequenceParallel(dims, cfg.parallel, model_config, packed=cfg.packing or pairs, log=log)
    if dims.is_main:
        prepare_output_dir(cfg, resume_ckpt)
    dims.barrier()
    set_seed(t.seed)

    status.phase("loading the tokenizer, data and model")
    tokenizer = load_tokenizer(cfg.model)
    check_vocabulary(tokenizer, model_config)
    train_examples: list = []  # in memory only: streaming holds a window of them at a time
    streamed_packing: PackingStats | None = None  # streaming with packing: what was packed so far
    steps: PlannedSteps | StreamedSteps
    if cfg.data.streaming:
        steps, eval_examples, streamed_packing = load_streaming(cfg, tokenizer, dims, log)
    else:
        train_examples, eval_examples = load_datasets(cfg, tokenizer, dims, log)
        if cfg.packing:
            train_examples, stats = pack_examples(train_examples, cfg.data.cutoff_len)
            log(f"packing: {stats.documents} examples -> {stats.rows} rows of {stats.capacity}, "
                f"efficiency {stats.efficiency:.1%}")
        steps = PlannedSteps(plan_steps(len(train_examples), t, dims.dp), train_examples)
    if cfg.packing and eval_examples:
        eval_examples, _ = pack_examples(eval_examples, cfg.data.cutoff_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # bf16: frozen weights stay bf16; trainable weights are fp32 masters, compute runs in bf16 (FSDP's
    # MixedPrecisionPolicy, or autocast on one process), as LLaMA-Factory does outside pure_bf16.
    low_precision = dtype in (torch.bfloat16, torch.float16)
    model = load_model(cfg.model, dtype, task="reward" if t.stage == "rm" else "causal")
    model = apply_finetuning(model, cfg.model)
    if low_precision:
        for p in model.parameters():
            if p.requires_grad or sharding.enabled:
                p.data = p.data.float()
    if t.tiled_mlp_tokens:
        tiled = apply_tiled_mlp(model, t.tiled_mlp_tokens)
        log(f"tiled MLP: {tiled} layers, {t.tiled_mlp_tokens} tokens per tile")
    forward_context: Callable[[], Any] = contextlib.nullcontext
    if t.gradient_checkpointing:
        forward_context = enable_checkpointing(model, t.offload_activations)
    sequence.apply(model, log)
    neftune = NEFTune(unwrap_base(model).get_input_embeddings()) if cfg.data.neftune_noise_alpha else None
    root = RootForward(model)
    if sharding.enabled:
        apply_fsdp(root, dims, decoder_layer_list(model)[1], dtype, sharding)
        if not sharding.offload:
            root.to(device)
    else:
        root.to(device)
    root.train()
    parts = RunParts(root, dims, sequence, stage, pad_id, neftune, int(model_config.hidden_size),
                     dtype if low_precision and not sharding.enabled else None,
                     forward_context=forward_context)
    eval_reference = None
    if stage.uses_reference:
        parts.reference = build_live_reference(cfg, root, dims, dtype, sharding, lambda m: decoder_layer_list(m)[1],
                                               lambda m: sequence.apply(m, lambda _: None), log)
        if cfg.preference.precompute_ref_log_probs:
            parts.reference, eval_reference = precompute_references(parts, cfg, train_examples, eval_examples, log)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())

    optimizer = build_optimizer(root, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, steps.total_steps))
    start_step, tokens_seen = 0, 0
    if resume_ckpt is not None:
        load_model_weights(root, resume_ckpt)
        state = load_training_state(resume_ckpt, root, optimizer, scheduler)
        start_step, tokens_seen = state.global_step, state.tokens_seen
        replay = " (replaying the stream up to it: those rows are read and tokenized again)"
        log(f"resumed from {resume_ckpt} at step {start_step}{replay if cfg.data.streaming else ''}")
        steps.skip(start_step)
    metrics = None
    if dims.is_main:
        save_config(cfg, out / "train_config.yaml")
        metrics = MetricsLog(
            out / "metrics.jsonl",
            start_step if resume_ckpt is not None else None,
            out / "runs" if t.report_to == "tensorboard" else None,
            log,
        )
    per_epoch = f"{steps.steps_per_epoch}/epoch" if steps.steps_per_epoch is not None else "epoch length unknown"
    log(
        f"run: {out} | {'streamed' if cfg.data.streaming else len(train_examples)} train / {len(eval_examples)} "
        f"eval rows | "
        f"{steps.total_steps} steps ({per_epoch}) | trainable {trainable:,} of {total_params:,} "
        f"params | {cfg.model.finetuning_type} | {dtype} on {device} x {dims.world_size}"
        f"{' | FSDP2' + (' + CPU offload' if sharding.offload else '') if sharding.enabled else ''}"
    )

    params = [p for p in root.parameters() if p.requires_grad]
    backward_scale = gradient_scale(sharding, dims)
    eval_every = t.eval_steps or t.logging_steps
    progress = _progress_bar(steps.total_steps, start_step, disabled=t.disable_tqdm or not dims.is_main)
    bs, ga = t.per_device_train_batch_size, t.gradient_accumulation_steps
    step = start_step
    try:
        for step in range(start_step + 1, steps.total_steps + 1):
            status.phase(f"step {step}")
            started = time.perf_counter()
            data = steps.step(step - 1)
            everyone = data.examples
            # The divisor of the step: all loss tokens (sft/pt) or pairs/examples (dpo/kto/rm) of all its
            # micro-batches on all ranks, known before the step.
            step_norm = sum(stage.normaliser(e) for e in everyone)
            step_tokens = sum(loss_token_count(e) for e in everyone)
            input_tokens = sum(len(e.input_ids) for e in everyone)
            loss_local = torch.zeros((), dtype=torch.float64, device=device)
            metric_sums = torch.zeros(2 * len(stage.metric_names), dtype=torch.float64, device=device)
            micro = data.micro_batches(bs, ga, dims.dp_rank)
            rounds = data.rounds(bs, ga)
            for index in range(rounds):
                if sharding.enabled:
                    # Syncing only on the last micro-batch keeps unsharded gradients of every layer until then.
                    root.set_requires_gradient_sync(cfg.parallel.gradient_sync_every_micro_batch
                                                    or index == rounds - 1)
                if index < len(micro):
                    rows, ids = micro[index]
                else:
                    rows, ids = [blank_like(everyone[0])], ([] if data.ids is not None else None)
                result = forward_loss(parts, rows, ids, cfg)
                (result.loss_sum * (backward_scale / max(step_norm, 1))).backward()
                loss_local += result.loss_sum.detach().to(torch.float64)
                if result.metrics is not None:
                    metric_sums += result.metrics.to(device)
            if not sharding.enabled:
                all_reduce_gradients(params, dims)
            max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(dims.all_reduce_sum(loss_local)) / max(step_norm, 1)
            step_metrics = metric_means(stage.metric_names, dims.all_reduce_sum(metric_sums))
            elapsed = time.perf_counter() - started
            tokens_seen += step_tokens
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}; lower learning_rate or check the data")
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{input_tokens / elapsed:.0f}")
            if metrics is not None and (step == 1 or step % t.logging_steps == 0 or step == steps.total_steps):
                packed_so_far = {} if streamed_packing is None else {
                    "packing_efficiency": round(streamed_packing.efficiency, 4)}
                metrics.write(
                    {
                        "step": step,
                        "epoch": round(data.epoch, 4),
                        "loss": loss,
                        "grad_norm": grad_norm,
                        "lr": lr,
                        "tokens": step_tokens,
                        "input_tokens": input_tokens,
                        "tokens_per_s": input_tokens / elapsed,
                        "peak_mem_gib": round(peak_memory_gib(device), 4),
                        **packed_so_far,
                        **step_metrics,
                    }
                )
            if eval_examples and _eval_due(t, step, eval_every, steps.total_steps, data.ends_epoch):
                result_eval = evaluate(parts, eval_examples, cfg, eval_reference)
                if metrics is not None:
                    metrics.write({"step": step, "epoch": round(data.epoch, 4), **result_eval})
                    progress.write(f"step {step}: eval_loss {result_eval['eval_loss']:.4f}")
            if (t.save_steps and step % t.save_steps == 0) or step == steps.total_steps:
                status.phase(f"saving checkpoint-{step}")
                save_checkpoint(
                    out, step, data.epoch, tokens_seen, root, tokenizer,
                    None if t.save_only_model else optimizer, None if t.save_only_model else scheduler, dims,
                    settings,
                )
                if dims.is_main:
                    rotate_checkpoints(out, t.save_total_limit)
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
        if neftune is not None:
            neftune.remove()

    final_dir = out / "final"
    state = full_state_dict(root)
    if dims.is_main:
        with atomic_dir(final_dir, ".tmp-final") as tmp:
            save_model_dir(model, tokenizer, tmp, state_dict=state)
        if t.plot_loss:
            from longtune.plotting import plot_loss

            plot_loss(out / "metrics.jsonl", out / "loss.png")
    dims.barrier()
    return RunResult(output_dir=out, final_dir=final_dir, global_step=step,
                     metrics=metrics.rows if metrics is not None else [])


def _eval_due(t: TrainConfig, step: int, every: int, total_steps: int, ends_epoch: bool) -> bool:
    if t.eval_strategy == "no":
        return False
    if step == total_steps:
        return True
    if t.eval_strategy == "epoch":
        return ends_epoch
    return step % every == 0


def _progress_bar(total: int, initial: int, disabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disabled, file=sys.stderr,
                dynamic_ncols=True)
