"""Run a function on N gloo worker processes (CPU) and collect what each returns, for multi-rank tests."""

from __future__ import annotations

import datetime
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        result: Any = fn(rank, world_size, *args)
    except Exception:  # noqa: BLE001 - the parent reports it as the test failure
        result = {"__error__": traceback.format_exc()}
    finally:
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Spawn `world_size` gloo ranks running fn(rank, world_size, *args); return the results by rank.

    `fn` must be importable (module level). An exception on a rank is re-raised here with its traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size, join=True)
        results = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    for rank, result in enumerate(results):
        if isinstance(result, dict) and "__error__" in result:
            raise RuntimeError(f"rank {rank} failed:\n{result['__error__']}")
    return results
