"""Atomic checkpoints and exact resume.

A checkpoint is written into a hidden temp dir, its manifest (`trainer_state.json`, listing every file with its
size and SHA-256) last, then renamed to `checkpoint-STEP`. A directory without a manifest that matches its files
is half-written and is never resumed from; one whose bytes changed after the run wrote them is refused.

Nothing in a checkpoint is unpickled with arbitrary globals: optimizer and scheduler state load with
`weights_only=True`, RNG state is JSON, and the sharded optimizer's DCP metadata goes through an allow-list
unpickler, so a crafted file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from longtune.errors import ConfigError, storage_error
from longtune.io import replace_dir
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
    files: dict[str, int]  # relative path -> size in bytes: a cheap completeness check
    resumable: bool = True  # False with save_only_model
    sha256: dict[str, str] = field(default_factory=dict)  # relative path -> digest, verified before resuming
    run: dict[str, Any] = field(default_factory=dict)  # settings of the writing run, compared on resume


def save_model_dir(model: nn.Module, tokenizer: Any, path: Path, state_dict: dict | None = None) -> None:
    """A Hugging Face model directory (or a peft adapter directory) plus tokenizer files.

    `state_dict` (keys of `model`) is given when the live parameters are sharded."""
    model.save_pretrained(str(path), safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def _rng_state() -> dict[str, Any]:
    """Every generator's state as plain JSON values (no pickle, so reading it back cannot run code)."""
    version, mt_words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt_words), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, mt_words, gauss = state["python"]
    random.setstate((version, tuple(mt_words), gauss))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


