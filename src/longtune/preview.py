"""`longtune data CONFIG.yaml`: the training examples exactly as the trainer builds them, before any GPU time.

Prints rendered samples with the trained tokens highlighted, then counts, length statistics and the packing result.
With `streaming: true` it reads only the head of the stream (buffer_size examples) and says so.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from typing import TYPE_CHECKING

# The data modules (numpy, jinja2) are imported inside the functions: registering this subcommand must not slow
# down every other `longtune` command.
if TYPE_CHECKING:
    from longtune.data import DataStats, Example
    from longtune.data.packing import PackingStats

GREEN, RESET = "\x1b[32m", "\x1b[0m"
PLAIN_OPEN, PLAIN_CLOSE = "[[", "]]"
HISTOGRAM_BUCKETS = 10
HISTOGRAM_WIDTH = 40


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `longtune data` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "data",
        help="preview the training data: rendered samples, trained tokens, length stats",
        description=(
            "Load the datasets of a config exactly as `longtune train` would (same template, cutoff, mixing, "
            "cache) and show N samples with trained tokens highlighted, then counts and length statistics. "
            "The first argument may be a YAML file; the rest are key=value overrides. output_dir is not touched. "
            "With streaming: true only the head of the stream (buffer_size examples) is read."
        ),
    )
    parser.add_argument("config_and_overrides", nargs="*", metavar="CONFIG.yaml | key=value")
    parser.add_argument("--num", type=int, default=3, metavar="N", help="samples to show (default 3)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows")
    parser.add_argument("--no-color", action="store_true", help="mark trained tokens as [[...]] instead of green")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks for errors")
    parser.set_defaults(func=cmd_data)
    return parser


def cmd_data(args: argparse.Namespace) -> int:
    from longtune.config import load_config
    from longtune.stages import build_stage
    from longtune.errors import ConfigError
    from longtune.models.loader import load_tokenizer

    from longtune.cli import split_config_args

    config_path, items = split_config_args("data", args.config_and_overrides)
    if args.num < 0:
        raise ConfigError(f"data: --num must be >= 0, got {args.num}")
    if args.skip_bad_rows:
        items.append("skip_bad_rows=true")
    cfg = load_config(config_path, items)
    tokenizer = load_tokenizer(cfg.model)
    color = sys.stdout.isatty() and not args.no_color and "NO_COLOR" not in os.environ
    if cfg.data.streaming:
        print(preview_stream(cfg, tokenizer, num=args.num, color=color))
        return 0
    # the examples in the stage's own shape (pairs for dpo/rm, example + KL document for kto)
    examples, stats = build_stage(cfg).load_examples(cfg, tokenizer, "train")
    print(format_samples(examples, tokenizer, num=args.num, color=color))
    print(format_statistics(examples, stats, packing_capacity=cfg.data.cutoff_len if cfg.packing else None))
    return 0


def preview_stream(cfg, tokenizer, *, num: int, color: bool) -> str:
    """Streaming: the first `num` examples of the stream (as the in-memory preview shows the first of the list),
    and statistics over the first max(num, buffer_size) examples only (what the trainer holds before step 1),
    packed in windows of packing_buffer as the trainer packs them. The rest of the data is not read."""
    import itertools

    from longtune.data import DataStats
    from longtune.data.packing import PackingStats, pack_stream
    from longtune.data.streaming import stream_from_config, whole_file_notices

    stats = DataStats.empty()
    read = list(itertools.islice(stream_from_config(cfg, tokenizer, stats), max(num, cfg.data.buffer_size)))
    packing = None
    if cfg.packing and read:
        packing = PackingStats(0, 0, 0, cfg.data.cutoff_len)
        for _ in pack_stream(read, cfg.data.cutoff_len, cfg.data.packing_buffer, packing):
            pass
    parts = [*whole_file_notices(cfg)]
    parts.append(format_samples(read[:num], tokenizer, num=num, color=color, total=None))
    parts.append(format_statistics(read, stats, packing_capacity=None, streamed=True, streamed_packing=packing))
    return "\n".join(parts)


def highlight_trained(example: Example, tokenizer, *, color: bool) -> str:
    """The example's text with every run of trained tokens (label != IGNORE) marked green or as [[...]]."""
    from longtune.data import IGNORE_INDEX

    out: list[str] = []
    run: list[int] = []
    run_trained = False
    for token, label in [*zip(example.input_ids, example.labels, strict=True), (None, None)]:
        trained = label is not None and label != IGNORE_INDEX
        if run and (token is None or trained != run_trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            if run_trained:
                text = f"{GREEN}{text}{RESET}" if color else f"{PLAIN_OPEN}{text}{PLAIN_CLOSE}"
            out.append(text)
            run = []
        if token is not None:
            run.append(token)
            run_trained = trained
    return "".join(out)


def format_samples(examples: list[Example], tokenizer, *, num: int, color: bool, total: int | None = -1) -> str:
    """The first `num` examples, rendered; headers say "i/total" (total: len(examples) by default, None: unknown,
    as under streaming)."""
    from longtune.data import IGNORE_INDEX

    shown = examples[:num]
    of = len(examples) if total == -1 else total
    blocks = []
    for i, example in enumerate(shown, start=1):
        trained = sum(label != IGNORE_INDEX for label in example.labels)
        marker = "green" if color else f"{PLAIN_OPEN}...{PLAIN_CLOSE}"
        place = f"{i}/{of}" if of is not None else f"{i} of the stream"
        header = f"=== sample {place}: {len(example.input_ids)} tokens, {trained} trained ({marker}) ==="
        blocks.append(f"{header}\n{highlight_trained(example, tokenizer, color=color)}")
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def length_summary(lengths: list[int]) -> dict[str, float]:
    """min / median / mean / p95 (nearest rank) / max of example lengths."""
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "mean": sum(ordered) / len(ordered),
        "p95": ordered[math.ceil(0.95 * len(ordered)) - 1],
        "max": ordered[-1],
    }


