"""QLoRA: a bitsandbytes 4-bit (nf4/fp4, double quantization) or 8-bit base with LoRA adapters on top, in one
process and under SP/FSDP, with DPO's adapters-disabled reference and the merged export into the dequantized base."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from longtune.config import ModelConfig, load_config
from longtune.models.loader import apply_finetuning, load_model, load_tokenizer, quantize_base
from longtune.trainer import train
from tests.conftest import base_overrides
from tests.launch import launch, metric_rows
from tests.test_errors import expect_one_line

bnb = pytest.importorskip("bitsandbytes")

QUANTIZED = [
    ("builtin_nf4_double", "builtin:tiny", dict(quantization_bit=4)),
    ("llama_fp4_single", "llama", dict(quantization_bit=4, quantization_type="fp4", double_quantization=False)),
    ("llama_int8", "llama", dict(quantization_bit=8)),
    ("builtin_nf4_dora", "builtin:tiny", dict(quantization_bit=4, use_dora=True)),
]


def _model_path(name: str, saved_models) -> str:
    return name if name.startswith("builtin:") else str(saved_models[name])


def _batch(tokenizer, n: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (n, 24))
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize("label,model,keys", QUANTIZED, ids=[q[0] for q in QUANTIZED])
def test_quantized_base_trains_only_its_adapters(label, model, keys, saved_models):
    """Every linear layer but the head is a bitsandbytes layer of the asked kind; a few AdamW steps on it lower
    the loss and change the LoRA matrices and nothing else (packed weights, quantization constants, biases, norms,
    embeddings are bit-identical)."""
    model_cfg = ModelConfig(model_name_or_path=_model_path(model, saved_models), lora_rank=4, **keys)
    base = load_model(model_cfg, torch.float32)
    linear_names = {n for n, m in base.named_modules() if type(m) is torch.nn.Linear
                    and m is not base.get_output_embeddings()}
    assert quantize_base(base, model_cfg, torch.float32, torch.device("cpu")) == len(linear_names) > 0
    for name in linear_names:
        layer = base.get_submodule(name)
        if model_cfg.quantization_bit == 4:
            assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch.uint8
            assert layer.weight.quant_state.quant_type == model_cfg.quantization_type
            assert layer.weight.quant_state.nested == model_cfg.double_quantization
            assert layer.weight.numel() * 2 == layer.in_features * layer.out_features  # two 4-bit codes a byte
        else:
            assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
    assert type(base.get_output_embeddings()) is torch.nn.Linear  # the head stays in full precision
    model = apply_finetuning(base, model_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = _batch(load_tokenizer(model_cfg))
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_b = {k for k in before if "lora_B" in k}
    assert lora_b <= changed  # B starts at zero, so every trained B moved
    assert all("lora_" in k for k in changed), sorted(changed - {k for k in changed if "lora_" in k})[:5]


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_base_computes_what_the_quantized_one_does(bits, saved_models):
    """The export's dequantized base (plain nn.Linear layers) gives the quantized base's logits to float32
    rounding on CPU (bitsandbytes' CPU kernels dequantize the same way; measured 0 for 4-bit, 2e-7 for 8-bit),
    and differs from the full-precision model (6e-2 of the logit scale for 4-bit, 4e-3 for 8-bit), so the check
    can fail."""
    tol = 1e-5
    from longtune.models.loader import dequantize_base

    model_cfg = ModelConfig(model_name_or_path=str(saved_models["llama"]), quantization_bit=bits)
    ids = _batch(load_tokenizer(model_cfg), n=2)["input_ids"]
    quantized = load_model(model_cfg, torch.float32).eval()
    with torch.no_grad():
        full = quantized(ids).logits
        quantize_base(quantized, model_cfg, torch.float32, torch.device("cpu"))
        want = quantized(ids).logits
        assert dequantize_base(quantized, torch.float32) > 0
        assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in quantized.modules())
        got = quantized(ids).logits
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= tol * scale
    assert float((full - want).abs().max()) > 2 * float((got - want).abs().max())


def _sft_overrides(alpaca_file: Path, out: Path, **extra) -> list[str]:
    values = dict(dtype="float32", finetuning_type="lora", quantization_bit=4, learning_rate=5e-3, lora_rank=4)
    values.update(extra)
    return base_overrides(alpaca_file, out, **values)


def test_qlora_run_merged_export_reproduces_quantized_base_plus_adapter(alpaca_file, tmp_path):
    """A 4-bit run's loss falls; `export --merge-lora` writes a plain model whose logits equal the 4-bit base
    with the trained adapter (not the full-precision base plus adapter); without --merge-lora the adapter comes
    with a note of its base and quantization."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longtune.cli import main

    cfg = load_config(None, _sft_overrides(alpaca_file, tmp_path / "run", max_steps=8, learning_rate=2e-2))
    result = train(cfg, log=lambda _: None)
    losses = [r["loss"] for r in result.metrics]
    assert losses[-1] < losses[0] - 0.3, losses
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert not any("lora" in k for k in merged.state_dict())
    # The trained function: the base quantized exactly as in training, the saved adapter on top.
    quantized = load_model(cfg.model, torch.float32)
    quantize_base(quantized, cfg.model, torch.float32, torch.device("cpu"))
    trained = PeftModel.from_pretrained(quantized, str(tmp_path / "run" / "final")).eval()
    full_precision = PeftModel.from_pretrained(load_model(cfg.model, torch.float32),
                                               str(tmp_path / "run" / "final")).eval()
    ids = _batch(load_tokenizer(cfg.model), n=2)["input_ids"]
    with torch.no_grad():
        want, got, unquantized = trained(ids).logits, merged.eval()(ids).logits, full_precision(ids).logits
    assert float((got - want).abs().max()) <= 1e-3
    assert float((unquantized - want).abs().max()) > 1e-2  # the test can tell the two bases apart
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "adapter")]) == 0
    note = json.loads((tmp_path / "adapter" / "longtune_quantization.json").read_text())
    assert note == {"base_model_name_or_path": "builtin:tiny", "quantization_method": "bnb", "quantization_bit": 4,
                    "compute_dtype": "float32", "quantization_type": "nf4", "double_quantization": True}
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_qlora_dpo_first_loss_is_ln2(tmp_path, alpaca_file):
    """DPO on a 4-bit base: the reference is the same quantized base with adapters disabled, so step 1 (B = 0)
    has policy == reference and the loss is ln 2."""
    overrides = base_overrides(alpaca_file, tmp_path / "dpo", stage="dpo", dataset="builtin:dpo_demo",
                               max_samples=8, cutoff_len=64, dtype="float32", finetuning_type="lora",
                               quantization_bit=4, max_steps=1, per_device_train_batch_size=2)
    result = train(load_config(None, overrides), log=lambda _: None)
    assert abs(result.metrics[0]["loss"] - math.log(2)) <= 1e-6, result.metrics[0]