TRAINABLE_FILE = "trainable_state.safetensors"
OPTIMIZER_DCP_DIR = "optimizer_sharded"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.json"
LOSS_SCALE_FILE = "loss_scale.json"  # float16 runs: the dynamic loss scale (JSON, see loss_scale.py)
TRAINING_FILES = {OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, MANIFEST, TRAINABLE_FILE, LOSS_SCALE_FILE}  # not part of a model


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _digests(root: Path, rels: list[str]) -> dict[str, str]:
    # hashlib releases the GIL on large buffers, so threads hash several shards at disk speed.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(rels)))) as pool:
        return dict(zip(rels, pool.map(lambda rel: file_sha256(root / rel), rels)))


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
    run_info: dict[str, Any] | None = None,
    loss_scaler: Any = None,
) -> Path:
    """Collective: every rank calls it. Rank 0 writes the model (HF format) and the manifest, then renames.
    `run_info` (settings such as finetuning_type, dtype, world size) goes into the manifest for resume checks."""
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
                torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            if dims.is_main:
                torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
                (tmp / RNG_FILE).write_text(json.dumps(_rng_state()))
                if loss_scaler is not None:
                    (tmp / LOSS_SCALE_FILE).write_text(json.dumps(loss_scaler.state_dict()))
        dims.barrier()
        if dims.is_main:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = TrainerState(global_step=step, epoch=epoch, tokens_seen=tokens_seen, files=files,
                                    resumable=optimizer is not None, sha256=_digests(tmp, sorted(files)),
                                    run=dict(run_info or {}))
            with open(tmp / MANIFEST, "w") as fh:
                json.dump(asdict(manifest), fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            replace_dir(tmp, final)
        dims.barrier()
    except BaseException as exc:
        if dims.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        full = storage_error(exc, final)
        if full is not None:
            raise full from exc
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
    m = CHECKPOINT_RE.match(ckpt.name)
    if m and int(m.group(1)) != state.global_step:
        return None  # a copied or renamed folder: its name and its contents disagree on the step
    for rel, size in state.files.items():
        f = ckpt / rel
        if not f.is_file() or f.stat().st_size != size:
            return None
    return state


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (incomplete, changed after it was written, model only), or None.
    Reads every file once to compare its SHA-256 with the manifest; nothing is deserialised."""
    try:
        raw_state = TrainerState(**json.loads((ckpt / MANIFEST).read_text()))
    except (OSError, ValueError, TypeError):
        return f"missing or unreadable {MANIFEST} (half-written)"
    m = CHECKPOINT_RE.match(ckpt.name)
    if m and int(m.group(1)) != raw_state.global_step:
        return f"{MANIFEST} says step {raw_state.global_step}, the folder name says {m.group(1)}"
    for rel, size in raw_state.files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"'{rel}' is missing (half-written)"
        if f.stat().st_size != size:
            return f"'{rel}' is {f.stat().st_size} bytes, {MANIFEST} says {size} (half-written or changed)"
    unlisted = sorted(str(f.relative_to(ckpt)) for f in ckpt.rglob("*")
                      if f.is_file() and f.name != MANIFEST and str(f.relative_to(ckpt)) not in raw_state.files)
    if unlisted:
        return f"'{unlisted[0]}' is not listed in {MANIFEST} (added after the checkpoint was written)"
    if not raw_state.resumable:
        return "holds only the model (save_only_model: true)"
    if set(raw_state.sha256) != set(raw_state.files):
        return f"{MANIFEST} has no checksums (written by an older longtune); resume is refused"
    actual = _digests(ckpt, sorted(raw_state.files))
    changed = [rel for rel in sorted(raw_state.files) if actual[rel] != raw_state.sha256[rel]]
    if changed:
        return f"'{changed[0]}' changed after it was written (SHA-256 differs from {MANIFEST})"
    return None


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first."""
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            m = CHECKPOINT_RE.match(child.name)
            if m and child.is_dir() and read_state(child) is not None:
                found.append((int(m.group(1)), child))
    return sorted(found)


def rotate_checkpoints(output_dir: Path, keep: int | None, keep_also: Path | None = None) -> None:
    """Delete all but the newest `keep` complete checkpoints (and never `keep_also`, the one being resumed)."""
    if keep is None:
        return
    ckpts = [(s, p) for s, p in complete_checkpoints(output_dir) if keep_also is None or p.resolve() != keep_also.resolve()]
    budget = keep - (1 if keep_also is not None else 0)
    for _, path in ckpts[: max(0, len(ckpts) - max(budget, 0))]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(output_dir: Path, resume: str | bool | None, log: Callable[[str], None] = print) -> Path | None:
    """The verified checkpoint to resume from. `true`: the newest one that verifies (a corrupt or half-written
    newer one is skipped with a notice); a path: that checkpoint, refused with one line if it does not verify."""
    if resume is None or resume is False:
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        candidates = []
        if output_dir.is_dir():
            for child in output_dir.iterdir():
                m = CHECKPOINT_RE.match(child.name)
                if m and child.is_dir():
                    candidates.append((int(m.group(1)), child))
        refused = []
        for _, ckpt in sorted(candidates, reverse=True):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                if refused:
                    log(f"notice: resuming from {ckpt.name} instead ({'; '.join(refused)})")
                return ckpt
            refused.append(f"{ckpt.name} refused: {problem}")
        if refused:
            raise ConfigError(f"key 'resume_from_checkpoint': no checkpoint in '{output_dir}' verifies "
                              f"({'; '.join(refused)})")
        raise ConfigError(f"key 'resume_from_checkpoint': no complete checkpoint-N directory in '{output_dir}'")
    path = Path(str(resume))
    if not path.is_dir():
        raise ConfigError(f"key 'resume_from_checkpoint': '{resume}' is not a directory")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"key 'resume_from_checkpoint': '{resume}' is refused: {problem}; pick an earlier checkpoint")
    return path


def load_model_weights(root: RootForward, ckpt: Path) -> None:
    """Load the checkpoint's trained weights into the built (possibly sharded) model. Every rank reads them."""
    if is_peft_model(root.model):
        state = load_file(str(ckpt / TRAINABLE_FILE))
        expected = {n for n, p in root.model.named_parameters() if p.requires_grad}
    else:
        state = {}
        manifest = read_state(ckpt)
        listed = set(manifest.files) if manifest is not None else None
        for f in sorted(ckpt.glob("*.safetensors")):
            if f.name == TRAINABLE_FILE or (listed is not None and f.name not in listed):
                continue  # only the verified files of the checkpoint (TRAINABLE_FILE is the peft copy)
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


