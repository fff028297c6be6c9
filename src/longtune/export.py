"""`longtune export`: turn a run directory or checkpoint into a plain Hugging Face model directory (optionally
merging a LoRA adapter into its base) with tokenizer files, loadable by `AutoModelForCausalLM.from_pretrained`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from longtune.errors import ConfigError
from longtune.io import atomic_dir
from longtune.models.builtin import build_builtin_model, is_builtin_model

# Written into every export: the only folders `--overwrite` replaces are ones that hold it.
EXPORT_MARKER = ".longtune-export"


def find_model_dir(source: Path) -> Path:
    """A run dir means its final/ (or its newest checkpoint); a checkpoint or model dir is used as is."""
    if not source.is_dir():
        raise ConfigError(f"export: '{source}' is not a directory")
    if (source / "config.json").is_file() or (source / "adapter_config.json").is_file():
        return source
    if (source / "final").is_dir():
        return source / "final"
    from longtune.checkpoint import complete_checkpoints

    ckpts = complete_checkpoints(source)
    if ckpts:
        return ckpts[-1][1]
    raise ConfigError(f"export: '{source}' holds no model (no config.json, adapter_config.json, final/ or checkpoint-N/)")


def _run_config(model_dir: Path):
    """The run's resolved config, from its train_config.yaml when it can be found (else None)."""
    for candidate in (model_dir / "train_config.yaml", model_dir.parent / "train_config.yaml"):
        if candidate.is_file():
            from longtune.config import build_config

            values = yaml.safe_load(candidate.read_text()) or {}
            try:
                return build_config(values, str(candidate))
            except ConfigError:
                break
    return None


def _run_dtype(model_dir: Path) -> str:
    """The dtype the run trained in, from the run's train_config.yaml when it can be found."""
    cfg = _run_config(model_dir)
    return cfg.compute_dtype if cfg is not None else "float32"


QUANTIZATION_NOTE = "longtune_quantization.json"


def _quantization_of_run(model_dir: Path):
    """The ModelConfig of a run whose base was quantized (QLoRA), else None."""
    cfg = _run_config(model_dir)
    return cfg.model if cfg is not None and cfg.model.quantization_bit is not None else None


def _as_trained_base(base, quantized, dtype):
    """The base an adapter of a quantized run was trained on: quantized as in training, then dequantized to
    `dtype`, so that merging the adapter gives the function the run trained (not the full-precision base)."""
    import torch

    from longtune.models.loader import dequantize_base, quantize_base

    quantize_base(base, quantized, dtype, torch.device("cpu"))
    dequantize_base(base, dtype)
    return base


def _quantization_note(quantized, dtype_name: str, base_name: str | None) -> str:
    """What an unmerged QLoRA adapter needs to be used as trained: its base and how that base was quantized."""
    note = {"base_model_name_or_path": base_name, "quantization_method": quantized.quantization_method,
            "quantization_bit": quantized.quantization_bit, "compute_dtype": dtype_name}
    if quantized.quantization_bit == 4:
        note.update(quantization_type=quantized.quantization_type,
                    double_quantization=quantized.double_quantization)
    return json.dumps(note, indent=1) + "\n"


def _load_base(name: str, dtype, reward: bool):
    """The adapter's base: a causal LM, or for a reward-model adapter (peft SEQ_CLS) the scalar-head model."""
    if not is_builtin_model(name) and not Path(name).is_dir():
        raise ConfigError(f"export --merge-lora: base model '{name}' (from adapter_config.json) is not a local directory")
    if reward:
        from longtune.config import ModelConfig
        from longtune.models.loader import load_reward_model

        return load_reward_model(ModelConfig(model_name_or_path=name), dtype)
    if is_builtin_model(name):
        return build_builtin_model(name, dtype=dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)


def _tokenizer_length(model_dir: Path) -> int | None:
    """The length of the tokenizer saved beside an adapter (None when there is none)."""
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(model_dir)))


