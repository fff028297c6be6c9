"""`make gpu-check`'s CPU-runnable parts (scripts/gpu_check.py --cpu --quick) and its plumbing: the time limit
kills whole process groups, junit outcomes are read per case, a failing run gates the exit status."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)


def test_cpu_quick_check_passes_and_reports_real_numbers(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu", "--quick", "--budget",
                           "400", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "| part | check | status | detail |" in proc.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["CUDA calls on meta tensors"]["status"] == "PASS"
    sp = checks["pt_sp2_zigzag_ring"]
    assert sp["status"] == "PASS"
    ref_loss, sp_loss = sp["data"]["ref"]["loss"], sp["data"]["run"]["loss"]
    assert len(ref_loss) == len(sp_loss) == 2
    assert max(abs(a - b) / abs(b) for a, b in zip(sp_loss, ref_loss)) <= gpu_check.BF16_LOSS_RTOL
    dpo = checks["dpo_sp2"]
    assert dpo["status"] == "PASS" and abs(dpo["data"]["loss"][0] - math.log(2)) <= 1e-3
    est = checks["estimate sft"]
    assert est["status"] == "PASS" and abs(est["data"]["error"]) <= 0.15
    assert (out / "logs").is_dir()


def test_time_limit_kills_the_whole_process_group(tmp_path):
    started = time.monotonic()
    rc, _ = gpu_check.run_capped(["sh", "-c", "sleep 120 & sleep 120"], 5, tmp_path / "log")
    assert rc == 124 and time.monotonic() - started < 30
    alive = subprocess.run(["pgrep", "-f", "sleep 120"], capture_output=True, text=True)
    assert alive.stdout.strip() == ""


def test_no_time_left_is_not_run(tmp_path):
    rc, text = gpu_check.run_capped(["true"], 1, tmp_path / "log")
    assert rc == 125 and "no time left" in text


def test_junit_outcomes_per_case(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><failure message="x"/></testcase>'
        '<testcase classname="t" name="c"><skipped/></testcase>'
        '<testcase classname="t" name="d"><error message="y"/></testcase></testsuite></testsuites>')
    counts = gpu_check.junit_counts(xml)
    assert counts == {"passed": ["t::a"], "failed": ["t::b", "t::d"], "skipped": ["t::c"]}


def test_summary_gates_on_fail_only():
    checks = [gpu_check.Check("p", "a", "PASS", "ok"), gpu_check.Check("p", "b", "WARN", "slow")]
    assert not [c for c in checks if c.status in gpu_check.GATING]
    checks.append(gpu_check.Check("p", "c", "FAIL", "broken"))
    assert [c.name for c in checks if c.status in gpu_check.GATING] == ["c"]
    assert "| p | c | FAIL | broken |" in gpu_check.summary_table(checks)


def test_without_a_gpu_and_without_cpu_flag_it_cannot_start():
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--parts", "env"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
