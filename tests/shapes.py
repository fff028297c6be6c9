"""Data in the shapes users have, for the parity tests: long prompts with short answers (so every trained token
of a row sits in one SP rank's zigzag chunks and the other ranks have no label at all), mixed lengths, and row
counts that leave uneven data-parallel shares. Everything is drawn from a seed and written as the JSON files a
user would pass as `dataset:`.

The builtin tokenizer encodes each word of WORDS as one token, so the row lengths below are token counts up to the
template's fixed overhead (chatml adds ~10 tokens around a turn).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from longtune.data.collate import IGNORE_INDEX
from longtune.parallel.layout import local_token_index, padded_length

WORDS = "pen map milk corn moon fire cat lion road plum cup ship duck cake sun tree".split()


@dataclass(frozen=True)
class Shape:
    """How long the parts of a row are, in words. The answer is short next to the prompt, so with
    `prompt_words` >> `answer_words` it lands in the last zigzag chunk of the row (SP rank 0)."""

    prompt_words: tuple[int, int] = (120, 140)  # inclusive range
    answer_words: tuple[int, int] = (1, 3)
    # Every `short_every`-th row is an ordinary short row (short prompt, longer answer) so that micro-batches mix
    # lengths and padding; 0 for none.
    short_every: int = 0


LONG_PROMPT = Shape()
# Rows of two documents (a pair, or a KTO example + its KL document): answers of 5-10 words sit inside zigzag chunks
# 3, 4 and 7 at sp=4 (SP ranks 1 and 2 hold no trained token), and their log-prob sums are large enough for bf16
# rounding to show. Two such documents fit in cutoff_len 256.
LONG_PROMPT_PAIRS = Shape(prompt_words=(50, 60), answer_words=(5, 10))


def _words(rng: random.Random, span: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*span)))


def _prompt_and_answer(rng: random.Random, shape: Shape, index: int) -> tuple[str, str]:
    if shape.short_every and index % shape.short_every == shape.short_every - 1:
        return _words(rng, (3, 10)), _words(rng, (8, 20))
    return _words(rng, shape.prompt_words), _words(rng, shape.answer_words)


def sft_rows(seed: int, n: int, shape: Shape = LONG_PROMPT, fmt: str = "alpaca") -> list[dict]:
    """Instruction rows (alpaca or sharegpt) with long prompts and short answers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, answer = _prompt_and_answer(rng, shape, i)
        if fmt == "alpaca":
            rows.append({"instruction": f"Which word comes last? {i}", "input": prompt, "output": answer})
        elif fmt == "sharegpt":
            rows.append({"conversations": [{"from": "human", "value": f"Which word comes last?\n{prompt}"},
                                           {"from": "gpt", "value": answer}]})
        else:
            raise ValueError(fmt)
    return rows


def preference_rows(seed: int, n: int, shape: Shape = LONG_PROMPT) -> list[dict]:
    """Alpaca preference pairs: one long prompt, a short chosen and a short rejected answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, chosen = _prompt_and_answer(rng, shape, i)
        rejected = _words(rng, shape.answer_words)
        rows.append({"instruction": f"Which word comes last? {i}", "input": prompt, "chosen": chosen,
                     "rejected": rejected})
    return rows


def kto_rows(seed: int, n: int, shape: Shape = LONG_PROMPT) -> list[dict]:
    """ShareGPT KTO rows (long prompt, short completion), desirable and undesirable mixed."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, answer = _prompt_and_answer(rng, shape, i)
        rows.append({"conversations": [{"from": "human", "value": f"Which word comes last?\n{prompt}"},
                                       {"from": "gpt", "value": answer}],
                     "kto_tag": rng.random() < 0.6})
    return rows


def pt_rows(seed: int, n: int, words: tuple[int, int] = (8, 120)) -> list[dict]:
    """Pretraining text of widely mixed lengths."""
    rng = random.Random(seed)
    return [{"text": _words(rng, words)} for _ in range(n)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def label_ranks(shifted_labels: list[int], sp_size: int) -> set[int]:
    """The SP ranks that hold at least one trained position of a row sent alone (zigzag layout)."""
    labels = torch.tensor(shifted_labels)
    padded = padded_length(labels.numel(), sp_size)
    labels = torch.nn.functional.pad(labels, (0, padded - labels.numel()), value=IGNORE_INDEX)
    return {r for r in range(sp_size) if bool((labels[local_token_index(padded, sp_size, r)] != IGNORE_INDEX).any())}
