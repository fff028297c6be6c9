"""`longtune bench` and `longtune estimate`: the bench runs and reports its fields; the memory estimate adds up,
scales with the SP degree, and predicts the live tensor bytes the bench measures within 15%."""

from __future__ import annotations

import argparse
import json

import pytest

from longtune.bench import BenchCase, add_bench_parser, qwen2_config, run_in_subprocess
from longtune.estimate import (
    USABLE_FRACTION,
    ModelShape,
    TrainSetup,
    add_estimate_parser,
    estimate_memory,
    parse_size,
    suggest_sp,
)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_bench_parser(sub)
    add_estimate_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


QWEN_0_5B = ModelShape.from_hf_config(qwen2_config("qwen2.5-0.5b", 4096))


def test_bench_tiny_writes_rows_with_fields(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert _run(["bench", "--model", "tiny", "--stage", "sft", "--lengths", "128,256", "--steps", "2",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"machine", "flop_convention", "rows", "comparisons"} <= set(report)
    assert [r["length"] for r in report["rows"]] == [128, 256]
    for row in report["rows"]:
        assert row["status"] == "ok", row
        for key in ("model", "stage", "impl", "peak_mem_mib", "peak_mem_kind", "tokens_per_s", "step_times_s",
                    "flops_per_step", "mfu", "host_peak_rss_mib"):
            assert key in row
        # The process's peak RSS holds at least the growth measured over the steps.
        assert row["host_peak_rss_mib"] >= row["peak_mem_mib"] > 0
        assert row["tokens_per_s"] > 0 and len(row["step_times_s"]) == 2
    assert "| tiny | sft | ours | 256 | ok |" in capsys.readouterr().out


def test_breakdown_sums_to_total():
    for setup in (TrainSetup(tokens=32768), TrainSetup(tokens=131072, sp=4, world_size=8, fsdp=True, dtype="bfloat16"),
                  TrainSetup(tokens=8192, loss_chunk_size=8192, trainable_params=10**6)):
        est = estimate_memory(QWEN_0_5B, setup)
        assert sum(est.at_peak.values()) == est.total
        assert est.total == max(est.moments.values()) == est.moments[est.peak_moment]
        assert all(est.at_peak[k] <= est.components[k] for k in est.components)


def test_doubling_sp_halves_activations_and_suggests_smallest_fitting_degree():
    setup = TrainSetup(tokens=262144, world_size=8, fsdp=True, dtype="bfloat16")
    best, table = suggest_sp(QWEN_0_5B, setup, parse_size("80GiB"))
    assert sorted(table) == [1, 2, 4, 8]
    for sp in (1, 2, 4):
        assert table[2 * sp].components["activations"] * 2 == table[sp].components["activations"]
        assert table[2 * sp].total < table[sp].total
    usable = USABLE_FRACTION * parse_size("80GiB")
    assert best is not None and table[best].total <= usable
    assert best == 1 or table[best // 2].total > usable


def test_parse_size():
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("40GB") == 40 * 10**9
    assert parse_size("512MiB") == 512 * 2**20


@pytest.mark.parametrize("length, chunk", [(2048, 4096), (2048, 256)])
def test_estimate_matches_measured_tensor_memory(length, chunk):
    """Loss-chunk-dominated and activation-dominated peaks of builtin:tiny's shape, CPU fp32, 2 steps."""
    row = run_in_subprocess(BenchCase("tiny", "sft", "ours", length, 2, chunk, tensor_memory=True))
    assert row["status"] == "ok", row
    shape = ModelShape.from_hf_config(qwen2_config("tiny", length))
    predicted = estimate_memory(shape, TrainSetup(tokens=length, loss_chunk_size=chunk)).total / 2**20
    measured = row["peak_tensor_mib"]
    assert abs(predicted - measured) / measured <= 0.15, (predicted, measured)


def test_estimate_cli_on_a_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: builtin:tiny\nfinetuning_type: full\ndataset: builtin:sft_demo\n"
                   f"output_dir: {tmp_path / 'run'}\ncutoff_len: 65536\nbf16: true\n")
    assert _run(["estimate", str(cfg), "loss_chunk_size=1024", "--gpus", "4", "--gpu-mem", "200MiB"]) == 0
    out = capsys.readouterr().out
    assert "| sequence_parallel_size | tokens per rank |" in out
    assert "suggestion: sequence_parallel_size: 4" in out  # sp=2 needs ~235 MiB, sp=4 ~123 MiB
    assert "T=65536" in out and "FSDP on" in out


@pytest.mark.slow
def test_cpu_512_16k_ours_vs_baseline_memory():
    """The issue's CPU acceptance: chunked loss skips the 16K x 32K fp32 logits (docs/benchmarks.md). With the
    default loss_chunk_size 4096 the ratio measured 0.36 (one 4096 x 32000 chunk in fp32, x3, is 1.5 GiB of our
    2.4 GiB); with 1024 it is 0.24."""
    ours = run_in_subprocess(BenchCase("cpu-512", "sft", "ours", 16384, 2, loss_chunk_size=1024))
    base = run_in_subprocess(BenchCase("cpu-512", "sft", "baseline", 16384, 2))
    assert ours["status"] == base["status"] == "ok", (ours, base)
    assert ours["peak_mem_mib"] / base["peak_mem_mib"] <= 0.35, (ours["peak_mem_mib"], base["peak_mem_mib"])


def test_bench_uses_the_trainer_default_loss_chunk():
    from longtune.bench import DEFAULT_LOSS_CHUNK
    from longtune.config import TrainConfig

    assert DEFAULT_LOSS_CHUNK == TrainConfig.__dataclass_fields__["loss_chunk_size"].default
