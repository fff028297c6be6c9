"""Preprocessing throughput: tokenize N short alpaca rows with the builtin tokenizer, cold and then from the cache.

    python benchmarks/preprocess.py [--rows 100000] [--cutoff-len 1024]

Everything (rows, cache) lives in a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from longtune.data import load_examples
from longtune.models.builtin import load_builtin_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

    return [
        {"instruction": f"Task {i}: {words(3, 10)}", "input": words(0, 8), "output": words(2, 24)} for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cutoff-len", type=int, default=1024)
    args = parser.parse_args()
    tokenizer = load_builtin_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "alpaca.json").write_text(json.dumps(make_rows(args.rows)))
        common = dict(
            dataset_dir=str(root), tokenizer=tokenizer, template="chatml", stage="sft",
            cutoff_len=args.cutoff_len, cache_dir=str(root / "cache"),
        )
        start = time.perf_counter()
        cold, cold_stats = load_examples(["alpaca.json"], **common)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        warm, warm_stats = load_examples(["alpaca.json"], **common)
        warm_s = time.perf_counter() - start
        assert not cold_stats.cache_hit and warm_stats.cache_hit
        assert [e.input_ids for e in warm] == [e.input_ids for e in cold]
        assert [e.labels for e in warm] == [e.labels for e in cold]
        cache_mib = sum(f.stat().st_size for f in (root / "cache").iterdir()) / 2**20
    print(f"rows: {args.rows}  examples: {len(cold)}  tokens: {cold_stats.tokens}  "
          f"trained: {cold_stats.trained_tokens}  cpus: {os.cpu_count()}")
    print(f"cold (tokenize + write cache): {cold_s:7.2f} s  {args.rows / cold_s:10,.0f} rows/s")
    print(f"warm (cache hit):              {warm_s:7.2f} s  {args.rows / warm_s:10,.0f} rows/s  ({cache_mib:.1f} MiB)")


if __name__ == "__main__":
    main()
