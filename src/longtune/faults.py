"""Peer failures made legible: every rank records what it is doing in a small status file, so that when a
collective times out (`ddp_timeout`) or a peer's connection drops, the rank that notices can say which rank
failed and what that rank was doing, in one line, instead of a backend traceback.

The status files live in `output_dir/.longtune-ranks/` (the run directory is shared by all ranks already:
sharded checkpoints are written there by every rank). They are written at phase changes only (a few per step).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch

from longtune.errors import LongtuneError
from longtune.io import atomic_write_text

STATUS_DIR = ".longtune-ranks"

# What the collective backends say when a peer is gone or silent (gloo raises a plain RuntimeError).
_PEER_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out",
                  "Broken pipe", "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


class PeerError(LongtuneError):
    """A collective failed because another rank died, stopped, or failed first."""


def is_peer_failure(exc: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _PEER_MESSAGES)


class RankStatus:
    """This rank's status file; a no-op on one process."""

    def __init__(self, output_dir: str | None, rank: int, world_size: int, timeout_s: int):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.dir = Path(output_dir) / STATUS_DIR if output_dir and world_size > 1 else None
        self.current = "starting"
        self.started = time.time()
        self.record: dict[str, Any] = {}
        self.lock = threading.Lock()
        # A heartbeat tells a stopped (or dead) rank from one that waits in the same collective as we do.
        self.beat_s = max(0.5, min(10.0, timeout_s / 4))
        self.phase("starting")
        if self.dir is not None:
            threading.Thread(target=self._heartbeat, name="longtune-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while self.current not in ("finished",) and "failed" not in self.record:
            time.sleep(self.beat_s)
            with self.lock:
                self._write({**self.record, "alive": time.time()})

    def _write(self, record: dict[str, Any]) -> None:
        if self.dir is None:
            return
        try:
            atomic_write_text(self.dir / f"rank-{self.rank}.json", json.dumps(record))
        except OSError:
            pass  # a status file is a diagnosis aid; never let it fail the run

    def _set(self, **fields: Any) -> None:
        now = time.time()
        with self.lock:
            self.record = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(),
                           "phase": self.current, "time": now, "alive": now, **fields}
            self._write(self.record)

    def phase(self, what: str) -> None:
        self.current = what
        self._set()

    def failed(self, reason: str, *, because_of_peer: bool = False) -> None:
        """Record why this rank stops (`because_of_peer`: it only noticed another rank's failure)."""
        self._set(failed=reason, because_of_peer=because_of_peer)

    def finished(self) -> None:
        self.phase("finished")

    def peer_error(self, exc: BaseException) -> PeerError:
        """One line for a collective that failed on this rank: who is to blame, and what it was doing."""
        timed_out = "imed out" in str(exc) or "timeout" in str(exc).lower()
        what = f"timed out after ddp_timeout={self.timeout_s}s" if timed_out else "lost its connection to a peer"
        return PeerError(f"rank {self.rank} ({self.current}) {what}: {self._blame(timed_out)}")

    def _others(self) -> list[dict[str, Any]]:
        records = []
        for rank in range(self.world_size):
            if rank == self.rank or self.dir is None:
                continue
            try:
                record = json.loads((self.dir / f"rank-{rank}.json").read_text())
            except (OSError, ValueError):
                continue
            if record.get("time", 0) >= self.started - 600:  # older ones are from an earlier run
                records.append(record)
        return records

    def _blame(self, timed_out: bool) -> str:
        here = socket.gethostname()
        # A dropped connection can arrive while the dying peer is still being torn down: give it a moment.
        deadline = time.time() + (0.0 if timed_out else 3.0)
        while True:
            records = self._others()
            failed = [r for r in records if "failed" in r and not r.get("because_of_peer")]
            if failed:
                r = min(failed, key=lambda r: r["time"])
                return f"rank {r['rank']} failed first while {r['phase']}: {r['failed']}"
            dead = [r for r in records
                    if r.get("host") == here and r.get("phase") != "finished" and not _alive(r["pid"])]
            if dead:
                r = dead[0]
                return f"rank {r['rank']} (pid {r['pid']}) died while {r['phase']}"
            if time.time() >= deadline:
                break
            time.sleep(0.1)
        noticed = [r for r in records if r.get("because_of_peer")]
        if noticed:
            return f"as rank {noticed[0]['rank']} reported: {noticed[0]['failed']}"
        if not records:
            return "no other rank left a status; check the other ranks' logs"
        # The rank whose heartbeat is the oldest is the one the others wait for.
        r = min(records, key=lambda r: r.get("alive", r["time"]))
        where = f"rank {r['rank']} (pid {r['pid']} on {r['host']})"
        if timed_out:
            return (f"{where} stopped responding while {r['phase']} "
                    f"(last sign of life {time.time() - r.get('alive', r['time']):.0f}s ago)")
        return f"{where} closed its connection while {r['phase']} (on another node, or exiting)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its launcher) still answers signal 0.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True
