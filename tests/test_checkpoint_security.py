"""Resuming must never run code from a checkpoint (issue 12): a malicious pickle in any checkpoint file, single or
sharded (DCP), runs nothing and is refused with one line, even when the attacker also rewrote the manifest's
checksums; without that, the SHA-256 check refuses the changed file first."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from longtune.cli import main
from longtune.errors import ConfigError
from tests.conftest import base_overrides


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run_with_checkpoint(tmp_path_factory, alpaca_file) -> Path:
    out = tmp_path_factory.mktemp("secure") / "o"
    assert main(["train", *base_overrides(alpaca_file, out, max_steps=2, save_steps=2)]) == 0
    return out


def _reseal(ckpt: Path) -> None:
    """Rewrite the manifest's sizes and checksums to match the files (an attacker with write access can)."""
    manifest = ckpt / "trainer_state.json"
    state = json.loads(manifest.read_text())
    for rel in state["files"]:
        data = (ckpt / rel).read_bytes()
        state["files"][rel] = len(data)
        state["sha256"][rel] = hashlib.sha256(data).hexdigest()
    manifest.write_text(json.dumps(state))


@pytest.mark.parametrize("victim", ["optimizer.pt", "scheduler.pt", "rng_state.json"])
@pytest.mark.parametrize("resealed", [False, True], ids=["checksum", "resealed"])
def test_malicious_checkpoint_file_runs_nothing(run_with_checkpoint, tmp_path, alpaca_file, capsys, victim, resealed):
    out = tmp_path / "o"
    shutil.copytree(run_with_checkpoint, out)
    ckpt = out / "checkpoint-2"
    marker = tmp_path / "pwned"
    if victim.endswith(".pt"):
        torch.save({"state": _Payload(marker)}, ckpt / victim)  # torch.save pickles the payload as is
    else:
        (ckpt / victim).write_bytes(pickle.dumps(_Payload(marker)))
    if resealed:
        _reseal(ckpt)
    rc = main(["train", *base_overrides(alpaca_file, out, max_steps=2, resume_from_checkpoint=str(ckpt))])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert not marker.exists()
    assert rc == 2 and len(err) == 1, err
    if not resealed:
        assert err[0].startswith(f"ConfigError: key 'resume_from_checkpoint': '{ckpt}' is refused: '{victim}' ")
        assert "changed" in err[0]
    elif victim.endswith(".pt"):
        assert err[0] == (f"ConfigError: checkpoint file '{ckpt / victim}' holds objects other than tensors and plain "
                          "values; refused (loading it could run code)")
    else:
        assert err[0].startswith(f"ConfigError: checkpoint file '{ckpt / victim}' is not a valid RNG state")


def _dcp_checkpoint(path: Path, state: dict) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(path), no_dist=True)


def _safe_load(path: Path, like: dict) -> dict:
    from longtune.checkpoint import load_sharded_state

    load_sharded_state(path, like, no_dist=True)
    return like


def test_sharded_checkpoint_metadata_and_values_run_nothing(tmp_path):
    """The DCP `.metadata` pickle and DCP's non-tensor values both go through restricted loaders."""
    good = {"optim": {"exp_avg": torch.arange(6.0), "step": 3, "betas": (0.9, 0.99), "name": "adamw"}}
    _dcp_checkpoint(tmp_path / "good", good)
    loaded = _safe_load(tmp_path / "good", {"optim": {"exp_avg": torch.zeros(6), "step": 0, "betas": (0.0, 0.0),
                                                      "name": ""}})
    assert torch.equal(loaded["optim"]["exp_avg"], good["optim"]["exp_avg"])
    assert loaded["optim"]["step"] == 3 and tuple(loaded["optim"]["betas"]) == (0.9, 0.99)

    marker = tmp_path / "pwned"
    meta = tmp_path / "bad_meta"
    shutil.copytree(tmp_path / "good", meta)
    (meta / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ConfigError, match=r"\.metadata' is not plain DCP metadata \(global 'posix\.system' is not "
                                          r"allowed\); refused \(loading it could run code\)$"):
        _safe_load(meta, {"optim": {"exp_avg": torch.zeros(6)}})

    values = tmp_path / "bad_values"
    _dcp_checkpoint(values, {"optim": {"exp_avg": torch.arange(6.0), "hook": _Payload(marker)}})
    with pytest.raises(ConfigError, match=r"entry 'optim\.hook' holds objects other than tensors"):
        _safe_load(values, {"optim": {"exp_avg": torch.zeros(6), "hook": None}})
    assert not marker.exists()


def test_file_added_to_a_checkpoint_is_refused(run_with_checkpoint, tmp_path, alpaca_file, capsys):
    """Weights are read only from files the manifest lists (and verifies): an added shard would change them."""
    from safetensors.torch import save_file

    out = tmp_path / "o"
    shutil.copytree(run_with_checkpoint, out)
    ckpt = out / "checkpoint-2"
    save_file({"model.embed_tokens.weight": torch.zeros(1)}, str(ckpt / "model-extra.safetensors"))
    assert main(["train", *base_overrides(alpaca_file, out, max_steps=2, resume_from_checkpoint=str(ckpt))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("is refused: 'model-extra.safetensors' is not listed in trainer_state.json (added after the "
                        "checkpoint was written); pick an earlier checkpoint"), err
