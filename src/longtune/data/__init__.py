"""Datasets to training examples: the public surface of the data package.

`examples_from_config` (sft, pt), `load_pair_examples` (dpo, rm), `load_kto_examples` (kto) load in memory;
`streaming.training_stream` reads the same examples as a stream. All go through pipeline.py, which turns rows
into `Example`s; lm.py and preference.py check their settings. Labels are NOT shifted (labels[t] == input_ids[t]
where trained, else -100); collate shifts them.
"""

from __future__ import annotations

from longtune.data.encode import IGNORE_INDEX
from longtune.data.example import DataStats, EncodeSettings, Example, MixSettings, RowKind
from longtune.data.lm import examples_from_config, load_examples
from longtune.data.preference import load_kto_examples, load_pair_examples

__all__ = [
    "Example",
    "DataStats",
    "EncodeSettings",
    "MixSettings",
    "RowKind",
    "IGNORE_INDEX",
    "load_examples",
    "examples_from_config",
    "load_pair_examples",
    "load_kto_examples",
]
