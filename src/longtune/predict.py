"""`longtune predict CONFIG` and `do_predict: true`: generate a reply for every row of `eval_dataset`, write
`output_dir/generated_predictions.jsonl` (`prompt`, `predict`, `label` per row) and `predict_results.json`
(BLEU-4 and ROUGE-1/2/L), with LLaMA-Factory's file names, field names and metric definitions."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from longtune.config import Config
from longtune.errors import DataError

PREDICTIONS_FILE = "generated_predictions.jsonl"
RESULTS_FILE = "predict_results.json"


@dataclass(frozen=True)
class PredictRow:
    prompt_ids: list[int]
    system: str | None
    label: str  # the reference reply: the row's last assistant turn


@dataclass(frozen=True)
class PredictResult:
    predictions_file: Path
    results_file: Path
    metrics: dict[str, float]


def predict_rows(cfg: Config, tokenizer) -> list[PredictRow]:
    """Every conversation of eval_dataset as (prompt ids up to the assistant header of its last turn, the last
    assistant reply as label); a prompt longer than cutoff_len keeps its start and end (as training cuts)."""
    from longtune.data.conversation import Conversation
    from longtune.data.encode import truncate_conversation
    from longtune.data.loading import load_dataset
    from longtune.data.pipeline import split_names
    from longtune.data.templates import template_options_of
    from longtune.generation import prompt_ids

    d = cfg.data
    rows = []
    for name in split_names(d.eval_dataset):
        for parsed in load_dataset(name, dataset_dir=d.dataset_dir, max_samples=d.max_samples, task="plain"):
            where = f"{parsed.source} row {parsed.row_number}"
            item = parsed.item
            if not isinstance(item, Conversation) or not item.turns or item.turns[-1].role != "assistant":
                raise DataError(f"{where}: predict needs conversations ending in an assistant reply (the label)")
            messages = [{"role": t.role, "content": t.content} for t in item.turns[:-1]]
            ids = prompt_ids(tokenizer, d.template, messages, item.system, template_options_of(cfg))
            ids, _ = truncate_conversation(ids, ids, len(ids), d.cutoff_len)
            rows.append(PredictRow(ids, item.system, item.turns[-1].content))
    if not rows:
        raise DataError(f"eval_dataset {', '.join(d.eval_dataset)}: no rows to predict")
    return rows


def run_predict(cfg: Config, model_path: str | None = None, log: Callable[[str], None] = print) -> PredictResult:
    """Generate for eval_dataset with `model_path` (default: model_name_or_path + adapter_name_or_path), in
    batches of per_device_eval_batch_size, and write the two result files into output_dir."""
    from longtune.generation import generate_batch, load_generation_model, resolve_model_source
    from longtune.io import atomic_write_text
    from longtune.models.loader import DTYPES
    from longtune.predict_metrics import average_similarity, segment_words

    source = resolve_model_source(model_path or cfg.model.model_name_or_path or "",
                                  None if model_path else cfg.model.adapter_name_or_path)
    model, tokenizer = load_generation_model(source, DTYPES[cfg.compute_dtype], cfg.model.trust_remote_code)
    rows = predict_rows(cfg, tokenizer)
    for row in rows:  # a label the metrics cannot segment fails now, not after all the generation
        segment_words(row.label)
    gen = cfg.generation
    batch_size = cfg.train.per_device_eval_batch_size
    torch.manual_seed(cfg.train.seed)
    start = time.perf_counter()
    replies: list[list[int]] = []
    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size]
        replies += generate_batch(model, tokenizer, [r.prompt_ids for r in batch], gen, cfg.data.template)
        log(f"predict: {len(replies)}/{len(rows)} rows")
    runtime = time.perf_counter() - start
    predictions = tokenizer.batch_decode(replies, skip_special_tokens=gen.skip_special_tokens)
    prompts = tokenizer.batch_decode([r.prompt_ids for r in rows], skip_special_tokens=False)
    labels = [r.label for r in rows]
    out = Path(cfg.train.output_dir or ".")
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": p, "predict": y, "label": label}, ensure_ascii=False)
             for p, y, label in zip(prompts, predictions, labels, strict=True)]
    atomic_write_text(out / PREDICTIONS_FILE, "".join(line + "\n" for line in lines))
    metrics = {f"predict_{k}": v for k, v in average_similarity(predictions, labels).items()}
    steps = -(-len(rows) // batch_size)
    metrics.update(predict_runtime=round(runtime, 4), predict_samples_per_second=round(len(rows) / runtime, 3),
                   predict_steps_per_second=round(steps / runtime, 3))
    atomic_write_text(out / RESULTS_FILE, json.dumps(metrics, indent=2) + "\n")
    log("predict: " + ", ".join(f"{k[len('predict_'):]} {metrics[k]:.2f}" for k in metrics if "-" in k)
        + f"  ({out / PREDICTIONS_FILE})")
    return PredictResult(out / PREDICTIONS_FILE, out / RESULTS_FILE, metrics)
