"""`make gpu-check`: longtune's CUDA paths checked on one machine with 1 to 8 GPUs in under 9 minutes, ending
with one summary table (and gpu_check.json). `--cpu` runs the parts a CPU can run (gloo, tiny sizes); CI runs it.

Parts, each under its own time limit inside one global budget (a part that runs out of time is reported, never
waited for):
  env       torch / CUDA / NCCL versions and the GPUs
  tests     `pytest -m cuda` (every CUDA branch: kernels, bf16 parity, zero-label ranks, offload + clipping,
            autocast dtype); with --cpu the meta-tensor checks of the CUDA kernel calls instead
  parity    bf16 training under FSDP2 through `longtune train`: sp=G vs sp=1 on packed pretraining rows for each
            SP mode, long-prompt/short-answer SFT whose loss tokens all sit on one SP rank, DPO step 1 == ln 2
            and KTO step 1 == 0.5, CPU offload at world size 1 vs no offload
  bench     `longtune bench --search` (sft, dpo), length capped so that it fits the budget
  estimate  `longtune estimate`'s predicted peak vs the bench's measured peak at the same length

Exit status: 0 when no check FAILs, 1 when one does, 2 when it cannot start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GATING = ("FAIL",)  # statuses that make the exit status 1; WARN/SKIP/INFO do not
BF16_LOSS_RTOL = 2e-3  # bf16 runs of the same step on different layouts agree to about this
BF16_NORM_RTOL = 2e-2
CLOSED_FORM_ATOL = 1e-3  # DPO step 1 == ln 2 and KTO step 1 == 0.5 in bf16


@dataclass
class Check:
    part: str
    name: str
    status: str  # PASS | FAIL | WARN | SKIP | INFO
    detail: str = ""
    data: dict = field(default_factory=dict)


class Budget:
    """One global deadline; each part asks for its nominal seconds and gets what is left (minus a reserve for
    the summary)."""

    def __init__(self, seconds: float, reserve: float = 15.0):
        self.end = time.monotonic() + seconds
        self.reserve = reserve

    def cap(self, want: float) -> float:
        return max(0.0, min(want, self.end - time.monotonic() - self.reserve))


def run_capped(cmd: list[str], seconds: float, log_path: Path, env: dict | None = None) -> tuple[int, str]:
    """Run cmd in its own process group with a hard limit; (exit status, output). 124 means it timed out,
    125 that no time was left to start it. The whole group is killed on timeout (torchrun's workers too)."""
    if seconds < 5:
        log_path.write_text("skipped: no time left in the budget\n")
        return 125, "skipped: no time left in the budget"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=8)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = 124
    return rc, log_path.read_text(errors="replace")


def last_line(text: str, n: int = 220) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    for line in reversed(lines):  # the error line of a traceback, if any
        if "Error" in line or "error:" in line:
            return line[:n]
    return (lines[-1] if lines else "")[:n]


@dataclass
class Context:
    out: Path
    work: Path
    budget: Budget
    cpu: bool
    gpus: int
    python: str = sys.executable

    @property
    def env(self) -> dict:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        if self.cpu:
            env["OMP_NUM_THREADS"] = "1"
        return env


# ------------------------------------------------------------------------------------------------- env
def part_env(ctx: Context) -> list[Check]:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": ctx.gpus, "python": sys.version.split()[0]}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if ctx.gpus:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(ctx.gpus)]
        info["memory_gib"] = [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
                              for i in range(ctx.gpus)]
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
    detail = (f"torch {info['torch']} (CUDA {info['cuda']}), transformers {info['transformers']}, "
              + (f"{ctx.gpus} x {info['devices'][0]} ({info['memory_gib'][0]} GiB)" if ctx.gpus else "CPU only (--cpu)"))
    return [Check("env", "environment", "INFO", detail, info)]


# ----------------------------------------------------------------------------------------------- tests
def junit_counts(xml_path: Path) -> dict:
    """Per-case outcome of a pytest junit file: passed/failed/skipped lists of test ids."""
    result = {"passed": [], "failed": [], "skipped": []}
    if not xml_path.exists():
        return result
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            result["failed"].append(name)
        elif case.find("skipped") is not None:
            result["skipped"].append(name)
        else:
            result["passed"].append(name)
    return result


