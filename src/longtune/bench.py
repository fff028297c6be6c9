"""`longtune bench`: longest trainable sequence, tokens/s, peak memory and MFU of our training path against a plain
Hugging Face baseline, on Qwen2-architecture models built from config (random weights, nothing downloaded).

Every (model, stage, implementation, length) runs in a fresh subprocess, so each peak memory figure is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from longtune.errors import ConfigError

# Qwen2-architecture shapes. The Qwen2.5 entries are the real published shapes; `cpu-512` is sized so that its
# 16K x 32K fp32 logits (2 GiB) dominate a CPU baseline; `tiny` is the builtin:tiny shape (for tests).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, tie_word_embeddings=False),
    "cpu-512": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, intermediate_size=1536, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False),
    "qwen2.5-72b": dict(vocab_size=152064, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=29568, tie_word_embeddings=False),
    # Llama-3.1-8B's published shape; the bench builds it as a Qwen2 model (which adds q/k/v biases, 0.01% more
    # parameters); `longtune estimate` counts it without the biases.
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False,
                         attention_bias=False),
}
STAGES = ("sft", "dpo")
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s, matched against
# torch.cuda.get_device_name() in this order (the first substring found wins, so variants come before their base
# name). A device not listed has no MFU unless --peak-tflops gives its peak: a guessed peak would be a made-up MFU.
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", None),  # AWS's A10G has no published dense bf16 figure; it must not match "A10" below
    ("A10", 125.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)
FLOP_CONVENTION = (
    "FLOPs per step = 6*N*T + 12*L*H*sum(t_i^2) (torchtitan/PaLM convention): N = parameters used in matmuls "
    "(all but the input embedding, unless tied), T = tokens, L layers, H hidden size, t_i document lengths; "
    "attention counted as full (not halved for causality), activation recompute not counted. "
    "MFU = FLOPs per step / step time / the device's dense bf16 peak (PEAK_BF16_TFLOPS by device name, or "
    "--peak-tflops); unknown device: no MFU."
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device by its name (torch.cuda.get_device_name()), or None if unknown."""
    upper = device_name.upper()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in upper:
            return None if tflops is None else tflops * 1e12
    return None


DEFAULT_LOSS_CHUNK = 1024  # TrainConfig.loss_chunk_size's default (checked by a test)
SEARCH_START = 4096


def qwen2_config(model: str, length: int):
    """The Qwen2Config of a bench model (rope is computed on the fly, so `length` may exceed the trained context)."""
    from transformers import Qwen2Config

    if model not in MODEL_SHAPES:
        raise ConfigError(f"bench: unknown --model '{model}'; known: {', '.join(MODEL_SHAPES)}")
    shape = {k: v for k, v in MODEL_SHAPES[model].items() if k != "attention_bias"}  # Qwen2 always has biases
    return Qwen2Config(**shape, max_position_embeddings=max(32768, length), rope_theta=1e6,
                       rms_norm_eps=1e-6, attention_dropout=0.0, use_cache=False, attn_implementation="sdpa")


