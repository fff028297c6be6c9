"""The run directory (`output_dir`): the checks before any work (writable, not someone else's files, a resume
that fits), the record of what longtune writes there, and the `Checkpointer` that owns when and how a run saves
(checkpoint-STEP/ with rotation, final/)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from longtune.checkpoint import (
    TrainerState,
    complete_checkpoints,
    read_state,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint,
    save_model_dir,
)
from longtune.config import Config
from longtune.errors import ConfigError, LongtuneError
from longtune.faults import STATUS_DIR
from longtune.io import atomic_dir, atomic_write_text
from longtune.models.loader import load_model_config
from longtune.parallel.fsdp import RootForward, full_state_dict
from longtune.parallel.mesh import ParallelDims
from longtune.parallel.tensor import check_tensor_parallel

RUN_ARTEFACTS = ("metrics.jsonl", "train_config.yaml", "loss.png", "final", "runs")
RUN_RECORD = ".longtune-run.json"  # what longtune wrote into output_dir: all that overwrite_output_dir may remove
TEMP_PREFIXES = (".tmp-checkpoint-", ".tmp-final")  # left by a run killed mid-save

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
    error): the output directory (not the resume checkpoint: the ranks verify that), the model directory and
    whether tensor parallelism fits the model."""
    if cfg.train.resume_from_checkpoint in (None, False):
        _check_output_dir_main(cfg, lambda _: None)
    check_tensor_parallel(load_model_config(cfg.model), cfg.parallel.tensor_parallel_size)


def run_settings(cfg: Config, dims: ParallelDims, sharded: bool) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it, for `check_resume_settings`."""
    return {"stage": cfg.train.stage, "finetuning_type": cfg.model.finetuning_type, "lora_rank": cfg.model.lora_rank,
            "dtype": cfg.compute_dtype, "max_steps": cfg.train.max_steps,
            "num_train_epochs": cfg.train.num_train_epochs, "learning_rate": cfg.train.learning_rate,
            "world_size": dims.world_size, "sequence_parallel_size": dims.sp, "tensor_parallel_size": dims.tp,
            "fsdp": sharded, "optim": cfg.train.optim}


def check_resume_settings(ckpt: Path, now: dict[str, Any], log: Callable[[str], None]) -> TrainerState:
    """Refuse a resume whose checkpoint cannot fit the model being built; say what else changed."""
    state = read_state(ckpt)
    assert state is not None
    before = state.run
    # optim: another optimizer's state does not load into this one.
    must_match = ["stage", "finetuning_type", "optim"] + (["lora_rank"] if now["finetuning_type"] == "lora" else [])
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
                                                                "learning_rate", "world_size", "sequence_parallel_size",
                                                                "tensor_parallel_size")
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
    if "tensorboard" in cfg.reporters:
        written.add("runs")
    record = out / RUN_RECORD
    atomic_write_text(record, json.dumps({"written": sorted(ours | written)}))



class Checkpointer:
    """When and how this run saves: checkpoint-STEP/ every `save_steps` and at the last step (then rotation
    to `save_total_limit`), and final/ at the end. `on_save(step, path)` is told of every checkpoint written."""

    def __init__(self, cfg: Config, dims: ParallelDims, root: RootForward, tokenizer: Any, optimizer: Any,
                 scheduler: Any, settings: dict[str, Any], on_save: Callable[[int, Path], None] | None = None,
                 loss_scaler: Any = None):
        self.out = Path(cfg.train.output_dir or "")
        self.train_cfg = cfg.train
        self.dims = dims
        self.root = root
        self.tokenizer = tokenizer
        # save_only_model: weights only, so the checkpoint cannot resume the optimizer or schedule
        self.optimizer = None if cfg.train.save_only_model else optimizer
        self.scheduler = None if cfg.train.save_only_model else scheduler
        self.settings = settings
        self.on_save = on_save
        self.loss_scaler = None if cfg.train.save_only_model else loss_scaler

    def should_save(self, step: int, total_steps: int, ends_epoch: bool = False) -> bool:
        """save_strategy (Hugging Face's meaning): `steps` every save_steps, `epoch` when an epoch ends, `no` never;
        the last step saves unless `no`."""
        strategy = self.train_cfg.save_strategy
        if strategy == "no":
            return False
        if strategy == "epoch":
            return ends_epoch or step == total_steps
        save_steps = self.train_cfg.save_steps
        return bool(save_steps and step % save_steps == 0) or step == total_steps

    def save(self, step: int, epoch: float, tokens_seen: int) -> None:
        path = save_checkpoint(self.out, step, epoch, tokens_seen, self.root, self.tokenizer, self.optimizer,
                               self.scheduler, self.dims, self.settings, self.loss_scaler)
        if self.dims.is_main:
            rotate_checkpoints(self.out, self.train_cfg.save_total_limit)
        if self.on_save is not None:
            self.on_save(step, path)

    def save_final(self, model: Any) -> Path:
        """final/: a Hugging Face model directory or peft adapter, written to a temp dir and renamed (all ranks
        take part in gathering a sharded state; the main rank writes)."""
        final_dir = self.out / "final"
        state = full_state_dict(self.root)
        if self.dims.is_main:
            with atomic_dir(final_dir, ".tmp-final") as tmp:
                save_model_dir(model, self.tokenizer, tmp, state_dict=state)
        return final_dir
