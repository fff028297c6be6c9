"""Host memory of a QLoRA run (4-bit nf4 / 8-bit base) vs the same LoRA run with a bf16 base, on CPU.

Builds a Llama-architecture model from config (random weights, no download) with the builtin tokenizer, saves it
in fp32, and trains 4 LoRA steps on builtin:sft_demo in bf16 compute, one fresh process per variant. Each
process reports (from /proc/self/status) its resident memory after the imports (the runtime), its peak over the
whole run (which includes loading the bf16 weights before they are quantized), and its peak over steps 2-4
alone (the peak is reset with /proc/self/clear_refs after step 1): the training-time footprint.

Two settings keep the resident set a measure of what the run holds (on a GPU, the caching allocator's
max_memory_allocated is that measure directly):
- The checkpoint is fp32, so loading in bf16 makes private copies; a bf16 checkpoint would be memory-mapped, and
  its pages stay resident (and counted) as long as any tensor of the file lives, quantized away or not.
- MALLOC_MMAP_THRESHOLD_=65536 in the children: glibc otherwise raises its mmap threshold after the first large
  free, so the freed full-precision weights of quantized layers stay in the heap and the resident set never
  shrinks (measured: the 4-bit run then shows a *higher* peak than the bf16 one).
Run:  python benchmarks/qlora_memory.py [--hidden 1024 --layers 8]   (Linux only)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"lora bf16 base": [], "qlora 8-bit": ["quantization_bit=8"], "qlora 4-bit nf4": ["quantization_bit=4"]}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _one(model_dir: str, out: str, extra: list[str]) -> None:
    """Child process: one training run; prints a JSON line of its memory figures (MiB)."""
    from longtune.config import load_config
    from longtune.trainer import TrainCallbacks, train

    runtime = _status_kib("VmRSS")
    figures: dict[str, float] = {}

    def on_step_end(step: int, row: dict) -> None:
        if step == 1:
            figures["run_peak_to_step1"] = _status_kib("VmHWM") / 1024
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: from here on, training only
        figures["loss"] = row["loss"]

    cfg = load_config(None, [f"model_name_or_path={model_dir}", "dataset=builtin:sft_demo", "template=chatml",
                             "cutoff_len=256", "bf16=true", "finetuning_type=lora", "lora_rank=8",
                             "per_device_train_batch_size=4", "max_steps=4", "logging_steps=1", "save_steps=0",
                             "save_only_model=true", f"output_dir={out}", "disable_tqdm=true",
                             "gradient_checkpointing=true", *extra])
    train(cfg, log=lambda _: None, callbacks=TrainCallbacks(on_step_end=on_step_end))
    figures.update(runtime=runtime / 1024, training_peak=_status_kib("VmHWM") / 1024)
    print(json.dumps(figures))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--one", nargs=3, metavar=("MODEL_DIR", "OUT", "EXTRA_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _one(args.one[0], args.one[1], json.loads(args.one[2]))
        return 0
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longtune.models.builtin import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        config = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                             num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                             tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             bos_token_id=tok.bos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        params = sum(p.numel() for p in model.parameters())
        linear = sum(m.weight.numel() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        for label, extra in VARIANTS.items():
            out = Path(tmp) / label.replace(" ", "_")
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            proc = subprocess.run([sys.executable, __file__, "--one", str(model_dir), str(out), json.dumps(extra)],
                                  check=True, capture_output=True, text=True, env=env)
            results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"model: {params / 1e6:.0f}M parameters ({linear / 1e6:.0f}M in the quantizable linear layers), bf16 "
          "compute, LoRA r=8 on all linear layers, 4 steps x 4 rows x 256 tokens, CPU, one process each")
    print("| base | runtime MiB | whole-run peak MiB | training peak MiB | training peak - runtime MiB | loss step 4 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in results.items():
        print(f"| {label} | {r['runtime']:.0f} | {max(r['run_peak_to_step1'], r['training_peak']):.0f} | "
              f"{r['training_peak']:.0f} | {r['training_peak'] - r['runtime']:.0f} | {r['loss']:.4f} |")
    base = results["lora bf16 base"]
    for label in ("qlora 8-bit", "qlora 4-bit nf4"):
        r = results[label]
        print(f"{label} / lora: training peak {r['training_peak'] / base['training_peak']:.2f}, above the runtime "
              f"{(r['training_peak'] - r['runtime']) / (base['training_peak'] - base['runtime']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