def matmul_params(config) -> int:
    """Parameters that take part in matmuls: everything except an untied input embedding (a lookup)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    attn = h * h + 2 * h * kv + h * h + 2 * kv + h  # q, k, v (with biases), o
    mlp = 3 * h * i
    per_layer = attn + mlp + 2 * h  # + two RMSNorm weights
    return layers * per_layer + h + config.vocab_size * h  # + final norm + LM head


def flops_per_step(config, doc_lengths: list[int]) -> float:
    """Model FLOPs of one training step (forward + backward) on one row; see FLOP_CONVENTION."""
    tokens = sum(doc_lengths)
    attention = 12 * config.num_hidden_layers * config.hidden_size * sum(t * t for t in doc_lengths)
    return 6.0 * matmul_params(config) * tokens + attention


@dataclass(frozen=True)
class BenchCase:
    model: str
    stage: str
    impl: str  # "ours" | "baseline"
    length: int
    steps: int = 3
    loss_chunk_size: int = DEFAULT_LOSS_CHUNK
    tensor_memory: bool = False  # also track the peak of live tensor bytes (slower; for `estimate` validation)
    peak_tflops: float | None = None  # the device's peak for MFU; None: looked up by device name
    checkpoint_policy: str = "full"  # gradient_checkpointing_policy of the decoder layers (full | selective)


class LiveTensorBytes:
    """Peak bytes of live tensor storages, without any allocator support (works on CPU).

    A TorchDispatchMode sees the output of every aten op (backward and checkpoint recompute included); each new
    storage is counted once and uncounted when it is freed (a weakref finalizer on the storage object, which
    torch keeps alive exactly as long as the storage). Buffers an op allocates and frees internally are not seen.
    """

    def __init__(self):
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensor) -> None:
        storage = tensor.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or ptr in self.live:
            return
        self.live[ptr] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, ptr)

    def _free(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def mode(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for leaf in tree_leaves(out):
                    if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                        tracker.track(leaf)
                return out

        return _Mode()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _random_rows(case: BenchCase, vocab: int):
    """SFT: one row of `length` random tokens, all trained. DPO: one pair row, two documents of length/2."""
    import torch

    from longtune.stages import stage_class

    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(1, vocab, (case.length,), generator=g).tolist()
    from longtune.data import Example

    if stage_class(case.stage).docs_per_row == 1:
        return Example(input_ids=tokens, labels=list(tokens)), [case.length]
    half = case.length // 2
    return Example(input_ids=tokens[: 2 * half], labels=tokens[: 2 * half], doc_lengths=[half, half]), [half, half]


def _ours_step_fn(case: BenchCase, model, config, row, device):
    """Our path, as the trainer builds it: SequenceParallel.prepare, RootForward + stage loss with chunked head."""
    import torch

    from longtune.config import Config, DataConfig, ModelConfig, ParallelConfig, PreferenceConfig, TrainConfig
    from longtune.data.collate import collate
    from longtune.optim import build_optimizer
    from longtune.parallel.fsdp import ShardingPlan
    from longtune.parallel.mesh import ParallelDims
    from longtune.parallel.parallelize import ModelRecipe, parallelize
    from longtune.parallel.sequence import SequenceParallel
    from longtune.stages import build_stage

    quiet = lambda _: None  # noqa: E731
    cfg = Config(ModelConfig(), DataConfig(), TrainConfig(stage=case.stage), ParallelConfig(), PreferenceConfig())
    stage = build_stage(cfg)
    normaliser = stage.normaliser(row)
    dims = ParallelDims(dp=1, sp=1, rank=0, device=device)
    sequence = SequenceParallel(dims, cfg.parallel, config, packed=stage.docs_per_row > 1, log=quiet)
    # fp32 master weights, no FSDP; the caller enabled HF checkpointing for both implementations alike
    root = parallelize(model, ModelRecipe(torch.float32, ShardingPlan(enabled=False)), dims, sequence, quiet).root
    root.train()
    inputs = sequence.prepare(collate([row], pad_token_id=0), 0, device)
    if stage.uses_reference:  # reference log-probs precomputed (as with precompute_ref_log_probs): no model
        inputs.reference = torch.zeros(inputs.num_sequences, device=device)
    optimizer = build_optimizer(root, TrainConfig(learning_rate=1e-6))
    params = [p for p in root.parameters() if p.requires_grad]

    def step():
        out = root(stage.loss, inputs, case.loss_chunk_size)
        (out.loss_sum / normaliser).backward()
        return out.loss_sum

    return step, optimizer, params


def _baseline_step_fn(case: BenchCase, model, row, device):
    """A plain HF forward with full logits: `labels=` (HF loss) for SFT; TRL-style concatenated log-probs for DPO."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    params = list(model.parameters())
    if case.stage == "sft":
        ids = torch.tensor([row.input_ids], device=device)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss

        return step, optimizer, params
    half = row.doc_lengths[0]
    ids = torch.tensor([row.input_ids[:half], row.input_ids[half:]], device=device)  # chosen, rejected

    def step():
        logits = model(input_ids=ids).logits[:, :-1].float()
        logps = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)
        loss = -F.logsigmoid(0.1 * (logps[0] - logps[1]))  # reference log-probs precomputed as zeros
        loss.backward()
        return loss

    return step, optimizer, params


