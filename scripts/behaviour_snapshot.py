"""Record (or compare against) the metrics of a fixed set of float64 training runs, so that a refactor can prove
that behaviour did not change: `python scripts/behaviour_snapshot.py record OUT.json` on the old code, then
`python scripts/behaviour_snapshot.py compare OUT.json` on the new code (relative difference <= 1e-12 on every
logged number of every step, and on every final weight).

Runs (builtin:tiny, float64, builtin data): sft full, sft LoRA, NEFTune + gradient accumulation, packed pt at
sp=2 zigzag_ring, dpo sigmoid, simpo at sp=2 ulysses, kto, rm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ["model_name_or_path=builtin:tiny", "dtype=float64", "template=chatml", "cutoff_len=128", "max_steps=3",
        "logging_steps=1", "save_steps=0", "disable_tqdm=true", "learning_rate=1e-3", "lr_scheduler_type=linear",
        "warmup_steps=1", "seed=3", "loss_chunk_size=32", "max_samples=16", "per_device_train_batch_size=2",
        "val_size=0", "plot_loss=false", "overwrite_output_dir=true"]
RUNS: dict[str, tuple[int, list[str]]] = {
    "sft_full": (1, ["stage=sft", "dataset=builtin:sft_demo", "finetuning_type=full"]),
    "sft_lora": (1, ["stage=sft", "dataset=builtin:sft_demo", "finetuning_type=lora", "lora_rank=4"]),
    "sft_neftune_ga": (1, ["stage=sft", "dataset=builtin:sft_demo", "finetuning_type=full",
                           "neftune_noise_alpha=5", "gradient_accumulation_steps=2"]),
    "pt_packed_sp2_ring": (2, ["stage=pt", "dataset=builtin:pt_demo", "finetuning_type=full", "packing=true",
                               "sequence_parallel_size=2", "sequence_parallel_mode=zigzag_ring"]),
    "dpo_sigmoid": (1, ["stage=dpo", "dataset=builtin:dpo_demo", "finetuning_type=full", "pref_beta=0.1"]),
    "simpo_sp2_ulysses": (2, ["stage=dpo", "dataset=builtin:dpo_demo", "finetuning_type=full", "pref_loss=simpo",
                              "pref_beta=2.0", "simpo_gamma=0.3", "sequence_parallel_size=2",
                              "sequence_parallel_mode=ulysses"]),
    "kto": (1, ["stage=kto", "dataset=builtin:kto_demo", "finetuning_type=full"]),
    "rm": (1, ["stage=rm", "dataset=builtin:dpo_demo", "finetuning_type=full"]),
}


def run_one(name: str, nproc: int, overrides: list[str], out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    launcher = ([sys.executable, "-m", "longtune", "train"] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                 "-m", "longtune", "train"])
    proc = subprocess.run([*launcher, *BASE, *overrides, f"output_dir={out}"], env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    numbers = [{k: v for k, v in r.items() if isinstance(v, (int, float)) and k not in
                ("tokens_per_s", "peak_mem_gib")} for r in rows]
    from safetensors.torch import load_file

    weights = {}
    for f in sorted((out / "final").glob("*.safetensors")):
        weights.update({k: v.double().flatten()[:64].tolist() for k, v in load_file(str(f)).items()})
    return {"metrics": numbers, "weights": weights}


def snapshot() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = {}
        for name, (nproc, overrides) in RUNS.items():
            result[name] = run_one(name, nproc, overrides, Path(tmp) / name)
            print(f"  {name}: {len(result[name]['metrics'])} metric rows", flush=True)
        return result


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300) if a != b else 0.0


def compare(old: dict, new: dict) -> list[str]:
    problems = []
    for name in old:
        o, n = old[name], new.get(name)
        if n is None:
            problems.append(f"{name}: missing")
            continue
        if len(o["metrics"]) != len(n["metrics"]):
            problems.append(f"{name}: {len(n['metrics'])} metric rows, expected {len(o['metrics'])}")
            continue
        for i, (ro, rn) in enumerate(zip(o["metrics"], n["metrics"])):
            for key, value in ro.items():
                if key not in rn or rel(rn[key], value) > 1e-12:
                    problems.append(f"{name} row {i} {key}: {rn.get(key)} vs {value}")
        worst = max((rel(a, b) for k in o["weights"] for a, b in zip(n["weights"].get(k, []), o["weights"][k])),
                    default=0.0)
        if o["weights"].keys() != n["weights"].keys() or worst > 1e-12:
            problems.append(f"{name}: final weights differ (max rel {worst:.2e})")
    return problems


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("record", "compare"):
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(sys.argv[2])
    if sys.argv[1] == "record":
        path.write_text(json.dumps(snapshot()))
        print(f"recorded {path}")
        return 0
    problems = compare(json.loads(path.read_text()), snapshot())
    for p in problems:
        print(p)
    print("behaviour unchanged" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
