"""Command line: parse arguments, build the config, call one function per command. User errors print as one line."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from longtune import __version__
from longtune.errors import ConfigError, LongtuneError, storage_error
from longtune.bench import add_bench_parser
from longtune.estimate import add_estimate_parser
from longtune.preview import add_data_parser

CONFIG_DOC = "docs/config.md (every key with type, default and meaning)"

DESCRIPTION = f"""\
longtune {__version__}: post-train language models on long sequences.

commands:
  train    train from a LLaMA-Factory-style YAML (+ key=value overrides)
  export   write a Hugging Face model directory from a run or checkpoint (optionally merging LoRA)
  data     preview the training data: rendered samples with trained tokens marked, length statistics
  estimate predicted peak memory per GPU, broken down; suggests sequence_parallel_size
  bench    max length / tokens per second / peak memory / MFU, ours vs a plain HF baseline
  chat     talk to a trained model in the terminal (a run dir, final/, an exported model or builtin:tiny)
  predict  generate replies for eval_dataset: generated_predictions.jsonl + BLEU-4/ROUGE in predict_results.json

Config keys: {CONFIG_DOC}.
"""


def split_config_args(command: str, items: list[str], required: bool = True) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] [key=value ...]` of a command (train, data, estimate): the YAML path (None when the first
    argument is already an override) and the overrides, each checked to be key=value. `required`: at least one
    of them must be given."""
    rest = list(items)
    config_path = rest.pop(0) if rest and "=" not in rest[0] else None
    if required and config_path is None and not rest:
        raise ConfigError(f"{command}: give a CONFIG.yaml and/or key=value overrides (see longtune {command} --help)")
    for item in rest:
        if "=" not in item:
            raise ConfigError(f"{command}: '{item}' is not key=value (only the first argument may be a YAML file)")
    return config_path, rest


ERROR_DIR_ENV = "LONGTUNE_ERROR_DIR"  # set by `--nproc`: ranks leave their one-line error there for the launcher


def launch_with_torchrun(args: argparse.Namespace) -> int:
    """`longtune train ... --nproc N`: run N local processes under torchrun (same arguments, minus --nproc).
    Each rank's one-line error is collected and printed once (with the ranks it came from when they differ);
    the exit code is the failed rank's (2: bad input, 3: a peer failed)."""
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if args.nproc < 1:
        raise LongtuneError(f"train: --nproc must be >= 1, got {args.nproc}")
    torchrun_args = ["--standalone", f"--nproc-per-node={args.nproc}", "-m", "longtune"]
    if args.debug:
        torchrun_args.append("--debug")
    torchrun_args += ["train", *args.config_and_overrides]
    # torchrun's agent logs every worker exit with its own traceback; the summary below says it in one line.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="longtune-errors-") as errors:
        os.environ[ERROR_DIR_ENV] = errors
        try:
            run(get_args_parser().parse_args(torchrun_args))
            return 0
        except ChildFailedError as exc:
            lines = {}
            for path in sorted(Path(errors).glob("rank-*.txt")):
                lines.setdefault(path.read_text().strip(), []).append(path.stem.split("-")[1])
            first_rank, first = exc.get_first_failure()
            code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode
            if lines:  # a rank explained itself: 3 when it only saw a peer fail, else 2 (its input)
                code = 3 if all(line.startswith("PeerError") for line in lines) else 2
            if len(lines) == 1:
                print(next(iter(lines)), file=sys.stderr)
            for line, ranks in lines.items() if len(lines) > 1 else ():
                print(f"rank {','.join(ranks)}: {line}", file=sys.stderr)
            if not lines:
                how = f"signal {first.signal_name()}" if first.exitcode < 0 else f"exit code {first.exitcode}"
                print(f"error: rank {first_rank} failed ({how}); the ranks' output above says why", file=sys.stderr)
            return code
        finally:
            os.environ.pop(ERROR_DIR_ENV, None)


