"""End-to-end training on builtin:tiny in float64: exact accumulation, exact resume, finetuning types, export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longtune.config import load_config
from longtune.trainer import train
from tests.conftest import base_overrides
from tests.launch import crash_after_save


def _run(data: Path, out: Path, callbacks=None, **kw):
    cfg = load_config(None, base_overrides(data, out, **kw))
    return train(cfg, log=lambda _: None, callbacks=callbacks)


def _losses(result) -> list[float]:
    return [r["loss"] for r in result.metrics if "loss" in r]


def _params(model_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def _max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)


def test_gradient_accumulation_is_exact(alpaca_file, tmp_path):
    runs = {}
    for bs, ga in ((4, 1), (1, 4), (2, 2)):
        res = _run(alpaca_file, tmp_path / f"bs{bs}ga{ga}", per_device_train_batch_size=bs,
                   gradient_accumulation_steps=ga, max_grad_norm=0.5)
        runs[(bs, ga)] = (_losses(res), _params(res.final_dir))
    ref_losses, ref_params = runs[(4, 1)]
    assert len(ref_losses) == 3
    assert ref_losses[-1] < ref_losses[0]
    for key in ((1, 4), (2, 2)):
        losses, params = runs[key]
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-10 * abs(b), (key, losses, ref_losses)
        assert _max_rel(params, ref_params) <= 1e-10, key


def test_step_loss_equals_token_weighted_hf_loss(alpaca_file, tmp_path):
    """Independent check: one step over all rows equals the loss from the HF model's full logits, summed over
    every trained token of every row and divided by their count."""
    from longtune.data import load_examples
    from longtune.models.builtin import build_builtin_model, load_builtin_tokenizer

    res = _run(alpaca_file, tmp_path / "one", per_device_train_batch_size=24, max_steps=1)
    tok = load_builtin_tokenizer()
    examples, _ = load_examples([str(alpaca_file)], dataset_dir=".", tokenizer=tok, template="chatml", stage="sft",
                                cutoff_len=96)
    model = build_builtin_model("builtin:tiny", dtype=torch.float64)
    model.set_attn_implementation("sdpa")  # float64 throughout (eager softmaxes in fp32)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            labels = torch.tensor([e.labels])
            logits = model(input_ids=ids).logits[0, :-1]  # full float64 logits (HF's own loss upcasts to fp32 only)
            targets = labels[0, 1:]
            total += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    assert res.metrics[0]["tokens"] == count
    assert abs(res.metrics[0]["loss"] - total / count) <= 1e-12 * (total / count)


def test_resume_continues_exactly(alpaca_file, tmp_path):
    kw = dict(max_steps=6, save_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    full = _losses(_run(alpaca_file, tmp_path / "full", **kw))

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _run(alpaca_file, out, callbacks=crash_after_save(3), **kw)

    # A later checkpoint that was left half-written (no optimizer file, manifest lies) must be ignored, as must
    # an interrupted temp dir.
    shutil.copytree(out / "checkpoint-3", out / "checkpoint-5")
    (out / "checkpoint-5" / "optimizer.pt").unlink()
    (out / ".tmp-checkpoint-4-abc").mkdir()

    resumed = _run(alpaca_file, out, resume_from_checkpoint=True, **kw)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows if "loss" in r] == full  # bit-exact in float64 on CPU
    assert _losses(resumed)[3:] == full[3:]


def test_callbacks_see_every_step_and_every_checkpoint(alpaca_file, tmp_path):
    """The loop's public hooks: on_step_end for every step (logged or not), on_save with each checkpoint."""
    from longtune.trainer import TrainCallbacks

    steps, saves = [], []
    callbacks = TrainCallbacks(on_step_end=lambda step, row: steps.append((step, row["loss"])),
                               on_save=lambda step, path: saves.append((step, path.name, path.is_dir())))
    res = _run(alpaca_file, tmp_path / "hooks", callbacks=callbacks, max_steps=4, logging_steps=3, save_steps=2)
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    logged = {r["step"]: r["loss"] for r in res.metrics if "loss" in r}
    assert sorted(logged) == [1, 3, 4]
    assert all(loss == logged[s] for s, loss in steps if s in logged)
    assert saves == [(2, "checkpoint-2", True), (4, "checkpoint-4", True)]


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("ftype", ["full", "freeze", "lora", "dora"])
def test_finetuning_types_train_only_their_parameters(alpaca_file, tmp_path, ftype):
    from longtune.models.builtin import build_builtin_model

    extra = {"finetuning_type": "lora", "use_dora": True} if ftype == "dora" else {"finetuning_type": ftype}
    if ftype == "freeze":
        extra["freeze_trainable_layers"] = 1
    res = _run(alpaca_file, tmp_path / ftype, max_steps=6, learning_rate=3e-3, per_device_train_batch_size=24,
               lr_scheduler_type="constant", **extra)
    losses = _losses(res)
    assert losses[-1] < losses[0] - 0.05, losses  # same 24 rows every step: loss must fall
    base = build_builtin_model("builtin:tiny", dtype=torch.float64).state_dict()
    if ftype in ("lora", "dora"):
        adapter = load_file(str(res.final_dir / "adapter_model.safetensors"))
        assert adapter, "adapter file is empty"
        assert all("lora_" in k for k in adapter)
        # every linear except the head got an adapter
        targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter}
        assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        if ftype == "dora":
            assert any("lora_magnitude_vector" in k for k in adapter)
        return
    after = _params(res.final_dir)
    changed = _changed(base, after)
    if ftype == "full":
        assert changed == set(base), set(base) - changed
    else:
        assert changed and all(k.startswith("model.layers.1.") for k in changed), changed
        assert changed == {k for k in base if k.startswith("model.layers.1.")}


