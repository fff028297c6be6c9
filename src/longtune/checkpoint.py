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
from safetensors.torch import load_file
from torch import nn

from longtune.errors import ConfigError
from longtune.models.loader import is_peft_model

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "trainer_state.json"


@dataclass
class TrainerState:
    global_step: int
    epoch: float
    tokens_seen: int
    files: dict[str, int]  # relative path -> size in bytes, checked on load


def save_model_dir(model: nn.Module, tokenizer: Any, path: Path) -> None:
    """A Hugging Face model directory (or a peft adapter directory) plus tokenizer files."""
    model.save_pretrained(str(path), safe_serialization=True)
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


def save_checkpoint(
    output_dir: Path,
    step: int,
    epoch: float,
    tokens_seen: int,
    model: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
) -> Path:
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=output_dir))
    try:
        save_model_dir(model, tokenizer, tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if optimizer is not None:
            torch.save(_rng_state(), tmp / "rng_state.pt")
        files = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        state = TrainerState(global_step=step, epoch=epoch, tokens_seen=tokens_seen, files=files)
        manifest = tmp / MANIFEST
        with open(manifest, "w") as fh:
            json.dump(asdict(state), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
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
    if not (path / "optimizer.pt").is_file():
        raise ConfigError(f"key 'resume_from_checkpoint': '{resume}' holds only the model (save_only_model)")
    return path


def load_model_weights(model: nn.Module, ckpt: Path) -> None:
    """Load the checkpoint's weights into the already-built model (adapters into a peft model)."""
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ConfigError(f"checkpoint '{ckpt}': adapter does not match the model ({unexpected[:3]} ...)")
        return
    state: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (e.g. lm_head sharing embed_tokens) are saved once; a key is only truly missing if its
    # tensor is not shared with a loaded one.
    loaded_ptrs = {p.data_ptr() for n, p in model.state_dict().items() if n in state}
    params = model.state_dict()
    really_missing = [k for k in missing if params[k].data_ptr() not in loaded_ptrs]
    if really_missing or unexpected:
        raise ConfigError(
            f"checkpoint '{ckpt}' does not match the model: missing {really_missing[:3]}, unexpected {unexpected[:3]}"
        )


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainerState:
    state = read_state(ckpt)
    assert state is not None
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    _set_rng_state(torch.load(ckpt / "rng_state.pt", weights_only=False))
    return state