def length_histogram(lengths: list[int], buckets: int = HISTOGRAM_BUCKETS) -> list[tuple[int, int, int]]:
    """(low, high, count) for equal-width integer buckets from min to max; both ends inclusive."""
    import numpy as np

    lo, hi = min(lengths), max(lengths)
    width = max(1, math.ceil((hi - lo + 1) / buckets))
    counts = np.bincount((np.asarray(lengths) - lo) // width, minlength=math.ceil((hi - lo + 1) / width))
    return [(lo + b * width, min(hi, lo + (b + 1) * width - 1), int(c)) for b, c in enumerate(counts)]


def format_statistics(
    examples: list[Example],
    stats: DataStats,
    *,
    packing_capacity: int | None,
    streamed: bool = False,
    streamed_packing: PackingStats | None = None,
) -> str:
    """Counts and length statistics of `examples`. `streamed`: they are the head of a stream (the header says
    so; `streamed_packing` is how the trainer's packing windows filled over them)."""
    from longtune.data.packing import pack_examples

    pct = 100 * stats.trained_tokens / stats.tokens if stats.tokens else 0.0
    header = "=== statistics ==="
    if streamed:
        header = (f"=== statistics over the head of the stream only (streaming): its first {len(examples)} examples; "
                  f"row counts over the {stats.rows} rows read so far ===")
    lines = [
        header,
        f"rows            {stats.rows}",
        f"examples        {len(examples)}",
        f"tokens          {stats.tokens}",
        f"trained tokens  {stats.trained_tokens} ({pct:.1f}%)",
    ]
    if examples:
        lengths = [len(e.input_ids) for e in examples]
        s = length_summary(lengths)
        lines.append(
            f"length          min {s['min']}  median {s['median']:g}  mean {s['mean']:.1f}  p95 {s['p95']}  "
            f"max {s['max']}"
        )
        histogram = length_histogram(lengths)
        most = max(count for _, _, count in histogram)
        label_width = len(str(histogram[-1][1]))
        for low, high, count in histogram:
            bar = "#" * round(HISTOGRAM_WIDTH * count / most) if most else ""
            lines.append(f"  {low:>{label_width}}-{high:<{label_width}} | {bar:<{HISTOGRAM_WIDTH}} {count}")
    lines += [
        f"truncated       {stats.truncated}",
        f"dropped         {stats.dropped}",
        f"skipped         {stats.skipped}",
    ]
    lines += [f"  {message}" for message in stats.skipped_examples]
    if streamed:
        lines.append("cache           off (streaming)")
    else:
        lines.append(f"cache           {'hit' if stats.cache_hit else 'miss (tokenized and saved)'}")
    packed = None
    if packing_capacity is not None and examples:
        _, packed = pack_examples(examples, packing_capacity)
    packed = streamed_packing or packed
    if packed is not None:
        windows = " (in windows of packing_buffer)" if streamed_packing is not None else ""
        lines.append(
            f"packing         {packed.documents} examples -> {packed.rows} rows of {packed.capacity} tokens{windows}, "
            f"efficiency {100 * packed.efficiency:.1f}%"
        )
    return "\n".join(lines)
