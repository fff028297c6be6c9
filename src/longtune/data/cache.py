"""On-disk cache of tokenized examples, keyed by a sha256 fingerprint of everything that shapes them.

One `.npz` per key: flat int32 token ids, a trained-token mask and example offsets, plus the stats as JSON. Written
to a temp file and renamed, so readers (other ranks, a later run) see a whole file or none; an unreadable file is a
miss, never an error.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from longtune.data.encode import IGNORE_INDEX
from longtune.io import atomic_open

CACHE_VERSION = 1  # bump when encoding, truncation or the file layout change what a key maps to
# Files up to this size are fingerprinted by content: file timestamps tick in jiffies on Linux, so a file rewritten
# within a few milliseconds with the same size can keep its mtime. Larger files use size + mtime_ns + inode.
CONTENT_HASH_LIMIT = 64 * 2**20


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: building millions of small token lists (which form no cycles) would
    otherwise trigger full collections that re-scan every list built so far (7x slower on 10M tokens)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def default_cache_dir() -> Path:
    """`$LONGTUNE_CACHE`, else ~/.cache/longtune/data."""
    env = os.environ.get("LONGTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "longtune" / "data"


def file_fingerprint(path: Path) -> dict[str, Any]:
    resolved = path.resolve()
    info = resolved.stat()
    out: dict[str, Any] = {"path": str(resolved), "size": info.st_size}
    if info.st_size <= CONTENT_HASH_LIMIT:
        digest = hashlib.sha256()
        with resolved.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out["sha256"] = digest.hexdigest()
    else:
        out.update(mtime_ns=info.st_mtime_ns, inode=info.st_ino)
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the Rust tokenizer (vocab, merges, normalizer, pre/post-processing), special tokens and template."""
    parts = {
        "class": type(tokenizer).__name__,
        "backend": tokenizer.backend_tokenizer.to_str(),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "add_bos_eos": [getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)],
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(inputs: dict[str, Any]) -> str:
    """sha256 over the JSON of `inputs` (dataset files, settings, tokenizer hash) and CACHE_VERSION."""
    payload = json.dumps({"cache_version": CACHE_VERSION, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_file(cache_dir: str | os.PathLike[str] | None, key: str) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"{key}.npz"


def save_cached(path: Path, examples: list, stats: dict[str, Any]) -> bool:
    """Write examples (objects with input_ids and labels, labels IGNORE or equal to the id) and stats atomically.

    A cache that cannot be written (read-only or full disk) warns and returns False: training does not need it.
    """
    total = sum(len(e.input_ids) for e in examples)
    ids = np.fromiter(itertools.chain.from_iterable(e.input_ids for e in examples), dtype=np.int64, count=total)
    labels = np.fromiter(itertools.chain.from_iterable(e.labels for e in examples), dtype=np.int64, count=total)
    trained = labels != IGNORE_INDEX
    if not np.array_equal(labels[trained], ids[trained]):
        raise ValueError("save_cached: a trained label differs from its input id; the cache stores labels as a mask")
    if total and (ids.min() < 0 or ids.max() >= 2**31):
        raise ValueError("save_cached: token ids must fit in int32")
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum([len(e.input_ids) for e in examples], out=offsets[1:])
    try:
        with atomic_open(path, "wb") as f:
            np.savez(
                f,
                input_ids=ids.astype(np.int32),
                trained=trained,
                offsets=offsets,
                stats=np.array(json.dumps({"cache_version": CACHE_VERSION, **stats})),
            )
    except OSError as exc:
        warnings.warn(f"data cache: could not write {path} ({exc}); continuing without it", stacklevel=2)
        return False
    return True


def load_cached(path: Path) -> tuple[list[tuple[list[int], list[int]]], dict[str, Any]] | None:
    """(input_ids, labels) pairs and the stats of a cache file, or None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, trained, offsets = data["input_ids"], data["trained"], data["offsets"]
            stats = json.loads(str(data["stats"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    consistent = (
        isinstance(stats, dict)
        and stats.pop("cache_version", None) == CACHE_VERSION
        and ids.ndim == trained.ndim == offsets.ndim == 1
        and len(ids) == len(trained)
        and len(offsets) >= 1
        and offsets[0] == 0
        and offsets[-1] == len(ids)
        and bool(np.all(np.diff(offsets) >= 0))
    )
    if not consistent:
        return None
    with gc_paused():
        flat_ids = ids.tolist()
        flat_labels = np.where(trained, ids, IGNORE_INDEX).tolist()
        pairs = [(flat_ids[a:b], flat_labels[a:b]) for a, b in itertools.pairwise(offsets.tolist())]
    return pairs, stats
