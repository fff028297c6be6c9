"""LLaMA-Factory 0.9.5's text example YAMLs (tests/fixtures/lf_examples, copied unchanged) train with `longtune train`
from a folder laid out as LLaMA-Factory's checkout is (`examples/`, `data/dataset_info.json`, relative `saves/`),
changing only the model path and a step limit on the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from longtune.cli import main

EXAMPLES = Path(__file__).parent / "fixtures" / "lf_examples" / "examples"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()



def write_lf_demo_data(data: Path) -> None:
    """Small files in the shapes of LLaMA-Factory's demo datasets, with their dataset_info.json entries as
    LLaMA-Factory 0.9.5 ships them."""
    data.mkdir()
    n = 20
    identity = [{"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."}] * 4
    alpaca = [{"instruction": f"Repeat word {i}.", "input": WORDS[i % 12], "output": " ".join(WORDS[: 1 + i % 7])}
              for i in range(n)]
    dpo = [{"conversations": [{"from": "human", "value": f"Name word {i}."}],
            "chosen": {"from": "gpt", "value": WORDS[i % 12]},
            "rejected": {"from": "gpt", "value": " ".join(WORDS[: 2 + i % 5])}} for i in range(n)]
    kto = [{"messages": [{"role": "user", "content": f"Name word {i}."},
                         {"role": "assistant", "content": WORDS[(i * 5) % 12]}], "label": i % 3 != 0}
           for i in range(n)]
    (data / "identity.json").write_text(json.dumps(identity))
    (data / "alpaca_en_demo.json").write_text(json.dumps(alpaca))
    (data / "dpo_en_demo.json").write_text(json.dumps(dpo))
    (data / "kto_en_demo.json").write_text(json.dumps(kto))
    (data / "c4_demo.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(WORDS[(i + j) % 12] for j in range(40))}) + "\n" for i in range(n)))
    (data / "dataset_info.json").write_text(json.dumps({
        "identity": {"file_name": "identity.json"},
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                        "columns": {"messages": "messages", "kto_tag": "label"},
                        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant"}},
        "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
    }))


@pytest.fixture
def lf_checkout(tmp_path, monkeypatch) -> Path:
    """A working directory shaped like a LLaMA-Factory checkout: the example YAMLs and DeepSpeed jsons under
    examples/, the demo data under data/ (both relative, as the YAMLs expect)."""
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    write_lf_demo_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train_example(example: str, model: Path, *extra: str) -> list[dict]:
    """`longtune train examples/EXAMPLE.yaml` with only the model path and a 2-step limit changed; the metrics."""
    yaml_path = Path("examples") / example
    cfg = yaml.safe_load(yaml_path.read_text())
    overrides = [f"model_name_or_path={model}", "max_steps=2", "disable_tqdm=true", *extra]
    assert main(["train", str(yaml_path), *overrides]) == 0
    out = Path(cfg["output_dir"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def assert_trained(rows: list[dict], out: Path, full: bool = False) -> None:
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in rows)
    final = Path(out) / "final"
    assert (final / ("model.safetensors" if full else "adapter_model.safetensors")).is_file()
    assert (Path(out) / "loss.png").is_file()  # plot_loss: true in every example


def test_lf_sft_examples_lora_ds3_and_full_ds3_train_unchanged(lf_checkout, saved_models):
    """The representative CI subset: plain LoRA SFT, the DeepSpeed ZeRO-3 LoRA one and the full ZeRO-3 one, all in
    one plain process (no RANK in the environment: world size 1, the ZeRO json mapped onto FSDP2)."""
    rows = train_example("train_lora/qwen3_lora_sft.yaml", saved_models["qwen2"])
    assert_trained(rows, "saves/qwen3-4b/lora/sft")
    rows = train_example("train_lora/qwen3_lora_sft_ds3.yaml", saved_models["qwen2"], "output_dir=saves/ds3")
    assert_trained(rows, "saves/ds3")
    rows = train_example("train_full/qwen3_full_sft.yaml", saved_models["qwen2"])
    assert_trained(rows, "saves/qwen3-4b/full/sft", full=True)


@pytest.mark.parametrize("example", [  # dpo in CI; the others are slow (CI time), runnable with -m slow
    "train_lora/qwen3_lora_dpo.yaml", *(pytest.param(f"train_lora/qwen3_lora_{name}.yaml", marks=pytest.mark.slow)
                                        for name in ("kto", "reward", "pretrain"))])
def test_lf_preference_reward_and_pretrain_examples_train_unchanged(lf_checkout, saved_models, example):
    rows = train_example(example, saved_models["qwen2"])
    assert_trained(rows, yaml.safe_load((lf_checkout / "examples" / example).read_text())["output_dir"])


@pytest.mark.slow
def test_lf_sft_example_on_llama_with_llama3_template(lf_checkout, saved_models):
    """LLaMA-Factory 0.9.5 ships its llama3 text examples only under examples/extras (GaLore, BAdam, ...); the same
    LoRA SFT YAML runs on a Llama model with `template: llama3`."""
    rows = train_example("train_lora/qwen3_lora_sft.yaml", saved_models["llama"], "template=llama3")
    assert_trained(rows, "saves/qwen3-4b/lora/sft")


@pytest.mark.parametrize("ds_json", ["ds_z0_config.json", "ds_z2_config.json", "ds_z2_offload_config.json",
                                     "ds_z3_offload_config.json"])
@pytest.mark.slow
def test_lf_ds3_example_with_every_zero_json(lf_checkout, saved_models, ds_json):
    rows = train_example("train_lora/qwen3_lora_sft_ds3.yaml", saved_models["qwen2"],
                         f"deepspeed=examples/deepspeed/{ds_json}")
    assert_trained(rows, "saves/qwen3-4b/lora/sft")


def test_lf_ray_example_is_refused_naming_the_key(lf_checkout, saved_models, capsys):
    code = main(["train", "examples/train_lora/qwen3_lora_sft_ray.yaml", f"model_name_or_path={saved_models['qwen2']}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "LLaMA-Factory key 'ray_num_workers' is not supported" in err[0]


def test_lf_preprocess_example_saves_tokenized_data_then_trains_from_it(lf_checkout, saved_models):
    """qwen3_preprocess.yaml: the first run tokenizes into tokenized_path and trains; a second run reads it."""
    losses = []
    for _ in range(2):  # the same output_dir (overwrite_output_dir: true in the YAML)
        rows = train_example("train_lora/qwen3_preprocess.yaml", saved_models["qwen2"], "logging_steps=1")
        losses.append([r["loss"] for r in rows])
        assert (lf_checkout / "saves/qwen3-4b/dataset/sft/train.npz").is_file()
    assert losses[0] == losses[1] and len(losses[0]) == 2
