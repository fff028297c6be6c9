"""Data loss found in issue 12: export and overwrite_output_dir remove only what longtune wrote, metrics.jsonl is
never rewritten in place and a torn last line does not block resume, corrupt or mislabelled checkpoints are
refused (resume falls back to the newest verified one), half-written temp dirs are cleaned up, and
save_total_limit holds after a crash between a save and its rotation."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from longtune.cli import main
from longtune.config import build_config
from tests.conftest import base_overrides
from tests.launch import metric_rows


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in metric_rows(out) if "loss" in r]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, alpaca_file) -> Path:
    """Six steps, a checkpoint every two (checkpoint-2, -4, -6), float64: the reference for exact resumes."""
    out = tmp_path_factory.mktemp("full") / "o"
    assert main(["train", *base_overrides(alpaca_file, out, max_steps=6, save_steps=2)]) == 0
    return out


def _cut_run(full: Path, tmp: Path, keep_upto: int) -> Path:
    """The full run as a crash after checkpoint-`keep_upto` leaves it (later checkpoints and final/ gone)."""
    out = tmp / "o"
    shutil.copytree(full, out)
    shutil.rmtree(out / "final")
    for ckpt in out.glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > keep_upto:
            shutil.rmtree(ckpt)
    return out


# --- export ------------------------------------------------------------------------------------------------


def test_export_never_deletes_the_users_files(saved_models, tmp_path, monkeypatch, capsys):
    source = saved_models["qwen2"]
    user = tmp_path / "work"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    monkeypatch.chdir(user)
    for out, why in ((".", "is the current directory or one above it"),
                     (str(source.parent), "holds the source"),
                     (str(user), "is the current directory or one above it")):
        assert main(["export", str(source), out, "--overwrite"]) == 2
        assert why in capsys.readouterr().err
    own = tmp_path / "own"
    own.mkdir()
    (own / "thesis.tex").write_text("mine too")
    assert main(["export", str(source), str(own), "--overwrite"]) == 2
    assert "holds no earlier export" in capsys.readouterr().err
    assert (user / "notes.txt").read_text() == "mine" and (own / "thesis.tex").read_text() == "mine too"
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in saved_models["qwen2"].iterdir())

    # An earlier export is what --overwrite replaces (and only with --overwrite).
    exported = tmp_path / "exported"
    assert main(["export", str(source), str(exported)]) == 0
    assert main(["export", str(source), str(exported)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(source), str(exported), "--overwrite"]) == 0
    assert (exported / "config.json").is_file() and (exported / ".longtune-export").is_file()


# --- overwrite_output_dir ----------------------------------------------------------------------------------


def test_overwrite_removes_only_what_longtune_recorded(tmp_path, alpaca_file, capsys):
    out = tmp_path / "o"
    (out / "final").mkdir(parents=True)
    (out / "final" / "my_model.bin").write_text("user's")
    (out / "runs").mkdir()
    (out / "runs" / "my_events").write_text("user's")
    args = base_overrides(alpaca_file, out, max_steps=1, overwrite_output_dir=True)
    assert main(["train", *args]) == 2
    assert re.match(r"^ConfigError: key 'overwrite_output_dir': '.*(final|runs)' was not written by a longtune run",
                    capsys.readouterr().err)
    assert (out / "final" / "my_model.bin").read_text() == "user's"

    # In a folder of the user's, longtune writes its run beside the user's files; a rerun replaces only its own.
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "runs")
    (out / "notes.txt").write_text("user's")
    assert main(["train", *args]) == 0
    first_final = (out / "final" / "model.safetensors").stat().st_mtime_ns
    assert main(["train", *args]) == 0
    assert (out / "notes.txt").read_text() == "user's"
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns != first_final
    assert json.loads((out / ".longtune-run.json").read_text())["written"] == ["final", "metrics.jsonl",
                                                                              "train_config.yaml"]


# --- metrics.jsonl -----------------------------------------------------------------------------------------


def test_torn_metrics_line_resumes_exactly_and_the_file_is_replaced_not_rewritten(full_run, tmp_path, alpaca_file):
    out = _cut_run(full_run, tmp_path, keep_upto=4)
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as fh:
        fh.write('{"step": 7, "epoch": 0.3, "lo')  # the crash cut this write short
    inode = metrics.stat().st_ino
    assert main(["train", *base_overrides(alpaca_file, out, max_steps=6, save_steps=2,
                                          resume_from_checkpoint=True)]) == 0
    assert _losses(out) == _losses(full_run)  # bit-exact in float64
    assert metrics.stat().st_ino != inode  # a new file renamed over the old one, never truncated in place


def test_metrics_rewrite_drops_rows_after_the_checkpoint_and_keeps_the_rest(tmp_path):
    from longtune.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n" + '{"step": 6, "loss": 0.1')
    notices: list[str] = []
    log = MetricsLog(path, resume_step=3, tensorboard_dir=None, log=notices.append)
    assert log.rows == rows[:3]
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:3]
    assert notices == [f"notice: {path} line 7 is not a complete metrics row (cut by a crash?); dropped"]
    assert not list(tmp_path.glob(".*.tmp"))


# --- corrupt, mislabelled and half-written checkpoints -----------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only a checksum sees it
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt"])
def test_corrupt_checkpoint_is_refused_and_resume_falls_back(full_run, tmp_path, alpaca_file, capsys, victim):
    out = _cut_run(full_run, tmp_path, keep_upto=4)
    _flip_a_byte(out / "checkpoint-4" / victim)
    args = base_overrides(alpaca_file, out, max_steps=6, save_steps=2)
    assert main(["train", *args, f"resume_from_checkpoint={out / 'checkpoint-4'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ConfigError: key 'resume_from_checkpoint': '{out / 'checkpoint-4'}' is refused: '{victim}' "
                   "changed after it was written (SHA-256 differs from trainer_state.json); pick an earlier checkpoint")
    assert main(["train", *args, "resume_from_checkpoint=true"]) == 0
    printed = capsys.readouterr().out
    assert (f"notice: resuming from checkpoint-2 instead (checkpoint-4 refused: '{victim}' changed after it was "
            "written (SHA-256 differs from trainer_state.json))") in printed
    assert _losses(out) == _losses(full_run)


def test_mislabelled_checkpoint_and_temp_dirs(full_run, tmp_path, alpaca_file, capsys):
    """A copied checkpoint whose manifest names another step is refused; .tmp-checkpoint-* dirs are removed."""
    out = _cut_run(full_run, tmp_path, keep_upto=2)
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-4")
    (out / ".tmp-checkpoint-5-abc").mkdir()
    (out / ".tmp-checkpoint-5-abc" / "model.safetensors").write_bytes(b"half")
    assert main(["train", *base_overrides(alpaca_file, out, max_steps=6, save_steps=2,
                                          resume_from_checkpoint=True)]) == 0
    assert ("checkpoint-4 refused: trainer_state.json says step 2, the folder name says 4"
            in capsys.readouterr().out)
    assert _losses(out) == _losses(full_run)
    assert not list(out.glob(".tmp-*"))

    # overwrite_output_dir removes them too
    (out / ".tmp-checkpoint-9-xyz").mkdir()
    assert main(["train", *base_overrides(alpaca_file, out, max_steps=1, overwrite_output_dir=True)]) == 0
    assert not list(out.glob(".tmp-*"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


def _fake_checkpoint(out: Path, step: int) -> Path:
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "w.bin").write_bytes(b"x" * step)
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"global_step": step, "epoch": 0.0, "tokens_seen": 0, "files": {"w.bin": step}}))
    return ckpt


def test_save_total_limit_holds_after_a_crash_between_save_and_rotation(tmp_path):
    from longtune.run_dir import prepare_output_dir

    out = tmp_path / "o"
    ckpts = [_fake_checkpoint(out, s) for s in (1, 2, 3)]  # limit 2, but the crash came before the rotation
    cfg = build_config({"model_name_or_path": "builtin:tiny", "dataset": "builtin:sft_demo", "output_dir": str(out),
                        "save_total_limit": 2})
    prepare_output_dir(cfg, resume=ckpts[2])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    # resuming an older one keeps it, within the limit
    prepare_output_dir(cfg, resume=ckpts[1])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    _fake_checkpoint(out, 4)
    prepare_output_dir(cfg, resume=ckpts[1])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert os.path.isdir(ckpts[1])