def run_case(case: BenchCase) -> dict[str, Any]:
    """Run `case.steps` optimizer steps in this process and measure them (call it in a fresh process)."""
    import torch
    from transformers import Qwen2ForCausalLM

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gpu = device.type == "cuda"
    config = qwen2_config(case.model, case.length)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)  # fp32: the master weights; bf16 compute on GPU comes from autocast
    from longtune.parallel.activation import checkpoint_context_fn

    checkpoint_kwargs: dict[str, Any] = {"use_reentrant": False}
    context_fn = checkpoint_context_fn(case.checkpoint_policy)  # type: ignore[arg-type]
    if context_fn is not None:
        checkpoint_kwargs["context_fn"] = context_fn
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    model.train()
    row, doc_lengths = _random_rows(case, config.vocab_size)
    if case.impl == "ours":
        step, optimizer, params = _ours_step_fn(case, model, config, row, device)
    else:
        step, optimizer, params = _baseline_step_fn(case, model, row, device)

    tracker = LiveTensorBytes() if case.tensor_memory else None
    if tracker is not None:
        for p in model.parameters():
            tracker.track(p)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_bytes()
    times, losses = [], []
    import contextlib

    with tracker.mode() if tracker is not None else contextlib.nullcontext():
        for _ in range(case.steps):
            started = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext():
                loss = step()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    if gpu:
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
        kind = "peak_rss_growth"
    timed = times[1:] or times
    tokens_per_s = case.length * len(timed) / sum(timed)
    flops = flops_per_step(config, doc_lengths)
    device_name = torch.cuda.get_device_name() if gpu else "cpu"
    peak_flops = case.peak_tflops * 1e12 if case.peak_tflops else (peak_bf16_flops(device_name) if gpu else None)
    return {
        **asdict(case),
        "status": "ok",
        "device": device_name,
        "dtype": "bf16 autocast, fp32 master weights" if gpu else "float32",
        "peak_mem_mib": round(peak / 2**20, 1),
        "peak_mem_kind": kind,
        "peak_tensor_mib": round(tracker.peak / 2**20, 1) if tracker is not None else None,
        # The process's peak resident host memory (model build included): on GPU, what the host must have.
        "host_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tokens_per_s": round(tokens_per_s, 2),
        "step_times_s": [round(t, 3) for t in times],
        "losses": losses,
        "flops_per_step": flops,
        "peak_flops": peak_flops,
        # MFU only on a GPU with a known peak (a CPU run is not in bf16 tensor-core terms at all).
        "mfu": round(flops / (sum(timed) / len(timed)) / peak_flops, 4) if gpu and peak_flops else None,
    }