def test_qlora_resume_is_exact(alpaca_file, tmp_path):
    """Stop after checkpoint-3 of a 4-bit run and resume: the adapters reload onto a freshly quantized base and the
    losses of steps 4-6 equal the uninterrupted run's."""
    from tests.launch import crash_after_save

    common = dict(max_steps=6, save_steps=3)
    full = train(load_config(None, _sft_overrides(alpaca_file, tmp_path / "full", **common)), log=lambda _: None)
    cut = _sft_overrides(alpaca_file, tmp_path / "cut", **common)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, cut), log=lambda _: None, callbacks=crash_after_save(3))
    train(load_config(None, [*cut, "resume_from_checkpoint=true"]), log=lambda _: None)
    assert [r["loss"] for r in metric_rows(tmp_path / "cut")] == [r["loss"] for r in full.metrics]


def _losses_and_adapter(out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [r["loss"] for r in metric_rows(out)], load_file(str(out / "final" / "adapter_model.safetensors"))


def _assert_close(ref, got, label: str, rel: float = 1e-5) -> None:
    (ref_losses, ref_adapter), (losses, adapter) = ref, got
    assert len(losses) == len(ref_losses) == 3, label
    assert all(abs(a - b) <= rel * abs(b) for a, b in zip(losses, ref_losses)), (label, losses, ref_losses)
    assert adapter.keys() == ref_adapter.keys()
    worst = max(float((adapter[k] - ref_adapter[k]).abs().max() / ref_adapter[k].abs().max()) for k in adapter)
    assert worst <= 1e-4, (label, worst)  # Adam's normalised steps amplify float32 rounding of tiny gradients


SP_VARIANTS = [
    ("sp2_ring", 2, 2, {"sequence_parallel_size": 2, "sequence_parallel_mode": "zigzag_ring"}),
    ("sp2_ulysses", 2, 2, {"sequence_parallel_size": 2, "sequence_parallel_mode": "ulysses"}),
    ("sp2_llama3", 2, 2, {"sequence_parallel_size": 2, "sequence_parallel_mode": "llama3"}),
    ("sp4_hybrid", 4, 2, {"sequence_parallel_size": 4, "sequence_parallel_mode": "hybrid"}),
    ("sp4_ring", 4, 2, {"sequence_parallel_size": 4, "sequence_parallel_mode": "zigzag_ring"}),
    ("dp2", 2, 1, {}),
]
CI_VARIANTS = {"sp2_ring"}


@pytest.fixture(scope="module")
def qlora_reference(alpaca_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora_sp") / "ref"
    # One process, in this process (the parallel runs go through torchrun and the CLI).
    train(load_config(None, _sft_overrides(alpaca_file, out, packing=True, per_device_train_batch_size=2,
                                           gradient_accumulation_steps=2)), log=lambda _: None)
    return _losses_and_adapter(out)


@pytest.mark.parametrize("name,nproc,bs,extra", [
    pytest.param(*v, marks=() if v[0] in CI_VARIANTS else pytest.mark.slow, id=v[0]) for v in SP_VARIANTS])
def test_qlora_under_sp_and_dp_matches_one_process(qlora_reference, alpaca_file, tmp_path, name, nproc, bs, extra):
    """QLoRA with several processes (FSDP2 shards the adapters and the unquantized rest; the quantized layers stay
    whole on every rank) equals one process, for every SP mode and for data parallelism."""
    out = tmp_path / name
    launch(nproc, _sft_overrides(alpaca_file, out, packing=True, per_device_train_batch_size=bs,
                                 gradient_accumulation_steps=2, **extra))
    _assert_close(qlora_reference, _losses_and_adapter(out), name)


@pytest.mark.parametrize("extra,pattern", [
    (dict(quantization_bit=3), r"key 'quantization_bit' must be 4 or 8 .*got 3"),
    (dict(quantization_bit=4, finetuning_type="full"), r"key 'quantization_bit' needs finetuning_type: lora"),
    (dict(quantization_bit=4, quantization_method="gptq"), r"key 'quantization_method' must be one of bnb"),
    (dict(quantization_bit=4, quantization_type="int4"), r"key 'quantization_type' must be one of nf4, fp4"),
    (dict(quantization_bit=4, dtype="float64"), r"key 'quantization_bit' cannot compute in float64"),
], ids=["bit3", "full", "gptq", "int4", "float64"])
def test_bad_quantization_keys_are_one_line(capsys, alpaca_file, tmp_path, extra, pattern):
    values = dict(dtype="float32", finetuning_type="lora")
    values.update(extra)
    expect_one_line(capsys, ["train", *base_overrides(alpaca_file, tmp_path / "bad", **values)], pattern)


def test_missing_bitsandbytes_is_one_line(capsys, alpaca_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    expect_one_line(capsys, ["train", *_sft_overrides(alpaca_file, tmp_path / "nobnb")],
                    r"key 'quantization_bit': needs bitsandbytes, which is not installed; pip install 'longtune\[quant\]'")


def test_prequantized_model_is_one_line(capsys, alpaca_file, tmp_path, saved_models):
    import shutil

    model = tmp_path / "gptq_model"
    shutil.copytree(saved_models["llama"], model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model / "config.json").write_text(json.dumps(config))
    expect_one_line(capsys, ["train", *_sft_overrides(alpaca_file, tmp_path / "pre", model_name_or_path=str(model))],
                    r"key 'model_name_or_path': '.*gptq_model' is already quantized \(gptq\)")


def test_estimate_models_quantized_weights():
    """The estimate's params term of a QLoRA run: the layers' linear weights P_q move from bf16 (frozen copy +
    autocast compute copy, 2 + 2 bytes) to 0.5 byte + nf4 block constants (1/64 + 4/(64*256) bytes, double
    quantization) or 1 byte (8-bit); the longest length that fits grows."""
    from dataclasses import replace

    from longtune.estimate import (MemoryBudget, TrainSetup, estimate_memory, lora_trainable_params,
                                   max_cutoff_len, shape_from_name_or_path)

    shape = shape_from_name_or_path("llama-3.1-8b")
    h, kv, i = 4096, 1024, 14336
    linear = 32 * (2 * h * h + 2 * h * kv + 3 * h * i)
    lora = TrainSetup(tokens=8192, dtype="bfloat16", trainable_params=lora_trainable_params(shape, 16, None))
    plain = estimate_memory(shape, lora).components["params"]
    for bits, double, per_param in ((4, True, 0.5 + (1 + 4 / 256) / 64), (4, False, 0.5 + 4 / 64), (8, True, 1.0)):
        quant = replace(lora, quantization_bit=bits, double_quantization=double)
        params = estimate_memory(shape, quant).components["params"]
        assert plain - params == 4 * linear - int(linear * per_param), (bits, double)
    budget = MemoryBudget(80 * 2**30)
    longest = max_cutoff_len(shape, replace(lora, quantization_bit=4), budget).cutoff_len
    assert longest > max_cutoff_len(shape, lora, budget).cutoff_len


def test_precomputed_reference_cache_tells_quantized_bases_apart(alpaca_file, tmp_path):
    """Reference log-probs of a 4-bit base are not those of its bf16 weights: the cache key differs (and is
    unchanged for runs without quantization)."""
    from longtune.reference import reference_fingerprint

    def key(**extra):
        return reference_fingerprint(load_config(None, _sft_overrides(alpaca_file, tmp_path, **extra)), [])

    assert len({key(), key(quantization_type="fp4"), key(double_quantization=False), key(quantization_bit=8),
                key(quantization_bit="null")}) == 5


@pytest.mark.cuda
@pytest.mark.parametrize("extra", [dict(quantization_bit=4, bf16=True), dict(quantization_bit=8, bf16=True),
                                   dict(quantization_bit=4, fp16=True)], ids=["nf4_bf16", "int8_bf16", "nf4_fp16"])
def test_cuda_qlora_trains(alpaca_file, tmp_path, extra):
    """On a GPU: the base is quantized on the device (bitsandbytes' CUDA kernels) and a bf16 / fp16 QLoRA run's
    loss falls; fp16 runs report their loss scale."""
    overrides = _sft_overrides(alpaca_file, tmp_path / "q", dtype="auto", learning_rate=2e-2, max_steps=6, **extra)
    rows = train(load_config(None, overrides), log=lambda _: None).metrics
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0], losses
    assert ("loss_scale" in rows[0]) == bool(extra.get("fp16"))