def part_tests(ctx: Context) -> list[Check]:
    xml = ctx.work / "tests.xml"
    if ctx.cpu:  # the CUDA kernel calls on meta tensors: their aten schemas and shapes, without a GPU
        select, name = ["-m", "not slow", "-k", "meta", "tests/test_attention_kernels.py"], "CUDA calls on meta tensors"
    else:
        select, name = ["-m", "cuda", "tests"], "pytest -m cuda"
    cmd = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={xml}", *select]
    rc, text = run_capped(cmd, ctx.budget.cap(200), ctx.work / "tests.log", ctx.env)
    counts = junit_counts(xml)
    n_pass, n_fail, n_skip = (len(counts[k]) for k in ("passed", "failed", "skipped"))
    if rc in (124, 125):
        status, detail = "FAIL", f"timed out after {n_pass} passed" if rc == 124 else "not run: no time left"
    elif n_fail or rc not in (0, 5):
        status = "FAIL"
        detail = f"{n_fail} failed: {', '.join(x.split('::')[-1] for x in counts['failed'][:4])}" if n_fail else last_line(text)
    elif n_pass == 0:
        status, detail = "SKIP", f"no test ran ({n_skip} skipped)"
    else:
        status, detail = "PASS", f"{n_pass} passed, {n_skip} skipped"
    return [Check("tests", name, status, detail, counts)]


# ---------------------------------------------------------------------------------------------- parity
@dataclass(frozen=True)
class Run:
    name: str
    nproc: int
    overrides: tuple[str, ...]


def _pt_rows(path: Path, rows: int, long_tokens: int) -> None:
    """Pretraining text: long documents and tiny ones, so packed rows mix long and short documents."""
    import random

    rng = random.Random(5)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    with open(path, "w") as fh:
        for i in range(rows):
            n = long_tokens if i % 3 == 0 else rng.randint(3, 40)
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n")


def parity_runs(ctx: Context, g: int) -> tuple[list[Run], list[tuple[str, str, str]], list[tuple[str, str, float]]]:
    """The training runs, the (reference, candidate, what) pairs that must agree, and the (run, stage,
    closed-form step-1 loss) checks."""
    pt_file = ctx.work / "pt_long.jsonl"
    _pt_rows(pt_file, 48, 300 if ctx.cpu else 1500)
    size = ["cutoff_len=256", "max_steps=2"] if ctx.cpu else ["cutoff_len=2048", "max_steps=3"]
    base = ["model_name_or_path=builtin:tiny", *size, "bf16=true", "finetuning_type=full", "learning_rate=1.0e-4",
            "lr_scheduler_type=constant", "logging_steps=1", "save_steps=0", "save_only_model=true",
            "disable_tqdm=true", "gradient_checkpointing=true", "loss_chunk_size=256", "seed=3",
            "overwrite_output_dir=true", "val_size=0", "plot_loss=false", "ddp_timeout=90"]
    pt = [*base, "stage=pt", f"dataset={pt_file}", "packing=true", "max_samples=48"]
    # One kv_retrieval document per row: its few answer tokens all land on SP rank 0 (the other ranks have none).
    sft = [*base, "stage=sft", "dataset=builtin:kv_retrieval", "template=chatml", "packing=false", "max_samples=8",
           "per_device_train_batch_size=1"]
    pref = [*base, "template=chatml", "max_samples=8", "per_device_train_batch_size=2", "pref_beta=0.1"]
    dpo = [*pref, "stage=dpo", "dataset=builtin:dpo_demo"]
    kto = [*pref, "stage=kto", "dataset=builtin:kto_demo"]
    runs, pairs, closed = [], [], []
    if g >= 2:
        runs.append(Run("pt_ref", g, (*pt, "sequence_parallel_size=1", "per_device_train_batch_size=1",
                                      "attention_kernel=math")))
        for mode in ("zigzag_ring", "auto", "llama3") if not ctx.cpu else ("zigzag_ring",):
            name = f"pt_sp{g}_{mode}"
            runs.append(Run(name, g, (*pt, f"sequence_parallel_size={g}", f"per_device_train_batch_size={g}",
                                      f"sequence_parallel_mode={mode}")))
            pairs.append(("pt_ref", name, f"packed pt, sp={g} {mode} vs sp=1"))
        runs.append(Run("sft_ref", 1, (*sft, "fsdp=true", "attention_kernel=math")))
        runs.append(Run(f"sft_sp{g}", g, (*sft, f"sequence_parallel_size={g}", "sequence_parallel_mode=zigzag_ring")))
        pairs.append(("sft_ref", f"sft_sp{g}", f"long prompt + short answer, sp={g} (ranks without labels)"))
        runs.append(Run("dpo_sp2", 2, (*dpo, "sequence_parallel_size=2")))
        runs.append(Run("kto_sp2", 2, (*kto, "sequence_parallel_size=2")))
        closed += [("dpo_sp2", "dpo", math.log(2)), ("kto_sp2", "kto", 0.5)]
    else:
        runs.append(Run("pt_ref", 1, (*pt, "fsdp=true", "per_device_train_batch_size=2", "attention_kernel=math")))
        runs.append(Run("pt_fused", 1, (*pt, "fsdp=true", "per_device_train_batch_size=2")))
        runs.append(Run("pt_autocast", 1, (*pt, "fsdp=false", "per_device_train_batch_size=2")))
        pairs += [("pt_ref", "pt_fused", "fused kernels vs math (FSDP2, 1 rank)"),
                  ("pt_ref", "pt_autocast", "autocast over fp32 masters vs FSDP2")]
        runs.append(Run("dpo_1", 1, (*dpo, "fsdp=true")))
        runs.append(Run("kto_1", 1, (*kto, "fsdp=true")))
        closed += [("dpo_1", "dpo", math.log(2)), ("kto_1", "kto", 0.5)]
    runs.append(Run("offload_1", 1, (*pt, "offload_params=true", "per_device_train_batch_size=2",
                                     "attention_kernel=math")))
    runs.append(Run("nooffload_1", 1, (*pt, "fsdp=true", "per_device_train_batch_size=2", "attention_kernel=math")))
    pairs.append(("nooffload_1", "offload_1", "offload_params at world size 1 vs FSDP2 without offload"))
    return runs, pairs, closed