def check_export_target(src: Path, dst: Path, overwrite: bool) -> None:
    """Export replaces only what it wrote: never the working directory, an ancestor of the source, or a
    non-empty folder that does not hold an earlier export's marker."""
    target, here = dst.resolve(), Path.cwd().resolve()
    if target == here or target in here.parents:
        raise ConfigError(f"export: OUT_DIR '{dst}' is the current directory or one above it; give a new folder")
    if target == src.resolve() or target in src.resolve().parents:
        raise ConfigError(f"export: OUT_DIR '{dst}' holds the source '{src}'; give a folder outside it")
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"export: OUT_DIR '{dst}' exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        if not (dst / EXPORT_MARKER).is_file():
            raise ConfigError(f"export: OUT_DIR '{dst}' is not empty and holds no earlier export ({EXPORT_MARKER}); "
                              "longtune never replaces other files; give a new or empty folder")
        if not overwrite:
            raise ConfigError(f"export: '{dst}' holds an earlier export (pass --overwrite to replace it)")


def export_model(source: str | Path, out: str | Path, merge_lora: bool = False, overwrite: bool = False,
                 base: str | None = None) -> Path:
    """Write `out` from a run, checkpoint or model/adapter directory; with `merge_lora` an adapter is merged into
    `base` (default: the base named in its adapter_config.json, as LLaMA-Factory's model_name_or_path +
    adapter_name_or_path export)."""
    from longtune.models.loader import DTYPES

    from longtune.checkpoint import TRAINING_FILES

    src = find_model_dir(Path(source))
    dst = Path(out)
    check_export_target(src, dst, overwrite)
    is_adapter = (src / "adapter_config.json").is_file()
    if base is not None and not (is_adapter and merge_lora):
        raise ConfigError("export: --base applies to merging an adapter (--merge-lora on an adapter directory)")
    with atomic_dir(dst, f".tmp-export-{dst.name}") as tmp:
        if is_adapter and merge_lora:
            from peft import PeftModel

            adapter_cfg = json.loads((src / "adapter_config.json").read_text())
            base_name = base or adapter_cfg.get("base_model_name_or_path")
            if not base_name:
                raise ConfigError(f"export: {src / 'adapter_config.json'} names no base_model_name_or_path; give "
                                  "--base MODEL_DIR")
            dtype = DTYPES[_run_dtype(src)]
            reward = adapter_cfg.get("task_type") == "SEQ_CLS"
            base_model = _load_base(base_name, dtype, reward)
            grown_vocabulary = _tokenizer_length(src)
            if grown_vocabulary is not None:  # a run that added tokens saved embeddings of the grown size
                from longtune.models.loader import resize_model_vocabulary

                resize_model_vocabulary(base_model, grown_vocabulary)
            quantized = _quantization_of_run(src)
            if quantized is not None:
                base_model = _as_trained_base(base_model, quantized, dtype)
            merged = PeftModel.from_pretrained(base_model, str(src)).merge_and_unload()
            merged.save_pretrained(str(tmp), safe_serialization=True)
            for f in src.iterdir():
                if f.is_file() and ("token" in f.name or f.name in {"vocab.json", "merges.txt", "chat_template.jinja"}):
                    shutil.copy2(f, tmp / f.name)
        else:
            for f in src.iterdir():
                if f.is_file() and f.name not in TRAINING_FILES and f.name != EXPORT_MARKER:
                    shutil.copy2(f, tmp / f.name)
            quantized = _quantization_of_run(src) if is_adapter else None
            if quantized is not None:
                base_name = json.loads((src / "adapter_config.json").read_text()).get("base_model_name_or_path")
                (tmp / QUANTIZATION_NOTE).write_text(_quantization_note(quantized, _run_dtype(src), base_name))
        (tmp / EXPORT_MARKER).write_text(json.dumps({"source": str(src.resolve())}) + "\n")
    return dst
