"""ParallelDims.main_rank_first: the main rank finishes the block before any other rank enters it."""

from __future__ import annotations

import time
from pathlib import Path

from longtune.parallel.mesh import ParallelDims
from tests.distributed_utils import run_distributed


def _main_rank_first(rank: int, world_size: int, folder: str) -> bool:
    dims = ParallelDims(dp=world_size, sp=1, rank=rank)
    marker = Path(folder) / "cache-filled"
    with dims.main_rank_first():
        if dims.is_main:
            time.sleep(0.5)  # a slow tokenization: the others must still wait for it
            marker.write_text("done")
            return True
        saw_it = marker.exists()
    return saw_it


def test_main_rank_first_orders_the_ranks(tmp_path):
    assert run_distributed(_main_rank_first, 3, str(tmp_path)) == [True, True, True]