def metric_series(run_dir: Path) -> dict[str, list[float]]:
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    rows = [r for r in rows if "loss" in r]
    return {"loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows]}


def _max_rel(got: list[float], ref: list[float]) -> float | None:
    if not got or len(got) != len(ref):
        return None
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, ref))


def part_parity(ctx: Context, quick: bool = False) -> list[Check]:
    g = 2 if ctx.cpu else (4 if ctx.gpus >= 4 else 2 if ctx.gpus >= 2 else 1)
    runs, pairs, closed = parity_runs(ctx, g)
    if quick:  # CI: one SP comparison, one zero-label comparison, the DPO closed form
        keep = {"pt_ref", f"pt_sp{g}_zigzag_ring", "dpo_sp2"}
        runs = [r for r in runs if r.name in keep]
        pairs = [p for p in pairs if p[0] in keep and p[1] in keep]
        closed = [c for c in closed if c[0] in keep]
    results: dict[str, dict] = {}
    for run in runs:
        run_dir = ctx.work / "runs" / run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        launcher = ([ctx.python, "-m", "longtune", "train"] if run.nproc == 1 else
                    [ctx.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run.nproc}",
                     "-m", "longtune", "train"])
        started = time.monotonic()
        rc, text = run_capped([*launcher, *run.overrides, f"output_dir={run_dir / 'out'}"],
                              ctx.budget.cap(90 if ctx.cpu else 60), run_dir / "log.txt", ctx.env)
        results[run.name] = {"rc": rc, "seconds": round(time.monotonic() - started, 1),
                             "error": last_line(text) if rc else "", **metric_series(run_dir / "out")}
        print(f"  run {run.name} (nproc {run.nproc}): exit {rc} after {results[run.name]['seconds']}s", flush=True)
    checks = []

    def failed(name: str) -> str | None:
        r = results[name]
        if r["rc"] == 124:
            return f"{name} timed out"
        if r["rc"] == 125:
            return f"{name} not run (no time left)"
        if r["rc"]:
            return f"{name} exit {r['rc']}: {r['error']}"
        if not r["loss"]:
            return f"{name} logged no loss"
        return None

    for ref, cand, what in pairs:
        problem = failed(ref) or failed(cand)
        if problem:
            status = "SKIP" if "not run" in problem else "FAIL"
            checks.append(Check("parity", cand, status, problem, {"ref": results[ref], "run": results[cand]}))
            continue
        d_loss = _max_rel(results[cand]["loss"], results[ref]["loss"])
        d_norm = _max_rel(results[cand]["grad_norm"], results[ref]["grad_norm"])
        ok = d_loss is not None and d_loss <= BF16_LOSS_RTOL and d_norm is not None and d_norm <= BF16_NORM_RTOL
        checks.append(Check("parity", cand, "PASS" if ok else "FAIL",
                            f"{what}: loss rel {d_loss:.1e}, grad norm rel {d_norm:.1e}" if d_loss is not None
                            else f"{what}: step counts differ", {"ref": results[ref], "run": results[cand]}))
    for name, stage, value in closed:
        problem = failed(name)
        if problem:
            checks.append(Check("parity", name, "SKIP" if "not run" in problem else "FAIL", problem, results[name]))
            continue
        got = results[name]["loss"][0]
        checks.append(Check("parity", name, "PASS" if abs(got - value) <= CLOSED_FORM_ATOL else "FAIL",
                            f"bf16 FSDP {stage} step 1: {got:.5f} vs {value:.5f} (closed form)", results[name]))
    return checks