def _load_plain(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers: a pickle naming any other global is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(f"checkpoint file '{path}' holds objects other than tensors and plain values; refused "
                          "(loading it could run code)") from None


# What a DCP `.metadata` pickle may name: the dataclasses of torch.distributed.checkpoint and torch's dtype,
# layout, memory-format and Size values. Anything else (os.system, builtins.eval, ...) is refused.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


def _layout_from_name(name: str) -> torch.layout:
    """What torch pickles a layout as (torch.serialization._get_layout("torch.strided")), for plain layouts only."""
    layout = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(layout, torch.layout):
        raise pickle.UnpicklingError(f"'{name}' is not a torch layout")
    return layout


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            import dataclasses
            import enum
            import importlib

            obj = getattr(importlib.import_module(module), name, None)
            # Plain records only: constructing one sets fields, it cannot open files or run commands.
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout_from_name
        if module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            import pathlib

            return getattr(pathlib, name)  # the checkpoint_id DCP records
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def read_dcp_metadata(path: Path) -> Any:
    """A DCP `.metadata` file through the allow-list unpickler, or a one-line ConfigError."""
    try:
        with open(path, "rb") as fh:
            return _MetadataUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
        raise ConfigError(f"checkpoint file '{path}' is not plain DCP metadata ({exc}); refused "
                          "(loading it could run code)") from None


def load_sharded_state(path: Path, state: dict[str, Any], **load_options: Any) -> None:
    """`dcp.load` of `path` into `state` in place, never unpickling arbitrary globals; a refused file is a
    one-line ConfigError (DCP would wrap it in a CheckpointException of every rank's traceback)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    read_dcp_metadata(path / ".metadata")  # refuse before DCP starts its collective load plan
    reader, planner = _sharded_optimizer_reader(path)
    try:
        dcp.load(state, storage_reader=reader, planner=planner, **load_options)
    except CheckpointException as exc:
        for inner, _ in exc.failures.values():
            if isinstance(inner, ConfigError):
                raise ConfigError(str(inner)) from None
        raise


def _sharded_optimizer_reader(path: Path):
    """A DCP reader and planner that never unpickle arbitrary globals (metadata: allow-list; values:
    `weights_only`)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError:
                raise ConfigError(f"checkpoint '{path}': entry '{read_item.dest_index.fqn}' holds objects other "
                                  "than tensors and plain values; refused (loading it could run code)") from None
            # Only tensors and plain values got this far; re-serialised, they are what the default planner
            # places into the state dict (its own torch.load then sees nothing else).
            clean = io.BytesIO()
            torch.save(loaded, clean)
            clean.seek(0)
            super().load_bytes(read_item, clean)

    return SafeReader(str(path)), SafePlanner()


def load_training_state(ckpt: Path, root: RootForward, optimizer: torch.optim.Optimizer, scheduler: Any,
                        loss_scaler: Any = None) -> TrainerState:
    """Optimizer, scheduler, RNG (and float16 loss-scale) state of a checkpoint that `checkpoint_problem` has
    verified."""
    state = read_state(ckpt)
    assert state is not None
    writer_procs = state.run.get("world_size")
    if is_fsdp(root):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        if not (ckpt / OPTIMIZER_DCP_DIR).is_dir():
            raise ConfigError(f"checkpoint '{ckpt}' was written without FSDP"
                              f"{f' by {writer_procs} process(es)' if writer_procs else ''}; resume it with fsdp: "
                              "false and the same number of processes")
        holder = {"optim": get_optimizer_state_dict(root, optimizer)}
        load_sharded_state(ckpt / OPTIMIZER_DCP_DIR, holder)
        set_optimizer_state_dict(root, optimizer, holder["optim"])
    else:
        if not (ckpt / OPTIMIZER_FILE).is_file():
            procs = f"--nproc {writer_procs}" if writer_procs and writer_procs > 1 else "--nproc 2 (or more)"
            raise ConfigError(f"checkpoint '{ckpt}' holds sharded (FSDP) optimizer state"
                              f"{f' of {writer_procs} processes' if writer_procs else ''}; resume it with several "
                              f"processes ({procs}), where FSDP is on by default")
        optimizer.load_state_dict(_load_plain(ckpt / OPTIMIZER_FILE))
    scheduler.load_state_dict(_load_plain(ckpt / SCHEDULER_FILE))
    try:
        _set_rng_state(json.loads((ckpt / RNG_FILE).read_text()))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"checkpoint file '{ckpt / RNG_FILE}' is not a valid RNG state ({exc})") from None
    if loss_scaler is not None:
        try:
            loss_scaler.load_state_dict(json.loads((ckpt / LOSS_SCALE_FILE).read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"checkpoint file '{ckpt / LOSS_SCALE_FILE}' is not a valid loss-scale state ({exc}); "
                              "a float16 run resumes only from a float16 checkpoint") from None
    return state
