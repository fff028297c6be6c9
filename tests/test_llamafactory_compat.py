"""A config written the way LLaMA-Factory's documented SFT examples are (qwen2.5 LoRA SFT YAML, with a
dataset_info.json holding an alpaca and a sharegpt entry) trains unchanged; only the model path is local."""

from __future__ import annotations

import json
from pathlib import Path

from longtune.cli import main

LLAMAFACTORY_YAML = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: my_alpaca,my_sharegpt
dataset_dir: {data}
template: qwen
cutoff_len: 256
max_samples: 40
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: {out}
logging_steps: 2
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 1.0e-4
num_train_epochs: 1.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


def test_llamafactory_sft_example_config_trains_unchanged(tmp_path, saved_models):
    data = tmp_path / "data"
    data.mkdir()
    alpaca = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(30)]
    sharegpt = [{"conversations": [{"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": w}]}
                for w in ("alpha", "beta", "gamma", "delta") * 5]
    (data / "alpaca.json").write_text(json.dumps(alpaca))
    (data / "sharegpt.json").write_text(json.dumps(sharegpt))
    (data / "dataset_info.json").write_text(json.dumps({
        "my_alpaca": {"file_name": "alpaca.json"},
        "my_sharegpt": {"file_name": "sharegpt.json", "formatting": "sharegpt",
                        "columns": {"messages": "conversations"},
                        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                                 "assistant_tag": "gpt"}},
    }))
    out = tmp_path / "saves"
    cfg = tmp_path / "qwen2_5_lora_sft.yaml"
    cfg.write_text(LLAMAFACTORY_YAML.format(model=saved_models["qwen2"], data=data, out=out))
    assert main(["train", str(cfg)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert train and all(r["loss"] > 0 for r in train)
    assert any("eval_loss" in r for r in rows)
    assert (out / "final" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert train[-1]["epoch"] == 1.0