def cmd_train(args: argparse.Namespace) -> int:
    from longtune.config import load_config
    from longtune.trainer import train

    config_path, overrides = split_config_args("train", args.config_and_overrides)
    cfg = load_config(config_path, overrides)  # before N processes start: fail fast and once
    if not cfg.train.do_train:  # LLaMA-Factory's predict-only config (do_train: false, do_predict: true)
        from longtune.predict import run_predict

        if int(os.environ.get("RANK", "0")) == 0:  # generation runs in one process, whatever --nproc says
            run_predict(cfg)
        return 0
    if args.nproc is not None and "RANK" not in os.environ:
        from longtune.parallel.mesh import check_degrees
        from longtune.run_dir import preflight

        check_degrees(args.nproc, cfg.parallel.sequence_parallel_size, cfg.parallel.tensor_parallel_size)
        preflight(cfg)
        return launch_with_torchrun(args)
    if int(os.environ.get("RANK", "0")) == 0:
        for notice in cfg.notices:  # what LLaMA-Factory-only keys were taken as
            print(notice)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if cfg.generation.do_predict:
        from longtune.predict import run_predict

        run_predict(cfg, model_path=str(result.final_dir))
    rows = [r for r in result.metrics if "loss" in r]
    if rows:
        print(
            f"done: {result.global_step} steps, loss {rows[0]['loss']:.4f} (step {rows[0]['step']}) -> "
            f"{rows[-1]['loss']:.4f} (step {rows[-1]['step']})"
        )
    print(f"run directory: {result.output_dir}  (model: {result.final_dir}, metrics: "
          f"{result.output_dir / 'metrics.jsonl'})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from longtune.export import export_model

    dst = export_model(args.source, args.out, merge_lora=args.merge_lora, overwrite=args.overwrite, base=args.base)
    print(f"exported to {dst}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from longtune.config import load_config
    from longtune.predict import run_predict

    config_path, overrides = split_config_args("predict", args.config_and_overrides)
    # `predict` is a predict-only run whatever the YAML says about training
    run_predict(load_config(config_path, [*overrides, "do_train=false", "do_predict=true"]))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from longtune.chat import run_chat

    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"chat: '{item}' is not key=value (only the first argument is the model)")
    return run_chat(args.model, args.overrides, system=args.system, message=args.message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longtune", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"longtune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train from a YAML config",
        description=(
            "Train a model. The first argument may be a YAML file; the rest are key=value overrides parsed as "
            "YAML scalars, e.g. `longtune train examples/sft_demo.yaml learning_rate=1e-4 max_steps=50`.\n\n"
            f"All keys: {CONFIG_DOC}."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config_and_overrides", nargs="*", metavar="CONFIG.yaml | key=value")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="start N local processes with torchrun (e.g. with sequence_parallel_size=N)")
    # SUPPRESS: `longtune --debug train ...` keeps the top-level flag instead of the subcommand's default False.
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks for errors")
    train.set_defaults(func=cmd_train)

    export = sub.add_parser(
        "export",
        help="export a run/checkpoint as a Hugging Face model directory",
        description="Write OUT_DIR as a model directory AutoModelForCausalLM.from_pretrained loads, with tokenizer.",
    )
    export.add_argument("source", metavar="RUN_OR_CKPT_DIR")
    export.add_argument("out", metavar="OUT_DIR")
    export.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into its base model")
    export.add_argument("--base", default=None, metavar="MODEL_DIR",
                        help="with --merge-lora: the base model (default: the adapter's base_model_name_or_path)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks for errors")
    export.set_defaults(func=cmd_export)
    chat = sub.add_parser(
        "chat",
        help="chat with a trained model in the terminal",
        description=(
            "Talk to MODEL_OR_RUN (a run directory, its final/, a checkpoint, an exported model, a LoRA adapter, "
            "or builtin:tiny) in the template the run trained with; replies stream as they are generated. "
            "Each line of input is a message (stdin may be piped); /reset clears the history, /exit or end of "
            "input quits. key=value: generation keys (do_sample=false, temperature, top_p, top_k, "
            "max_new_tokens, repetition_penalty, num_beams), template, dtype, adapter_name_or_path=DIR."
        ),
    )
    chat.add_argument("model", metavar="MODEL_OR_RUN")
    chat.add_argument("overrides", nargs="*", metavar="key=value")
    chat.add_argument("--system", default=None, help="system prompt of the conversation")
    chat.add_argument("--message", default=None, metavar="TEXT", help="answer this one message and exit")
    chat.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks for errors")
    chat.set_defaults(func=cmd_chat)

    predict = sub.add_parser(
        "predict",
        help="generate replies for eval_dataset and score them (BLEU-4, ROUGE)",
        description=(
            "Generate a reply to every row of eval_dataset with model_name_or_path (+ adapter_name_or_path), in "
            "batches of per_device_eval_batch_size; write output_dir/generated_predictions.jsonl and "
            "predict_results.json as LLaMA-Factory's do_predict does.\n\n"
            f"All keys: {CONFIG_DOC}."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("config_and_overrides", nargs="*", metavar="CONFIG.yaml | key=value")
    predict.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show full tracebacks for errors")
    predict.set_defaults(func=cmd_predict)
    add_data_parser(sub)
    add_estimate_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options (`train cfg.yaml --nproc 2 lr=1e-4`): argparse stops
    # collecting positionals at the first option, so the rest arrive as unknown arguments.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    takes = next((name for name in ("config_and_overrides", "overrides") if hasattr(args, name)), None)
    if stray or (extra and takes is None):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        setattr(args, takes, [*getattr(args, takes), *extra])
    if args.command is None:
        parser.print_help()
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would drown our own progress line
    try:
        try:
            return args.func(args)
        except Exception as exc:  # noqa: BLE001  (only a full disk is translated; the rest re-raises)
            full = storage_error(exc, getattr(exc, "filename", None) or "the run directory")
            if full is None:
                raise
            raise full from exc
    except LongtuneError as exc:
        if args.debug:
            traceback.print_exc()
        name = type(exc).__name__ if type(exc) is not LongtuneError else "error"
        line = f"{name}: {exc}"
        if os.environ.get(ERROR_DIR_ENV) and "RANK" in os.environ and not args.debug:
            # Under `--nproc` the launcher prints each distinct line once.
            Path(os.environ[ERROR_DIR_ENV], f"rank-{os.environ['RANK']}.txt").write_text(line + "\n")
        else:
            print(line, file=sys.stderr)
        return 3 if name == "PeerError" else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