def run_in_subprocess(case: BenchCase, timeout: float | None = None) -> dict[str, Any]:
    """`run_case` in a fresh Python process; an out-of-memory error or a killed process is status 'oom'; a run
    longer than `timeout` seconds is killed and is status 'timeout' (with the limit in `timeout_s`)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "longtune.bench", "--worker", json.dumps(asdict(case)), str(out)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**asdict(case), "status": "timeout", "timeout_s": timeout,
                    "error": f"killed after {timeout:g} s (--trial-timeout)"}
        if out.exists():
            return json.loads(out.read_text())
        killed = proc.returncode < 0 or proc.returncode == 137  # SIGKILL: the kernel's OOM killer, usually
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        return {**asdict(case), "status": "oom" if killed else "failed", "returncode": proc.returncode,
                "error": " | ".join(tail)}


def _worker(case_json: str, out_path: str) -> int:
    import torch

    case = BenchCase(**json.loads(case_json))
    try:
        result = run_case(case)
    except torch.OutOfMemoryError as exc:
        result = {**asdict(case), "status": "oom", "error": str(exc).splitlines()[0]}
    Path(out_path).write_text(json.dumps(result))
    return 0


def search_max_length(model: str, stage: str, impl: str, steps: int, max_length: int, resolution: int,
                      loss_chunk_size: int, log=print, trial_timeout: float | None = None,
                      peak_tflops: float | None = None) -> tuple[int | None, dict[str, Any] | None, list[dict]]:
    """Longest length (a multiple of `resolution`, <= max_length) that completes `steps` steps within
    `trial_timeout` seconds: doubling from SEARCH_START until a failure (oom, failed or timeout), then bisection.
    Returns (length, its row, every trial)."""
    trials: list[dict] = []

    def attempt(length: int) -> dict:
        case = BenchCase(model, stage, impl, length, steps, loss_chunk_size, peak_tflops=peak_tflops)
        row = run_in_subprocess(case, trial_timeout)
        trials.append(row)
        detail = {"ok": lambda: f", {row['tokens_per_s']:.0f} tok/s, {row['peak_mem_mib']:.0f} MiB",
                  "timeout": lambda: f" (over {row['timeout_s']:g} s)"}.get(row["status"], lambda: "")()
        log(f"  {model} {stage} {impl} T={length}: {row['status']}{detail}")
        return row

    good, good_row, bad = None, None, None
    length = min(SEARCH_START, max_length)
    while True:
        row = attempt(length)
        if row["status"] != "ok":
            bad = length
            break
        good, good_row = length, row
        if length >= max_length:
            return good, good_row, trials
        length = min(2 * length, max_length)
    lo = good or 0
    while bad - lo > resolution:
        mid = (lo + bad) // 2 // resolution * resolution
        if mid <= lo:
            break
        row = attempt(mid)
        if row["status"] == "ok":
            lo, good, good_row = mid, mid, row
        else:
            bad = mid
    return good, good_row, trials


def machine_description() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    import transformers

    info["transformers"] = transformers.__version__
    return info


def compare(rows: list[dict], key: str) -> list[dict[str, Any]]:
    """ours / baseline ratios for every (model, stage, `key`) measured both ways (ours with full checkpointing,
    as the baseline)."""
    out = []
    ours = {(r["model"], r["stage"], r[key]): r for r in rows
            if r["impl"] == "ours" and r.get("status") == "ok" and r.get("checkpoint_policy", "full") == "full"}
    for r in rows:
        k = (r["model"], r["stage"], r[key])
        if r["impl"] != "baseline" or k not in ours:
            continue
        o = ours[k]
        entry = {"model": k[0], "stage": k[1], key: k[2]}
        if r.get("status") == "ok":
            entry["peak_mem_ratio"] = round(o["peak_mem_mib"] / r["peak_mem_mib"], 3) if r["peak_mem_mib"] > 0 else None
            entry["tokens_per_s_ratio"] = round(o["tokens_per_s"] / r["tokens_per_s"], 3)
        else:
            entry["baseline_status"] = r.get("status")
        out.append(entry)
    return out


def compare_policies(rows: list[dict]) -> list[dict[str, Any]]:
    """selective / full checkpointing ratios of our path (peak memory, tokens/s) for every (model, stage, length)
    measured both ways in this run."""
    ok = {(r["model"], r["stage"], r["length"], r.get("checkpoint_policy", "full")): r for r in rows
          if r["impl"] == "ours" and r.get("status") == "ok"}
    out = []
    for (model, stage, length, policy), sel in ok.items():
        full = ok.get((model, stage, length, "full"))
        if policy != "selective" or full is None:
            continue
        out.append({"model": model, "stage": stage, "length": length,
                    "peak_mem_ratio": round(sel["peak_mem_mib"] / full["peak_mem_mib"], 3) if full["peak_mem_mib"] > 0
                    else None,
                    "tokens_per_s_ratio": round(sel["tokens_per_s"] / full["tokens_per_s"], 3)})
    return out


def _fmt(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    lines = ["| model | stage | impl | length | status | peak MiB | host RSS MiB | tokens/s | MFU | checkpointing |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['stage']} | {r['impl']} | {r['length']} | {r['status']} | "
                     f"{_fmt(r.get('peak_mem_mib'), '.0f')} | {_fmt(r.get('host_peak_rss_mib'), '.0f')} | "
                     f"{_fmt(r.get('tokens_per_s'), '.1f')} | {_fmt(r.get('mfu'), '.1%')} | "
                     f"{r.get('checkpoint_policy', 'full')} |")
    return "\n".join(lines)


def _csv(text: str, allowed: tuple[str, ...] | None, flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if allowed is not None and x not in allowed]
    if bad or not items:
        raise ConfigError(f"bench: {flag} got {bad or text!r}; choose from {', '.join(allowed or ())}")
    return items


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    models = _csv(args.model, tuple(MODEL_SHAPES), "--model")
    stages = _csv(args.stage, STAGES, "--stage")
    impls = ["ours", "baseline"] if args.baseline else ["ours"]
    policies = _csv(args.checkpointing, ("full", "selective"), "--checkpointing")
    if args.search and policies != ["full"]:
        raise ConfigError("bench: --checkpointing compares policies at fixed --lengths; drop it with --search")
    if args.steps < 1:
        raise ConfigError(f"bench: --steps must be >= 1, got {args.steps}")
    gpu = torch.cuda.is_available()
    machine = machine_description()
    print(f"machine: {machine}")
    print(f"peak memory: {'torch.cuda.max_memory_allocated' if gpu else 'peak RSS growth over the RSS before step 1'}"
          f"; tokens/s over steps 2..{args.steps}" + ("" if args.steps > 1 else " (only one step: step 1)"))
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ConfigError(f"bench: --peak-tflops must be > 0, got {args.peak_tflops}")
    if args.trial_timeout is not None and args.trial_timeout <= 0:
        raise ConfigError(f"bench: --trial-timeout must be > 0 seconds, got {args.trial_timeout}")
    peak: float | None = None
    if gpu:
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_bf16_flops(name)
        print(f"MFU: {FLOP_CONVENTION}")
        print(f"MFU peak: {peak / 1e12:g} TFLOP/s ({'--peak-tflops' if args.peak_tflops else name})" if peak else
              f"MFU: unknown ('{name}' has no listed peak; give --peak-tflops)")
    print(f"trial timeout: {f'{args.trial_timeout:g} s' if args.trial_timeout else 'none'}")
    report: dict[str, Any] = {"machine": machine, "flop_convention": FLOP_CONVENTION, "steps": args.steps,
                              "loss_chunk_size": args.loss_chunk_size, "peak_flops": peak,
                              "trial_timeout_s": args.trial_timeout}
    if args.search:
        max_length = args.max_length or (1 << 20 if gpu else 32768)
        results, rows = [], []
        for model in models:
            for stage in stages:
                for impl in impls:
                    length, row, trials = search_max_length(model, stage, impl, args.steps, max_length,
                                                            args.resolution, args.loss_chunk_size,
                                                            trial_timeout=args.trial_timeout,
                                                            peak_tflops=args.peak_tflops)
                    rows.extend(trials)
                    results.append({"model": model, "stage": stage, "impl": impl, "max_length": length,
                                    "bound": max_length, **({k: row[k] for k in ("peak_mem_mib", "tokens_per_s", "mfu")}
                                                           if row else {})})
        print("| model | stage | impl | max length | peak MiB at max | tokens/s at max | MFU at max |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            capped = " (= --max-length)" if r["max_length"] == r["bound"] else ""
            print(f"| {r['model']} | {r['stage']} | {r['impl']} | {_fmt(r['max_length'], 'd', 'none')}{capped} | "
                  f"{_fmt(r.get('peak_mem_mib'), '.0f')} | {_fmt(r.get('tokens_per_s'), '.1f')} | "
                  f"{_fmt(r.get('mfu'), '.1%')} |")
        comparisons = []
        for r in results:
            if r["impl"] == "baseline":
                o = next(x for x in results if x["model"] == r["model"] and x["stage"] == r["stage"]
                         and x["impl"] == "ours")
                if o["max_length"] and r["max_length"]:
                    comparisons.append({"model": r["model"], "stage": r["stage"],
                                        "max_length_ratio": round(o["max_length"] / r["max_length"], 3)})
        for c in comparisons:
            print(f"{c['model']} {c['stage']}: max length ours/baseline = {c['max_length_ratio']:.2f}")
        report.update(search=results, rows=rows, comparisons=comparisons)
    else:
        lengths = [int(x) for x in _csv(args.lengths, None, "--lengths")]
        rows = []
        for model in models:
            for stage in stages:
                for length in lengths:
                    # the baseline is plain HF with whole-layer checkpointing; policies vary our path only
                    for impl, policy in [(i, p) for i in impls for p in (policies if i == "ours" else ["full"])]:
                        case = BenchCase(model, stage, impl, length, args.steps, args.loss_chunk_size,
                                         args.tensor_memory, args.peak_tflops, policy)
                        rows.append(run_in_subprocess(case, args.trial_timeout))
                        r = rows[-1]
                        print(f"  {model} {stage} {impl} {policy} T={length}: {r['status']}", flush=True)
        print(format_table(rows))
        comparisons = compare(rows, "length")
        for c in comparisons:
            if "peak_mem_ratio" in c:
                print(f"{c['model']} {c['stage']} T={c['length']}: ours/baseline peak memory {c['peak_mem_ratio']:.3f}, "
                      f"tokens/s {c['tokens_per_s_ratio']:.3f}")
            else:
                print(f"{c['model']} {c['stage']} T={c['length']}: baseline {c['baseline_status']}")
        policy_comparisons = compare_policies(rows)
        for c in policy_comparisons:
            print(f"{c['model']} {c['stage']} T={c['length']}: selective/full checkpointing peak memory "
                  f"{_fmt(c['peak_mem_ratio'], '.3f')}, tokens/s {c['tokens_per_s_ratio']:.3f}")
        report.update(rows=rows, comparisons=comparisons, checkpointing_comparisons=policy_comparisons)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `longtune bench` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="max length / tokens per second / peak memory / MFU, ours vs a plain HF baseline",
        description=(
            "Train a Qwen2-architecture model built from config (random weights) for a few steps at batch 1 on "
            "random tokens, each configuration in a fresh process, and report peak memory, tokens/s and (GPU) "
            "MFU; with --baseline also a plain HF forward with full logits. See docs/benchmarks.md."
        ),
    )
    parser.add_argument("--model", default="cpu-512", help=f"comma-separated: {', '.join(MODEL_SHAPES)}")
    parser.add_argument("--stage", default="sft", help="comma-separated: sft, dpo (a pair of two length/2 documents)")
    parser.add_argument("--lengths", default="4096,8192,16384", help="comma-separated sequence lengths")
    parser.add_argument("--search", action="store_true", help="binary-search the longest length that completes")
    parser.add_argument("--max-length", type=int, default=None,
                        help="upper bound of --search (default 32768 on CPU, 1048576 on GPU)")
    parser.add_argument("--resolution", type=int, default=2048, help="--search stops within this many tokens")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (default 3)")
    parser.add_argument("--baseline", action="store_true", help="also run the plain HF baseline")
    parser.add_argument("--loss-chunk-size", type=int, default=DEFAULT_LOSS_CHUNK, help="our loss_chunk_size")
    parser.add_argument("--checkpointing", default="full", metavar="POLICIES",
                        help="comma-separated gradient_checkpointing_policy values of our path (full, selective); "
                             "`full,selective` measures both in one run and prints their ratios")
    parser.add_argument("--tensor-memory", action="store_true",
                        help="also report the peak of live tensor bytes (slower; what `estimate` predicts)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak in TFLOP/s for MFU (default: looked up by device name; "
                             "unknown devices report no MFU)")
    parser.add_argument("--trial-timeout", type=float, default=1800.0, metavar="S",
                        help="kill a configuration after S seconds and report it as 'timeout' (default 1800)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write all rows and ratios as JSON")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks for errors")
    parser.set_defaults(func=cmd_bench)
    return parser


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    print("internal entry point: use `longtune bench`", file=sys.stderr)
    sys.exit(2)
