"""Packed rows never leak across documents: each document's loss inside a packed row equals its loss alone."""

from __future__ import annotations

import torch

from longtune.config import ParallelConfig
from longtune.data import load_examples
from longtune.data.collate import collate
from longtune.data.packing import pack_examples
from longtune.models.builtin import build_builtin_model, load_builtin_tokenizer
from longtune.parallel.mesh import ParallelDims
from longtune.parallel.sequence import SequenceParallel
from longtune.stages.lm import final_hidden_states


def test_document_losses_in_packed_row_equal_losses_alone(alpaca_file):
    tok = load_builtin_tokenizer()
    examples, _ = load_examples([str(alpaca_file)], dataset_dir=".", tokenizer=tok, template="chatml",
                                stage="sft", cutoff_len=96)
    examples = examples[:8]
    rows, stats = pack_examples(examples, capacity=160)
    assert any(len(r.doc_lengths) >= 2 for r in rows), "test needs rows with several documents"

    model = build_builtin_model("builtin:tiny", dtype=torch.float64)
    model.set_attn_implementation("sdpa")  # float64 throughout (eager softmaxes in fp32)
    alone = {}
    with torch.no_grad():
        for i, e in enumerate(examples):
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
            targets = torch.tensor(e.labels[1:])
            alone[tuple(e.input_ids)] = torch.nn.functional.cross_entropy(
                logits, targets, ignore_index=-100, reduction="sum")

    dims = ParallelDims(dp=1, sp=1)
    sequence = SequenceParallel(dims, ParallelConfig(), model.config, packed=True, log=lambda _: None)
    sequence.apply(model)
    seen = 0
    with torch.no_grad():
        for row in rows:
            batch = collate([row], pad_token_id=0)
            inputs = sequence.prepare(batch, 0, torch.device("cpu"))
            hidden = final_hidden_states(model, inputs)[0]
            logits = model.lm_head(hidden)
            token_loss = torch.nn.functional.cross_entropy(logits, inputs.labels[0], ignore_index=-100,
                                                           reduction="none")
            start = 0
            for n in row.doc_lengths:
                ids = tuple(row.input_ids[start : start + n])
                doc_loss = token_loss[start : start + n].sum()
                assert abs(float(doc_loss) - float(alone[ids])) <= 1e-10 * max(1.0, float(alone[ids]))
                start += n
                seen += 1
    assert seen == len(examples)
