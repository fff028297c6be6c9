"""Preference pairs (stages dpo, rm) and KTO samples, loaded as Examples of two documents with exact label masks.

Each document is prompt + one reply, rendered and located like an SFT conversation (encode.py): only the reply's
assistant span, end-of-turn markers included, is trained; the prompt never is. Labels are NOT shifted.
A pair row is prompt + chosen, then prompt + rejected (the same prompt, cut the same way). A KTO row is
prompt + completion (the target, `desirable` set), then the KL document: this example's prompt with the
completion of the next example of its dataset ((i + 1) mod N), a mismatched pair whose log-ratio estimates the KL
term of KTO (Ethayarajh et al. 2024, as TRL and LLaMA-Factory build it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from longtune.data.example import TASK_OF_ROWS, DataStats, EncodeSettings, Example, MixSettings, stages_of
from longtune.data.mixing import check_mix_settings
from longtune.data.pipeline import TokenizedFile, check_encoding_inputs, load_all, split_names
from longtune.data.templates import check_template_options, resolve_chat_template, template_options_of
from longtune.errors import ConfigError

if TYPE_CHECKING:
    from longtune.config import Config


def load_pair_examples(
    cfg: Config, tokenizer, split: Literal["train", "eval"] = "train"
) -> tuple[list[Example], DataStats]:
    """Preference pairs of `dataset` (mixed by mix_strategy) or `eval_dataset` (concatenated), for dpo and rm."""
    return _load(cfg, tokenizer, split, "pairs")


def load_kto_examples(
    cfg: Config, tokenizer, split: Literal["train", "eval"] = "train"
) -> tuple[list[Example], DataStats]:
    """KTO samples of `dataset` (mixed by mix_strategy) or `eval_dataset` (concatenated), each with its KL document.

    KL documents pair within each dataset, before mixing: example i takes the completion of example (i + 1) mod N
    of the same dataset (N: its rows after skipping bad ones), so mixing moves whole examples.
    """
    return _load(cfg, tokenizer, split, "kto")


def pair_inputs(
    cfg: Config, tokenizer, split: str, rows: Literal["pairs", "kto"]
) -> tuple[list[str], EncodeSettings, MixSettings]:
    """Dataset names and settings of `split` for two-document rows (pairs: dpo/rm, kto), after the checks every
    load needs (stage, cutoff, fast tokenizer, mix settings, chat template), before any row is read."""
    stages = stages_of(rows)
    if cfg.train.stage not in stages:
        raise ConfigError(f"stage: {TASK_OF_ROWS[rows]} data is for stage {' or '.join(stages)}, "
                          f"got '{cfg.train.stage}'")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    d = cfg.data
    mixed = split == "train"
    names = split_names(d.dataset if mixed else d.eval_dataset)
    if not names:
        raise ConfigError(f"{'dataset' if mixed else 'eval_dataset'}: no dataset given")
    check_encoding_inputs(d.cutoff_len, tokenizer)
    check_template_options(d.template, template_options_of(cfg), train_on_prompt=False)
    mix = MixSettings(d.mix_strategy, tuple(d.interleave_probs), cfg.train.seed) if mixed else MixSettings(
        "concat", (), cfg.train.seed)
    check_mix_settings(mix.strategy, mix.interleave_probs, len(names))  # before any tokenizing
    settings = EncodeSettings(
        rows=rows, dataset_dir=d.dataset_dir, template=d.template,
        chat_template=resolve_chat_template(d.template, tokenizer), cutoff_len=d.cutoff_len,
        max_samples=d.max_samples, skip_bad_rows=d.skip_bad_rows, template_options=template_options_of(cfg),
    )
    return names, settings, mix


def _load(cfg: Config, tokenizer, split: str, rows: Literal["pairs", "kto"]) -> tuple[list[Example], DataStats]:
    names, settings, mix = pair_inputs(cfg, tokenizer, split, rows)
    d = cfg.data
    return load_all(names, settings, mix, tokenizer, cache_dir=d.data_cache_dir, overwrite_cache=d.overwrite_cache,
                    tokenized=TokenizedFile.of(d.tokenized_path, split))


__all__ = ["load_pair_examples", "load_kto_examples", "pair_inputs"]