def test_lora_merge_export_matches_adapter_logits(alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longtune.cli import main
    from longtune.models.builtin import build_builtin_model

    res = _run(alpaca_file, tmp_path / "lora", finetuning_type="lora", max_steps=3, learning_rate=5e-3,
               dtype="float32")
    assert main(["export", str(res.output_dir), str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = build_builtin_model("builtin:tiny", dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(res.final_dir))
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = with_adapter(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = build_builtin_model("builtin:tiny", dtype=torch.float32)(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5
    assert (want - plain).abs().max() > 1e-4  # the adapter really changed the model
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_saved_hf_models_train_and_export(saved_models, alpaca_file, tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longtune.cli import main

    res = _run(alpaca_file, tmp_path / arch, model_name_or_path=str(saved_models[arch]), max_steps=3,
               per_device_train_batch_size=4, gradient_checkpointing=True, finetuning_type="full")
    assert len(_losses(res)) == 3
    assert main(["export", str(res.output_dir), str(tmp_path / "exp")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exp", dtype=torch.float64)
    AutoTokenizer.from_pretrained(tmp_path / "exp")
    trained = _params(res.final_dir)
    for name, value in model.state_dict().items():
        if name in trained:
            assert torch.equal(value, trained[name]), name
    assert not (tmp_path / "exp" / "optimizer.pt").exists()


def test_run_directory_contents(alpaca_file, tmp_path):
    res = _run(alpaca_file, tmp_path / "r", max_steps=4, save_steps=2, save_total_limit=1, val_size=4,
               eval_steps=2, plot_loss=True, report_to="tensorboard")
    out = res.output_dir
    assert (out / "train_config.yaml").is_file() and (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in eval_rows] == [2, 4]
    for key in ("step", "epoch", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "peak_mem_gib"):
        assert all(key in r for r in train_rows), key
    assert train_rows[0]["lr"] == 0.0 and train_rows[1]["lr"] == pytest.approx(1e-3)  # warmup_steps=1, HF style
    assert any((out / "runs").iterdir())
    # the config written is the resolved one and reloads to the same values
    again = load_config(out / "train_config.yaml")
    assert again.train.max_steps == 4 and again.model.dtype == "float64"


def test_tiled_mlp_and_offload_keys_give_the_same_training(alpaca_file, tmp_path):
    """tiled_mlp_tokens / offload_activations change memory, not numbers (float64, 3 steps)."""
    ref = _run(alpaca_file, tmp_path / "plain", per_device_train_batch_size=4, gradient_checkpointing=True)
    tiled = _run(alpaca_file, tmp_path / "tiled", per_device_train_batch_size=4, gradient_checkpointing=True,
                 tiled_mlp_tokens=7, offload_activations=True)
    for a, b in zip(_losses(tiled), _losses(ref)):
        assert abs(a - b) <= 1e-10 * abs(b)
    assert _max_rel(_params(tiled.final_dir), _params(ref.final_dir)) <= 1e-10
