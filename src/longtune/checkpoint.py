"""Atomic checkpoints and exact resume.

A checkpoint is written into a hidden temp dir, its manifest (`trainer_state.json`, listing every file and its
size) last, then renamed to `checkpoint-STEP`. A directory without a manifest that matches its files is
half-written and is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from longtune.errors import ConfigError
from longtune.models.loader import is_peft_model
from longtune.parallel.fsdp import RootForward, full_state_dict, is_fsdp, load_full_state_dict
from longtune.parallel.mesh import ParallelDims

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "trainer_state.json"


@dataclass
class TrainerState:
    global_step: int
    epoch: float
    tokens_seen: int
    files: dict[str, int]  # relative path -> size in bytes, checked on load
    resumable: bool = True  # False with save_only_model


def save_model_dir(model: nn.Module, tokenizer: Any, path: Path, state_dict: dict | None = None) -> None:
    """A Hugging Face model directory (or a peft adapter directory) plus tokenizer files.

    `state_dict` (keys of `model`) is given when the live parameters are sharded."""
    model.save_pretrained(str(path), safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


TRAINABLE_FILE = "trainable_state.safetensors"
OPTIMIZER_DCP_DIR = "optimizer_sharded"


def _shared_tmp_dir(output_dir: Path, step: int, dims: ParallelDims) -> Path:
    """Rank 0 makes the temp dir; every rank learns its name (they all write shards into it)."""
    name = [None]
    if dims.is_main:
        name = [tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=output_dir)]
    if dims.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    return Path(str(name[0]))


def save_checkpoint(
    output_dir: Path,
    step: int,
    epoch: float,
    tokens_seen: int,
    root: RootForward,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    dims: ParallelDims,
) -> Path:
    """Collective: every rank calls it. Rank 0 writes the model (HF format) and the manifest, then renames."""
    final = output_dir / f"checkpoint-{step}"
    tmp = _shared_tmp_dir(output_dir, step, dims)
    try:
        state = full_state_dict(root)
        if dims.is_main:
            save_model_dir(root.model, tokenizer, tmp, state_dict=state)
            if is_peft_model(root.model):
                # Adapter files use peft's own key names; resume needs the live module names.
                trainable = {n for n, p in root.model.named_parameters() if p.requires_grad}
                save_file({k: v.contiguous() for k, v in state.items() if k in trainable}, str(tmp / TRAINABLE_FILE))
        del state
        if optimizer is not None:
            if is_fsdp(root):
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

                dcp.save({"optim": get_optimizer_state_dict(root, optimizer)},
                         checkpoint_id=str(tmp / OPTIMIZER_DCP_DIR))
            elif dims.is_main:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if dims.is_main:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(_rng_state(), tmp / "rng_state.pt")
        dims.barrier()
        if dims.is_main:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = TrainerState(global_step=step, epoch=epoch, tokens_seen=tokens_seen, files=files,
                                    resumable=optimizer is not None)
            with open(tmp / MANIFEST, "w") as fh:
                json.dump(asdict(manifest), fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        dims.barrier()
    except BaseException:
        if dims.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_state(ckpt: Path) -> TrainerState | None:
    """The manifest if the checkpoint is complete (every listed file present with its size), else None."""
    manifest = ckpt / MANIFEST
    try:
        raw = json.loads(manifest.read_text())
        state = TrainerState(**raw)
    except (OSError, ValueError, TypeError):
        return None
    for rel, size in state.files.items():
        f = ckpt / rel
        if not f.is_file() or f.stat().st_size != size:
            return None
    return state


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first."""
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            m = CHECKPOINT_RE.match(child.name)
            if m and child.is_dir() and read_state(child) is not None:
                found.append((int(m.group(1)), child))
    return sorted(found)


def rotate_checkpoints(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    ckpts = complete_checkpoints(output_dir)
    for _, path in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(output_dir: Path, resume: str | bool | None) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        ckpts = complete_checkpoints(output_dir)
        if not ckpts:
            raise ConfigError(
                f"key 'resume_from_checkpoint': no complete checkpoint-N directory in '{output_dir}'"
            )
        return ckpts[-1][1]
    path = Path(str(resume))
    if not path.is_dir():
        raise ConfigError(f"key 'resume_from_checkpoint': '{resume}' is not a directory")
    state = read_state(path)
    if state is None:
        raise ConfigError(
            f"key 'resume_from_checkpoint': '{resume}' is incomplete (missing or mismatched {MANIFEST}); "
            "pick an earlier checkpoint"
        )
    if not state.resumable:
        raise ConfigError(f"key 'resume_from_checkpoint': '{resume}' holds only the model (save_only_model)")
    return path


def load_model_weights(root: RootForward, ckpt: Path) -> None:
    """Load the checkpoint's trained weights into the built (possibly sharded) model. Every rank reads them."""
    if is_peft_model(root.model):
        state = load_file(str(ckpt / TRAINABLE_FILE))
        expected = {n for n, p in root.model.named_parameters() if p.requires_grad}
    else:
        state = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            state.update(load_file(str(f)))
        expected = set(root.model.state_dict())
        # Tied weights (e.g. lm_head sharing embed_tokens) are saved once.
        params = dict(root.model.named_parameters(remove_duplicate=False))
        by_id: dict[int, list[str]] = {}
        for name, p in params.items():
            by_id.setdefault(id(p), []).append(name)
        for names in by_id.values():
            present = [n for n in names if n in state]
            for n in names:
                if n not in state and present:
                    state[n] = state[present[0]]
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(root.model.state_dict()))
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint '{ckpt}' does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    load_full_state_dict(root, state)


def load_training_state(ckpt: Path, root: RootForward, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainerState:
    state = read_state(ckpt)
    assert state is not None
    if is_fsdp(root):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        if not (ckpt / OPTIMIZER_DCP_DIR).is_dir():
            raise ConfigError(f"checkpoint '{ckpt}' was not written by a sharded (FSDP) run; resume with the same launch")
        holder = {"optim": get_optimizer_state_dict(root, optimizer)}
        dcp.load(holder, checkpoint_id=str(ckpt / OPTIMIZER_DCP_DIR))
        set_optimizer_state_dict(root, optimizer, holder["optim"])
    else:
        if not (ckpt / "optimizer.pt").is_file():
            raise ConfigError(f"checkpoint '{ckpt}' holds sharded optimizer state; resume with FSDP on (fsdp: true)")
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    _set_rng_state(torch.load(ckpt / "rng_state.pt", weights_only=False))
    return state
