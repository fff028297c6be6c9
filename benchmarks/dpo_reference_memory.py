"""Peak host memory of full-parameter DPO with a live frozen reference vs precomputed reference log-probs.

Builds a Qwen2-architecture model from config (random weights, no download) with the builtin tokenizer, saves
it, and trains 3 DPO steps on builtin:dpo_demo both ways in separate processes; prints peak RSS and the ratio.
Run:  python benchmarks/dpo_reference_memory.py [--hidden 1024 --layers 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from longtune.models.builtin import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        config = Qwen2Config(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                             num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                             tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        rows = {}
        for label, extra in (("live frozen reference", []), ("precomputed", ["precompute_ref_log_probs=true"])):
            out = Path(tmp) / label.replace(" ", "_")
            cmd = [sys.executable, "-m", "longtune", "train", f"model_name_or_path={model_dir}", "stage=dpo",
                   "dataset=builtin:dpo_demo", "max_samples=64", "template=chatml", "cutoff_len=128",
                   "finetuning_type=full", "per_device_train_batch_size=8", "max_steps=3", "logging_steps=1",
                   f"output_dir={out}", "disable_tqdm=true", "save_steps=0", f"data_cache_dir={tmp}/cache", *extra]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            rows[label] = (max(r["peak_mem_gib"] for r in metrics), [round(r["loss"], 6) for r in metrics])
    print(f"model: {params / 1e6:.0f}M parameters (fp32), full DPO, 3 steps, batch 8 pairs, CPU")
    print("| reference | peak RSS GiB | losses |")
    print("| --- | --- | --- |")
    for label, (peak, losses) in rows.items():
        print(f"| {label} | {peak:.2f} | {losses} |")
    live, pre = rows["live frozen reference"][0], rows["precomputed"][0]
    print(f"precomputed / live peak: {pre / live:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