# ----------------------------------------------------------------------------------------------- bench
def part_bench(ctx: Context) -> tuple[list[Check], dict[str, Path]]:
    model = "tiny" if ctx.cpu else os.environ.get("GPU_CHECK_BENCH_MODEL", "qwen2.5-0.5b")
    cap = int(os.environ.get("GPU_CHECK_BENCH_MAX", 4096 if ctx.cpu else 65536 if ctx.gpus >= 2 else 32768))
    stages = ("sft",) if ctx.cpu else ("sft", "dpo")
    checks, files = [], {}
    procs = []
    for i, stage in enumerate(stages):
        path = ctx.work / f"bench_{stage}.json"
        files[stage] = path
        cmd = [ctx.python, "-m", "longtune", "bench", "--model", model, "--stage", stage, "--steps", "2",
               "--json", str(path)]
        cmd += (["--lengths", str(cap), "--tensor-memory"] if ctx.cpu else ["--search", "--max-length", str(cap), "--resolution", "4096"])
        env = ctx.env
        if ctx.gpus >= 2:  # one stage per GPU, side by side
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        procs.append((stage, cmd, env))
    seconds = ctx.budget.cap(150)
    if ctx.gpus >= 2 and len(procs) > 1:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(len(procs)) as pool:
            outcomes = list(pool.map(lambda p: run_capped(p[1], seconds, ctx.work / f"bench_{p[0]}.log", p[2]), procs))
    else:
        outcomes = [run_capped(cmd, ctx.budget.cap(seconds / len(procs)), ctx.work / f"bench_{stage}.log", env)
                    for stage, cmd, env in procs]
    for (stage, _, _), (rc, text) in zip(procs, outcomes):
        report = json.loads(files[stage].read_text()) if files[stage].exists() else {}
        ok_rows = [r for r in report.get("rows", []) if r.get("status") == "ok" and r.get("impl") == "ours"]
        if not ok_rows:
            checks.append(Check("bench", f"bench {stage}", "FAIL" if rc not in (124, 125) else "WARN",
                                f"exit {rc}: {last_line(text)}" if rc else "no successful row", report))
            continue
        best = max(ok_rows, key=lambda r: r["length"])
        capped = " (= cap, a lower bound)" if best["length"] >= cap else ""
        mfu = f", MFU {best['mfu']:.1%}" if best.get("mfu") is not None else ""
        timed_out = " (search stopped by the time limit)" if rc == 124 else ""
        checks.append(Check("bench", f"bench {stage}", "PASS",
                            f"{model}: {best['length']} tokens{capped}{timed_out}, {best['tokens_per_s']:.0f} tok/s, "
                            f"peak {best['peak_mem_mib']:.0f} MiB{mfu}", report))
    return checks, files


