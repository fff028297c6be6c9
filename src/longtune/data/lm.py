"""sft/pt loads (rows of kind "lm"): their settings from keyword arguments or a config, checked before any row
is read, and the in-memory load through the pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from longtune.data.example import DataStats, EncodeSettings, Example, MixSettings, stage_rows, stages_of
from longtune.data.mixing import check_mix_settings
from longtune.data.pipeline import (
    TokenizedFile,
    check_encoding_inputs,
    load_all,
    optional_chat_template,
    split_names,
)
from longtune.data.templates import TemplateOptions, check_template_options, template_options_of
from longtune.errors import ConfigError

if TYPE_CHECKING:
    from longtune.config import Config


def load_examples(
    datasets: list[str], *, cache_dir: str | None = None, overwrite_cache: bool = False, **options: Any
) -> tuple[list[Example], DataStats]:
    """sft/pt examples from `datasets` (max_samples caps each), mixed by `mix_strategy`, and counts of what
    happened to rows: the keyword form of `examples_from_config` (`options`: the keywords of `lm_inputs`).

    sft: conversations only, assistant turns trained (all tokens with train_on_prompt), over-long rows cut
    keeping the last response. pt: texts (+eos) and rendered conversations, all trained, cut into pieces.
    A row is dropped when no label at position >= 1 is trained: position 0 never is a target after the shift.
    A malformed row raises DataError naming file and row, or with skip_bad_rows is left out and counted.
    The result is cached under `cache_dir` (default: see cache.default_cache_dir) keyed by every input that
    shapes it; a second identical call loads it without tokenizing unless `overwrite_cache`.
    """
    names, settings, mix = lm_inputs(datasets, **options)
    return load_all(names, settings, mix, options["tokenizer"], cache_dir=cache_dir, overwrite_cache=overwrite_cache)


def lm_inputs(
    datasets: list[str],
    *,
    dataset_dir: str,
    tokenizer,
    template: str,
    stage: str,
    cutoff_len: int,
    train_on_prompt: bool = False,
    max_samples: int | None = None,
    mix_strategy: str = "concat",
    interleave_probs: tuple[float, ...] = (),
    seed: int = 42,
    skip_bad_rows: bool = False,
    template_options: TemplateOptions = TemplateOptions(),
) -> tuple[list[str], EncodeSettings, MixSettings]:
    """Dataset names and settings of an sft/pt load, after the checks it needs before any row is read."""
    check_template_options(template, template_options, train_on_prompt=train_on_prompt)
    lm_stages = stages_of("lm")
    if stage not in lm_stages:
        raise ConfigError(f"stage: load_examples handles {', '.join(lm_stages)}, got '{stage}'")
    check_encoding_inputs(cutoff_len, tokenizer)
    names = split_names(datasets)
    if not names:
        raise ConfigError("dataset: no dataset given")
    mix = MixSettings(mix_strategy, tuple(interleave_probs), seed)
    check_mix_settings(mix.strategy, mix.interleave_probs, len(names))  # before any tokenizing
    settings = EncodeSettings(
        rows="lm", dataset_dir=dataset_dir, template=template,
        chat_template=optional_chat_template(template, tokenizer), cutoff_len=cutoff_len,
        pretraining=stage_rows()[stage][1], train_on_prompt=train_on_prompt, max_samples=max_samples,
        skip_bad_rows=skip_bad_rows, template_options=template_options,
    )
    return names, settings, mix


def config_lm_inputs(
    cfg: Config, tokenizer, split: Literal["train", "eval"] = "train"
) -> tuple[list[str], EncodeSettings, MixSettings]:
    """`lm_inputs` with every data key of `cfg`: `train` reads `dataset` mixed by mix_strategy, `eval` reads
    `eval_dataset` concatenated (each example once)."""
    d = cfg.data
    mixed = split == "train"
    return lm_inputs(
        list(d.dataset if mixed else d.eval_dataset), dataset_dir=d.dataset_dir, tokenizer=tokenizer,
        template=d.template, stage=cfg.train.stage, cutoff_len=d.cutoff_len, train_on_prompt=d.train_on_prompt,
        max_samples=d.max_samples, mix_strategy=d.mix_strategy if mixed else "concat",
        interleave_probs=tuple(d.interleave_probs) if mixed else (), seed=cfg.train.seed,
        skip_bad_rows=d.skip_bad_rows, template_options=template_options_of(cfg),
    )


def examples_from_config(
    cfg: Config, tokenizer, split: Literal["train", "eval"] = "train"
) -> tuple[list[Example], DataStats]:
    """The sft/pt examples of `split` with every data key of `cfg`: the one call the trainer and `longtune data`
    share. `train` loads `dataset` mixed by mix_strategy; `eval` loads `eval_dataset` concatenated."""
    names, settings, mix = config_lm_inputs(cfg, tokenizer, split)
    d = cfg.data
    return load_all(names, settings, mix, tokenizer, cache_dir=d.data_cache_dir, overwrite_cache=d.overwrite_cache,
                    tokenized=TokenizedFile.of(d.tokenized_path, split))
