"""Fault injection on 2-process runs (issue 12): kill one rank, or both, at a random moment with SIGKILL; the
launcher's exit code and one line name the rank; resuming gives exactly the losses of an uninterrupted run.
A stopped rank makes the other time out after ddp_timeout with one line naming the stopped rank, exit code 3.

The ranks' pids come from their status files (output_dir/.longtune-ranks), as a user's debugging would."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import base_overrides
from tests.launch import metric_rows

STEPS, SAVE_EVERY = 8, 2


def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "longtune", "train", *args, "--nproc", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _overrides(data: Path, out: Path, **extra) -> list[str]:
    return base_overrides(data, out, max_steps=STEPS, save_steps=SAVE_EVERY, per_device_train_batch_size=2, **extra)


def _status(out: Path, rank: int) -> dict:
    return json.loads((out / ".longtune-ranks" / f"rank-{rank}.json").read_text())


def _wait_for(condition, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in metric_rows(out) if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, alpaca_file) -> list[float]:
    out = tmp_path_factory.mktemp("uninterrupted") / "o"
    rc, err = _finish(_start(_overrides(alpaca_file, out)))
    assert rc == 0, err[-3000:]
    return _losses(out)


def _kill_and_resume(alpaca_file: Path, out: Path, seed: int, victims: tuple[int, ...]) -> tuple[int, str]:
    """Kill `victims` at a random moment after the first checkpoint, then resume; returns the killed launch's
    exit code and stderr."""
    rng = random.Random(seed)
    proc = _start(_overrides(alpaca_file, out))
    _wait_for(lambda: (out / f"checkpoint-{SAVE_EVERY}").is_dir() and proc.poll() is None)
    time.sleep(rng.uniform(0.0, 2.0))
    pids = [_status(out, rank)["pid"] for rank in victims]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it finished (or torchrun took it down) first
    rc, err = _finish(proc)
    rc_resume, err_resume = _finish(_start(_overrides(alpaca_file, out, resume_from_checkpoint=True)))
    assert rc_resume == 0, err_resume[-3000:]
    return rc, err


def _check_killed_launch(rc: int, err: str, victims: tuple[int, ...]) -> None:
    if rc == 0:
        return  # the random moment fell after the run had finished
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    if rc == 3:  # a survivor noticed first: it names the dead rank
        assert len(lines) == 1 and lines[0].startswith("PeerError: rank "), err[-3000:]
        assert any(f"rank {v} (pid " in lines[0] and ") died while " in lines[0] for v in victims), lines[0]
    else:  # torchrun saw the death first
        assert rc == 128 + signal.SIGKILL, err[-3000:]
        assert any(f"error: rank {v} failed (signal SIGKILL)" in lines[-1] for v in victims), lines[-1]


def test_kill_one_rank_then_resume_exactly(reference, tmp_path, alpaca_file):
    out = tmp_path / "o"
    rc, err = _kill_and_resume(alpaca_file, out, seed=1, victims=(1,))
    _check_killed_launch(rc, err, (1,))
    assert _losses(out) == reference  # bit-exact in float64, FSDP's sharded optimizer state included


@pytest.mark.slow  # CI covers the same check with a manifest edited to say so (test_bad_input.py)
def test_sharded_checkpoint_resumed_on_one_process_says_how(tmp_path, alpaca_file, capsys):
    """A real 2-process (FSDP) checkpoint, resumed by a single process: one line with the launch that fits."""
    from longtune.cli import main

    out = tmp_path / "o"
    rc, err = _finish(_start(base_overrides(alpaca_file, out, max_steps=2, save_steps=2)))
    assert rc == 0, err[-3000:]
    assert main(["train", *base_overrides(alpaca_file, out, max_steps=2, resume_from_checkpoint=True)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["ConfigError: key 'resume_from_checkpoint': checkpoint-2 was written with FSDP by 2 process(es), "
                     "this launch has 1 without FSDP; resume with --nproc 2 (FSDP is on by default with several "
                     "processes)"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("victims", [(0,), (1,), (0, 1)], ids=["rank0", "rank1", "both"])
def test_kill_at_random_moments_then_resume_exactly(reference, tmp_path, alpaca_file, seed, victims):
    out = tmp_path / "o"
    rc, err = _kill_and_resume(alpaca_file, out, seed=100 * len(victims) + seed, victims=victims)
    _check_killed_launch(rc, err, victims)
    assert _losses(out) == reference


def test_stopped_rank_is_named_after_ddp_timeout(tmp_path, alpaca_file):
    out = tmp_path / "o"
    proc = _start(base_overrides(alpaca_file, out, max_steps=200, ddp_timeout=4))
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metric_rows(out)) >= 2)
    stopped = _status(out, 1)["pid"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        _wait_for(lambda: "failed" in _status(out, 0), timeout=120)
    finally:
        os.kill(stopped, signal.SIGKILL)  # torchrun's SIGTERM would wait for a SIGCONT
    rc, err = _finish(proc)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 3, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("PeerError: rank 0 (step "), lines[0]
    assert f"timed out after ddp_timeout=4s: rank 1 (pid {stopped} on " in lines[0], lines[0]
    assert "stopped responding while step " in lines[0], lines[0]