# -------------------------------------------------------------------------------------------- estimate
def part_estimate(ctx: Context, bench_files: dict[str, Path]) -> list[Check]:
    """The estimate of the bench's own setup (batch 1, checkpointing, bf16 autocast over fp32 masters on GPU,
    float32 on CPU, no FSDP) at the longest measured length, vs the measured peak."""
    sys.path.insert(0, str(REPO / "src"))
    from longtune.bench import qwen2_config
    from longtune.estimate import ModelShape, TrainSetup, estimate_memory

    checks = []
    for stage, path in bench_files.items():
        report = json.loads(path.read_text()) if path.exists() else {}
        rows = [r for r in report.get("rows", []) if r.get("status") == "ok" and r.get("impl") == "ours"]
        if not rows:
            checks.append(Check("estimate", f"estimate {stage}", "SKIP", "no bench row to compare with"))
            continue
        row = max(rows, key=lambda r: r["length"])
        shape = ModelShape.from_hf_config(qwen2_config(row["model"], row["length"]))
        setup = TrainSetup(tokens=row["length"], dtype="bfloat16" if ctx.gpus else "float32",
                           gradient_checkpointing=True, loss_chunk_size=row.get("loss_chunk_size") or 1024,
                           sp_attention=stage == "dpo")
        predicted = estimate_memory(shape, setup).total
        measured = row["peak_tensor_mib"] if row.get("peak_tensor_mib") else row["peak_mem_mib"]
        error = (predicted / 2**20 - measured) / measured
        # GPU: torch.cuda.max_memory_allocated; CPU: the peak of live tensor bytes (bench --tensor-memory).
        status = "PASS" if abs(error) <= 0.15 else "WARN"
        checks.append(Check("estimate", f"estimate {stage}", status,
                            f"T={row['length']}: measured {measured:.0f} MiB "
                            f"({'live tensors' if row.get('peak_tensor_mib') else row.get('peak_mem_kind')}), "
                            f"estimate {predicted / 2**20:.0f} MiB ({error:+.1%})",
                            {"measured_mib": measured, "estimate_mib": predicted / 2**20, "error": error}))
    return checks


# ---------------------------------------------------------------------------------------------- summary
def summary_table(checks: list[Check]) -> str:
    lines = ["| part | check | status | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {c.part} | {c.name} | {c.status} | {c.detail} |" for c in checks]
    return "\n".join(lines)


PARTS = ("env", "tests", "parity", "bench", "estimate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", 530)),
                        help="seconds for the whole check (default 530)")
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT"), help="folder for gpu_check.json and logs")
    parser.add_argument("--cpu", action="store_true", help="run the CPU-runnable parts at tiny sizes (CI)")
    parser.add_argument("--quick", action="store_true", help="parity: only one SP, one zero-label and the DPO run")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"gpu_check: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0 and not args.cpu:
        print("gpu_check: torch sees no CUDA device (a CUDA build of torch and a GPU are needed; --cpu runs the "
              "CPU-runnable parts)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="longtune_gpu_check."))
    out = Path(args.out) if args.out else work / "out"
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, work=work, budget=Budget(args.budget), cpu=args.cpu, gpus=0 if args.cpu else gpus)
    started = time.monotonic()
    checks: list[Check] = []
    bench_files: dict[str, Path] = {}
    for part in parts:
        print(f"[{time.monotonic() - started:5.0f}s] {part}", flush=True)
        try:
            if part == "env":
                new = part_env(ctx)
            elif part == "tests":
                new = part_tests(ctx)
            elif part == "parity":
                new = part_parity(ctx, quick=args.quick)
            elif part == "bench":
                new, bench_files = part_bench(ctx)
            else:
                new = part_estimate(ctx, bench_files)
        except Exception as exc:  # noqa: BLE001 - a broken part is a FAIL line, the others still run
            new = [Check(part, part, "FAIL", f"{type(exc).__name__}: {exc}".splitlines()[0][:220])]
        for c in new:
            print(f"  {c.status:4} {c.name}: {c.detail}", flush=True)
        checks.extend(new)
    wall = time.monotonic() - started
    failed = [c for c in checks if c.status in GATING]
    table = summary_table(checks)
    verdict = (f"gpu_check: {'FAIL' if failed else 'PASS'} ({len(failed)} failing of {len(checks)} checks) in "
               f"{wall:.0f}s of a {args.budget:.0f}s budget")
    (out / "gpu_check.json").write_text(json.dumps({"verdict": verdict, "wall_s": wall, "cpu": args.cpu,
                                                    "checks": [asdict(c) for c in checks]}, indent=1, default=str))
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for log in work.rglob("*.log") if work != out else []:
        shutil.copy(log, logs / "__".join(log.relative_to(work).parts))
    for log in (work / "runs").glob("*/log.txt") if (work / "runs").exists() else []:
        shutil.copy(log, logs / f"run_{log.parent.name}.txt")
    print("\n" + table + "\n\n" + verdict + f"\nresults: {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
