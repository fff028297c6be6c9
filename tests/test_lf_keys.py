"""LLaMA-Factory keys: every one is classified (and the docs/README tables are generated from that), refused ones
name the key, accepted ones print a notice, translated ones set the longtune key; and the keys with real semantics
(optim, lr_scheduler_kwargs, save_strategy, report_to, tf32, .txt data, interleave_probs: null) do what
Hugging Face / LLaMA-Factory do."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from longtune.cli import main
from longtune.config import KEY_TO_GROUP, build_config
from longtune.errors import ConfigError
from longtune.lf_keys import ACCEPTED, LF_DEFAULTS, REFUSED, TRANSLATED, classify
from tests.conftest import base_overrides

ROOT = Path(__file__).resolve().parent.parent
BASE = {"model_name_or_path": "builtin:tiny", "dataset": "builtin:sft_demo", "output_dir": "out"}


def test_every_llamafactory_key_is_classified_and_the_tables_are_generated_from_it():
    keys = frozenset(KEY_TO_GROUP)
    assert [k for k in LF_DEFAULTS if classify(k, keys) is None] == []
    assert len(LF_DEFAULTS) > 340  # LLaMA-Factory 0.9.5's own arguments + transformers' training arguments
    # Only LLaMA-Factory's names are classified (a typo in the tables would classify nothing).
    assert [k for k in (*ACCEPTED, *REFUSED, *TRANSLATED) if k not in LF_DEFAULTS] == []
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_config_docs
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "llamafactory_keys.md").read_text() == gen_config_docs.render_lf_keys(), \
        "docs/llamafactory_keys.md is stale: run `make docs`"
    readme = (ROOT / "README.md").read_text()
    assert gen_config_docs.render_readme_lf_table() in readme, "README's LLaMA-Factory table is stale: `make docs`"


def test_refused_llamafactory_key_names_the_key_not_a_did_you_mean():
    with pytest.raises(ConfigError) as exc:
        build_config({**BASE, "ray_num_workers": 4}, source="lf.yaml")
    assert str(exc.value).startswith("lf.yaml: LLaMA-Factory key 'ray_num_workers' is not supported (Ray")
    assert "did you mean" not in str(exc.value)
    # At LLaMA-Factory's default the key asks for nothing: accepted silently.
    cfg = build_config({**BASE, "ray_num_workers": 1, "use_galore": False, "hub_model_id": None, "apollo_scale": 32})
    assert cfg.notices == ()
    # 0 is a value, not "false": a block index of 0 asks for BAdam.
    with pytest.raises(ConfigError, match="LLaMA-Factory key 'badam_start_block' is not supported"):
        build_config({**BASE, "badam_start_block": 0})
    # A key neither knows keeps the did-you-mean.
    with pytest.raises(ConfigError, match=r"unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        build_config({**BASE, "lerning_rate": 1e-4})


def test_accepted_llamafactory_keys_print_one_notice_only_when_not_at_default(tmp_path, capsys):
    cfg = build_config({**BASE, "flash_attn": "fa2", "upcast_layernorm": True, "enable_liger_kernel": False})
    assert cfg.notices == (f"notice: LLaMA-Factory key 'flash_attn': {ACCEPTED['flash_attn']}",
                           f"notice: LLaMA-Factory key 'upcast_layernorm': {ACCEPTED['upcast_layernorm']}")


def test_translated_llamafactory_keys_set_the_longtune_key():
    cfg = build_config({**BASE, "disable_gradient_checkpointing": True, "neat_packing": True,
                        "kto_rejected_weight": 0.5, "new_special_tokens": "<a>,<b>"})
    assert cfg.train.gradient_checkpointing is False and cfg.data.packing is True
    assert cfg.preference.kto_undesirable_weight == 0.5 and cfg.model.add_special_tokens == ("<a>", "<b>")
    assert len(cfg.notices) == 4
    assert build_config({**BASE, "disable_gradient_checkpointing": False,
                         "gradient_checkpointing": False}).train.gradient_checkpointing is False
    with pytest.raises(ConfigError, match="'disable_gradient_checkpointing'.*contradicts 'gradient_checkpointing"):
        build_config({**BASE, "disable_gradient_checkpointing": True, "gradient_checkpointing": True})


@pytest.mark.parametrize("kind,kwargs", [
    ("cosine", {}), ("cosine", {"num_cycles": 1.5}), ("linear", {}), ("constant_with_warmup", {}),
    ("cosine_with_restarts", {}), ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}), ("polynomial", {"power": 2.0, "lr_end": 1e-4}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.2}), ("cosine_with_min_lr", {"min_lr": 2e-4}),
])
def test_lr_schedules_equal_transformers_get_scheduler(kind, kwargs):
    from transformers import get_scheduler

    from longtune.optim import lr_lambda

    total, warmup, lr = 23, 4, 1e-3
    cfg = build_config({**BASE, "lr_scheduler_type": kind, "lr_scheduler_kwargs": kwargs, "warmup_steps": warmup,
                        "learning_rate": lr})
    ours = lr_lambda(cfg.train, total)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    theirs = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                           scheduler_specific_kwargs=dict(kwargs))
    expected = []
    for _ in range(total + 1):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        theirs.step()
    assert [lr * ours(s) for s in range(total + 1)] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_scheduler_kwargs_a_schedule_does_not_take_is_an_error():
    with pytest.raises(ConfigError, match="'lr_scheduler_kwargs' has power, which lr_scheduler_type: cosine"):
        build_config({**BASE, "lr_scheduler_kwargs": {"power": 2.0}})
    assert build_config({**BASE, "lr_scheduler_type": "polynomial",
                         "lr_scheduler_kwargs": '{"power": 2}'}).train.lr_scheduler_kwargs == {"power": 2.0}


def test_optim_builds_the_named_optimizer_and_sgd_steps_by_the_closed_form(monkeypatch):
    from longtune.optim import build_optimizer

    model = torch.nn.Linear(3, 2).double()
    assert isinstance(build_optimizer(model, build_config({**BASE, "optim": "adafactor"}).train),
                      torch.optim.Adafactor)
    assert isinstance(build_optimizer(model, build_config({**BASE, "optim": "adamw_torch_fused"}).train),
                      torch.optim.AdamW)
    cfg = build_config({**BASE, "optim": "sgd", "learning_rate": 0.1, "weight_decay": 0.5})
    optimizer = build_optimizer(model, cfg.train)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.ones(4, 3, dtype=torch.float64)).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    # torch SGD adds weight_decay * p to the gradient; our groups decay matrices only.
    torch.testing.assert_close(model.weight, before["weight"] - 0.1 * (grads["weight"] + 0.5 * before["weight"]))
    torch.testing.assert_close(model.bias, before["bias"] - 0.1 * grads["bias"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ConfigError, match="key 'optim': paged_adamw_8bit needs bitsandbytes"):
        build_optimizer(model, build_config({**BASE, "optim": "paged_adamw_8bit"}).train)


def test_resume_with_another_optim_is_refused_naming_optim(tmp_path, alpaca_file, capsys):
    out = tmp_path / "run"
    assert main(["train", *base_overrides(alpaca_file, out, max_steps=1, save_steps=1)]) == 0
    capsys.readouterr()
    code = main(["train", *base_overrides(alpaca_file, out, max_steps=2, optim="sgd", resume_from_checkpoint=True)])
    assert code == 2
    assert "key 'optim': 'sgd', but checkpoint-1 was written with optim: 'adamw_torch'" in capsys.readouterr().err


def test_report_to_takes_lists_all_and_none():
    assert build_config({**BASE, "report_to": ["tensorboard"]}).reporters == {"tensorboard"}
    assert build_config({**BASE, "report_to": "none"}).reporters == frozenset()
    assert build_config({**BASE, "report_to": "tensorboard,wandb"}).reporters == {"tensorboard", "wandb"}
    with pytest.raises(ConfigError, match="'report_to' cannot combine none with wandb"):
        build_config({**BASE, "report_to": ["none", "wandb"]})


def test_save_strategy_epoch_and_no_and_wandb_logging(tmp_path, alpaca_file, monkeypatch):
    """24 rows, 8 per step: 3 steps an epoch. `epoch` saves at steps 3 and 6; `no` saves none. The epoch run also
    reports to a stand-in wandb module, which must receive every metrics row."""
    logged: list[tuple[dict, int]] = []
    started: dict = {}

    class FakeRun:
        def log(self, values, step):
            logged.append((values, step))

        def finish(self):
            started["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: started.update(kw) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "epoch"
    assert main(["train", *base_overrides(alpaca_file, out, max_steps=-1, num_train_epochs=2,
                                          per_device_train_batch_size=8, save_strategy="epoch", save_steps=1,
                                          report_to="wandb", run_name="lf-run")]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(v["train/loss"], s) for v, s in logged] == [(r["loss"], r["step"]) for r in rows]
    assert started["name"] == "lf-run" and started["finished"]
    out = tmp_path / "no"
    assert main(["train", *base_overrides(alpaca_file, out, max_steps=2, save_strategy="no", save_steps=1)]) == 0
    assert list(out.glob("checkpoint-*")) == [] and (out / "final").is_dir()


def test_wandb_missing_is_one_line_naming_report_to(tmp_path, alpaca_file, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["train", *base_overrides(alpaca_file, tmp_path / "o", max_steps=1, report_to="wandb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ConfigError: key 'report_to': wandb is not installed (pip install wandb, or longtune[wandb])"]


def test_tf32_is_set_for_the_run_and_restored():
    from longtune.trainer import tf32_allowed

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32_allowed(not before[0]):
        assert torch.backends.cuda.matmul.allow_tf32 is (not before[0])
        assert torch.backends.cudnn.allow_tf32 is (not before[0])
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_txt_dataset_is_one_text_row_per_line_and_interleave_probs_null(tmp_path):
    from longtune.data.loading import iter_file_rows

    path = tmp_path / "corpus.txt"
    path.write_text("first document\n\nsecond one\r\nthird\n")
    assert list(iter_file_rows(path)) == [(1, {"text": "first document"}), (3, {"text": "second one"}),
                                          (4, {"text": "third"})]
    from longtune.data.lm import examples_from_config
    from longtune.models.builtin import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    cfg = build_config({**BASE, "dataset": str(path), "stage": "pt", "data_cache_dir": str(tmp_path / "cache")})
    examples, stats = examples_from_config(cfg, tokenizer)
    assert stats.rows == 3 and len(examples) == 3
    assert examples[1].input_ids[: len(tokenizer("second one")["input_ids"])] == tokenizer("second one")["input_ids"]
    assert build_config({**BASE, "interleave_probs": None}).data.interleave_probs == ()


def test_rope_scaling_linear_is_written_before_loading_and_stretches_positions(saved_models):
    """Linear scaling divides the rotary frequencies by the factor: the scaled model at positions 2k equals the
    unscaled model at positions k (an independent check of what got loaded), and differs at positions k."""
    from longtune.config import ModelConfig
    from longtune.models.loader import RopeScaling, load_model

    model_cfg = ModelConfig(model_name_or_path=str(saved_models["qwen2"]), attn_implementation="eager")
    notices: list[str] = []
    scaled = load_model(model_cfg, torch.float64, rope=RopeScaling("linear", 8000), log=notices.append)
    plain = load_model(model_cfg, torch.float64)
    assert scaled.config.rope_parameters["rope_type"] == "linear" and scaled.config.rope_parameters["factor"] == 2.0
    assert scaled.config.max_position_embeddings == 8192 and plain.config.max_position_embeddings == 4096
    ids = torch.arange(5, 25).unsqueeze(0)
    positions = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        base = plain(input_ids=ids, position_ids=positions).logits
        stretched = scaled(input_ids=ids, position_ids=2 * positions).logits
        same_positions = scaled(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(stretched, base, rtol=1e-10, atol=1e-10)
    assert (same_positions - base).abs().max() > 1e-4
    # A cutoff_len that fits the model's context needs no scaling (LLaMA-Factory's rule), said in a notice.
    fits = load_model(model_cfg, torch.float64, rope=RopeScaling("yarn", 4096), log=notices.append)
    assert fits.config.rope_parameters.get("rope_type", "default") == "default"
    assert any("fits the model's 4096 positions; no scaling" in n for n in notices)


def test_rope_scaling_llama3_and_yarn_record_the_original_context_and_reach_the_saved_model(saved_models, tmp_path,
                                                                                          alpaca_file):
    from longtune.config import ModelConfig
    from longtune.models.loader import RopeScaling, load_model

    llama = load_model(ModelConfig(model_name_or_path=str(saved_models["llama"])), torch.float32,
                       rope=RopeScaling("llama3", 10000), log=lambda _: None)
    params = llama.config.rope_parameters
    assert (params["rope_type"], params["factor"], params["original_max_position_embeddings"],
            params["low_freq_factor"], params["high_freq_factor"]) == ("llama3", 3.0, 4096, 1.0, 4.0)
    out = tmp_path / "yarn"
    assert main(["train", *base_overrides(alpaca_file, out, model_name_or_path=saved_models["qwen2"], max_steps=1,
                                          rope_scaling="yarn", cutoff_len=9000)]) == 0
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["max_position_embeddings"] == 4096 * 3
    assert {k: saved["rope_parameters"][k] for k in ("rope_type", "factor", "original_max_position_embeddings")} == {
        "rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 4096}


def test_adapter_name_or_path_continues_a_saved_adapter_and_exports_merged_onto_a_given_base(saved_models, tmp_path,
                                                                                            alpaca_file):
    """Step 0 of a run continuing an adapter is base + adapter (peft's own loading is the reference); the loaded
    adapter trains; `longtune export --merge-lora --base` merges it onto that base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longtune.config import ModelConfig
    from longtune.models.loader import apply_finetuning, load_model

    base = saved_models["qwen2"]
    first = tmp_path / "first"
    lora = dict(model_name_or_path=base, finetuning_type="lora", lora_rank=4, learning_rate=1e-2)
    assert main(["train", *base_overrides(alpaca_file, first, max_steps=2, **lora)]) == 0
    adapter = first / "final"

    model_cfg = ModelConfig(model_name_or_path=str(base), finetuning_type="lora", lora_rank=16,
                            adapter_name_or_path=str(adapter), attn_implementation="eager")
    ours = apply_finetuning(load_model(model_cfg, torch.float64), model_cfg)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64, attn_implementation="eager"), str(adapter))
    ids = torch.arange(3, 30).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)(input_ids=ids).logits
        assert (ours(input_ids=ids).logits - plain).abs().max() > 1e-6  # the adapter is not a no-op
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert ours.peft_config["default"].r == 4  # the adapter's rank, not lora_rank

    second = tmp_path / "second"
    assert main(["train", *base_overrides(alpaca_file, second, max_steps=1, adapter_name_or_path=adapter,
                                          **lora)]) == 0
    row = json.loads((second / "metrics.jsonl").read_text().splitlines()[0])
    first_row = json.loads((first / "metrics.jsonl").read_text().splitlines()[0])
    # Same seed, same first batch: the first run's step 1 saw the base (fresh LoRA B = 0), this one base + adapter.
    assert row["grad_norm"] > 0 and abs(row["loss"] - first_row["loss"]) > 1e-6
    assert main(["export", str(second), str(tmp_path / "merged"), "--merge-lora", "--base", str(base)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64)
    continued = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64),
                                          str(second / "final"))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, continued(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="'adapter_name_or_path' needs finetuning_type: lora"):
        build_config({**BASE, "adapter_name_or_path": str(adapter), "finetuning_type": "full"})


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_tokenized_path_saves_then_trains_identically_without_reading_the_datasets(tmp_path, stage, alpaca_file,
                                                                                   capsys):
    """First run: tokenized_path does not exist, so the data is tokenized, saved there and trained on. Second run:
    it exists, so it is read and `dataset` (now a missing file) is never opened; the loss curve is the same."""
    if stage == "dpo":
        rows = [{"instruction": f"Say {i}.", "input": "", "chosen": f"{i} {i}", "rejected": "no"} for i in range(8)]
        data = tmp_path / "pairs.json"
        data.write_text(json.dumps(rows))
        extra = {"stage": "dpo", "finetuning_type": "lora", "data_cache_dir": tmp_path / "cache"}
    else:
        data, extra = alpaca_file, {"data_cache_dir": tmp_path / "cache"}
    tokenized = tmp_path / "tokenized"
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", *base_overrides(data, first, tokenized_path=tokenized, **extra)]) == 0
    assert (tokenized / "train.npz").is_file()
    assert main(["train", *base_overrides(tmp_path / "gone.json", second, tokenized_path=tokenized, **extra)]) == 0
    losses = [[json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
              for out in (first, second)]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    if stage == "sft":  # a folder made for sft rows is not read as pretraining rows
        capsys.readouterr()
        code = main(["train", *base_overrides(data, tmp_path / "pt", tokenized_path=tokenized, stage="pt")])
        err = capsys.readouterr().err
        assert code == 2 and "key 'tokenized_path'" in err and "tokenized with another pretraining" in err


def test_added_special_tokens_grow_the_embeddings_and_their_rows_train(saved_models, tmp_path):
    """add_special_tokens: the tokenizer keeps each new token whole, the embeddings grow to a multiple of 64 with
    new rows at the mean embedding, the rows of tokens that occur in the data train (LoRA saves the embeddings as
    modules_to_save), and the merged export loads with the grown vocabulary."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longtune.config import ModelConfig
    from longtune.models.loader import load_model, load_tokenizer

    base = saved_models["qwen2"]
    model_cfg = ModelConfig(model_name_or_path=str(base), add_special_tokens=("<tool>", "<done>"))
    tokenizer = load_tokenizer(model_cfg)
    vocab = len(AutoTokenizer.from_pretrained(base))
    tool, done = tokenizer.convert_tokens_to_ids(["<tool>", "<done>"])
    assert (tool, done) == (vocab, vocab + 1) and tokenizer("a <tool> b")["input_ids"].count(tool) == 1
    model = load_model(model_cfg, torch.float64, log=lambda _: None)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    rows = model.get_input_embeddings().weight
    old = plain.get_input_embeddings().weight
    assert rows.shape[0] == -(-(vocab + 2) // 64) * 64 > old.shape[0]
    torch.testing.assert_close(rows[: old.shape[0]], old, rtol=0, atol=0)
    torch.testing.assert_close(rows[tool], old.mean(dim=0))

    data = tmp_path / "tools.json"
    data.write_text(json.dumps([{"instruction": f"Call the tool {i}.", "input": "", "output": f"<tool> {i} <done>"}
                                for i in range(8)]))
    out = tmp_path / "run"
    assert main(["train", *base_overrides(data, out, model_name_or_path=base, finetuning_type="lora",
                                          add_special_tokens="<tool>,<done>", learning_rate=1e-2, max_steps=2)]) == 0
    saved = load_file(str(out / "final" / "adapter_model.safetensors"))
    embed = next(v for k, v in saved.items() if "embed_tokens" in k)
    assert embed.shape[0] == rows.shape[0]
    assert (embed[tool].double() - old.mean(dim=0)).abs().max() > 1e-4  # the new row trained
    assert len(AutoTokenizer.from_pretrained(out / "final")) == vocab + 2
    assert main(["export", str(out), str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged.get_input_embeddings().weight[tool].double(), embed[tool].double())


def test_bitsandbytes_paged_adamw_32bit_steps_like_torch_adamw_and_8bit_close_to_it():
    pytest.importorskip("bitsandbytes")
    from longtune.optim import build_optimizer

    def one_step(optim: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)
        cfg = build_config({**BASE, "optim": optim, "learning_rate": 1e-2, "weight_decay": 0.1})
        optimizer = build_optimizer(model, cfg.train)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.linspace(-1, 1, 64 * 4).view(4, 64)).pow(2).sum().backward()
            optimizer.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    reference = one_step("adamw_torch")
    for name, tolerance in (("paged_adamw_32bit", 1e-5), ("adamw_8bit", 1e-2)):
        got = one_step(name)
        for key in reference:
            torch.testing.assert_close(got[key], reference[key], rtol=0, atol=tolerance, msg=f"{name} {key}")
