"""`longtune chat` and `longtune predict`: replies equal an independent greedy `model.generate` of the same prompt
(through stdin of the real CLI, with history and /reset), batched predictions equal unbatched ones, and the
BLEU-4 / ROUGE numbers equal LLaMA-Factory's recipe run on nltk, rouge-chinese and jieba (the peers)."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longtune.cli import main
from longtune.config import load_config
from longtune.errors import ConfigError
from longtune.generation import prompt_ids
from longtune.predict_metrics import (
    average_similarity,
    rouge_f_scores,
    segment_words_without_jieba,
    sentence_bleu4,
    similarity_scores,
)
from tests.conftest import base_overrides

# ---------------------------------------------------------------- metrics against their peers

ENGLISH = [
    "Hello, world! It costs 3.14% of e.g. C++ and c# at AT&T; well-known -- x_y #tag 2.5.6 abc++ AT&Tx",
    "  two  spaces\ttab\r\nnew line", "café naïve — “quote” it's", "ATC++ c++c#", "What? Why... no?? yes......ok",
    "The cat sat on the mat.", "the cat is on the mat", "", "a", "ab", "100", "Monday", "x-y_z.w%v+u#t&s",
]


def _lf_similarity(prediction: str, label: str) -> dict[str, float]:
    """LLaMA-Factory 0.9.5's ComputeSimilarity for one pair, on its own packages (jieba, rouge-chinese, nltk)."""
    jieba = pytest.importorskip("jieba")
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis, reference = list(jieba.cut(prediction)), list(jieba.cut(label))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    scores = {k: round(v["f"] * 100, 4) for k, v in result.items()}
    scores["bleu-4"] = round(sentence_bleu([list(label)], list(prediction),
                                           smoothing_function=SmoothingFunction().method3) * 100, 4)
    return scores


def test_segmentation_without_jieba_equals_jieba():
    jieba = pytest.importorskip("jieba")
    rng = random.Random(0)
    alphabet = "abcC+#&T._%-12 \t\n,;'é?AT"
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(300)]
    for text in ENGLISH + fuzz:
        assert segment_words_without_jieba(text) == list(jieba.cut(text)), repr(text)
    with pytest.raises(ConfigError, match="pip install jieba") as info:
        segment_words_without_jieba("今天天气很好")
    assert "\n" not in str(info.value)


def test_bleu_and_rouge_equal_nltk_and_rouge_chinese():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    rng = random.Random(1)
    for _ in range(300):  # small alphabets so that n-grams match, lengths 0..12 around the 4-gram edge
        ref = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        hyp = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        want = sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3)
        assert abs(sentence_bleu4(ref, hyp) - want) <= 1e-12, (ref, hyp)
        hyp_text = " ".join(rng.choice(["x", "y", "z", "w", "?", "。"]) for _ in range(rng.randint(1, 10)))
        ref_text = " ".join(rng.choice(["x", "y", "z", "w", "?", "。"]) for _ in range(rng.randint(1, 10)))
        peer = Rouge().get_scores(hyp_text, ref_text)[0]
        ours = rouge_f_scores(hyp_text, ref_text)
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            assert abs(ours[key] - peer[key]["f"]) <= 1e-12, (hyp_text, ref_text, key)


def test_similarity_equals_llamafactory_recipe():
    pairs = [(a, b) for a in ENGLISH for b in ENGLISH[:6]] + [
        ("今天天气很好，我们去公园散步吧。", "今天天气不错，我们去公园吧！"), ("北京是中国的首都", "北京是首都"),
    ]
    for prediction, label in pairs:
        assert similarity_scores(prediction, label) == _lf_similarity(prediction, label), (prediction, label)
    got = average_similarity([p for p, _ in pairs], [lab for _, lab in pairs])
    peers = [_lf_similarity(p, lab) for p, lab in pairs]
    for key in got:
        assert abs(got[key] - sum(s[key] for s in peers) / len(peers)) <= 1e-9


# ---------------------------------------------------------------- chat and predict on trained tiny runs


def _train(data_file: Path, out: Path, **extra) -> Path:
    from longtune.trainer import train

    train(load_config(None, base_overrides(data_file, out, **extra)))
    return out


@pytest.fixture(scope="module")
def full_run(alpaca_file, tmp_path_factory) -> Path:
    """A full fine-tune trained with the plain-text `default` template (not the tokenizer's own ChatML), so the
    replies prove that chat renders with the run's template."""
    return _train(alpaca_file, tmp_path_factory.mktemp("chat") / "full", template="default")


def _training_prompt(tokenizer, template: str, messages: list[dict]) -> list[int]:
    """An independent reference for a generation prompt: the tokens that a training row of the same turns (plus
    a placeholder reply) has in front of its last reply, encoded by the data pipeline."""
    import tempfile

    from longtune.data import load_examples

    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
             for m in messages if m["role"] != "system"]
    row = {"conversations": [*turns, {"from": "gpt", "value": "placeholder"}], **({"system": system[0]} if system else {})}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "row.json").write_text(json.dumps([row]))
        (Path(tmp) / "dataset_info.json").write_text(json.dumps({"row": {
            "file_name": "row.json", "formatting": "sharegpt", "columns": {"messages": "conversations",
                                                                           "system": "system"}}}))
        (example,), _ = load_examples(["row"], dataset_dir=tmp, tokenizer=tokenizer, template=template, stage="sft",
                                      cutoff_len=100000, cache_dir=str(Path(tmp) / "cache"))
    labels = example.labels
    last_reply = len(labels) - next(i for i, lab in enumerate(reversed(labels)) if lab == -100)
    return list(example.input_ids[:last_reply])


def _greedy_reply(model, tokenizer, template: str, messages: list[dict], max_new_tokens: int) -> str:
    """An independent reference: the training prompt of the turns, one unpadded greedy generate."""
    ids = torch.tensor([_training_prompt(tokenizer, template, messages)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _expected_conversation(model, tokenizer, template: str, turns: list[str], max_new_tokens: int) -> list[str]:
    """The replies to `turns` with history, `/reset` clearing it."""
    history: list[dict] = []
    replies = []
    for turn in turns:
        if turn == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": turn})
        reply = _greedy_reply(model, tokenizer, template, history, max_new_tokens)
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def _replies(stdout: str) -> list[str]:
    return [line[len("Assistant: "):] for line in stdout.splitlines() if line.startswith("Assistant: ")]


def test_chat_through_stdin_equals_greedy_generate(full_run):
    from transformers import AutoModelForCausalLM

    from longtune.models.builtin import load_builtin_tokenizer

    turns = ["alpha beta gamma", "Task 3: repeat the words", "/reset", "delta"]
    stdin = "\n".join(turns) + "\n/exit\nnever read\n"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "longtune", "chat", str(full_run), "do_sample=false",
                           "max_new_tokens=10"], input=stdin, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "History has been removed." in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(full_run / "final", dtype=torch.float64).eval()
    want = _expected_conversation(model, load_builtin_tokenizer(), "default", turns, 10)
    got = _replies(proc.stdout)
    assert got == want and any(want)


def test_chat_base_model_plus_lora_adapter(alpaca_file, tmp_path):
    from peft import PeftModel

    from longtune.chat import run_chat
    from longtune.models.builtin import build_builtin_model, load_builtin_tokenizer

    from longtune.export import export_model

    run = _train(alpaca_file, tmp_path / "lora", finetuning_type="lora", lora_rank=4, learning_rate=5e-2)
    merged = export_model(run, tmp_path / "exported", merge_lora=True)
    turns = ["alpha beta", "gamma"]
    outputs = {}
    # the base model + adapter_name_or_path, the run directory (its final/ is the adapter), final/ itself, and
    # the merged export (no run config beside it: the tokenizer's own template, ChatML, and dtype given)
    for name, source, extra in (("base+adapter", "builtin:tiny", [f"adapter_name_or_path={run / 'final'}",
                                                                   "template=chatml", "dtype=float64"]),
                                ("run", str(run), []), ("final", str(run / "final"), []),
                                ("merged", str(merged), ["dtype=float64"])):
        out = io.StringIO()
        assert run_chat(source, ["do_sample=false", "max_new_tokens=8", *extra],
                        stdin=io.StringIO("\n".join(turns) + "\n"), stdout=out) == 0
        outputs[name] = _replies(out.getvalue())
    base = build_builtin_model("builtin:tiny", dtype=torch.float64)
    model = PeftModel.from_pretrained(base, str(run / "final")).eval()
    want = _expected_conversation(model, load_builtin_tokenizer(), "chatml", turns, 8)
    assert outputs["base+adapter"] == outputs["run"] == outputs["final"] == outputs["merged"] == want
    untouched = _expected_conversation(build_builtin_model("builtin:tiny", dtype=torch.float64).eval(),
                                       load_builtin_tokenizer(), "chatml", turns, 8)
    assert want != untouched  # the adapter changed the replies, so it was applied


def test_chat_one_message_with_system_prompt(full_run, capsys):
    from transformers import AutoModelForCausalLM

    from longtune.models.builtin import load_builtin_tokenizer

    assert main(["chat", str(full_run), "--system", "Answer briefly.", "--message", "alpha beta",
                 "do_sample=false", "max_new_tokens=10"]) == 0
    model = AutoModelForCausalLM.from_pretrained(full_run / "final", dtype=torch.float64).eval()
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "alpha beta"}]
    want = _greedy_reply(model, load_builtin_tokenizer(), "default", messages, 10)
    assert _replies(capsys.readouterr().out) == [want]
    ids = prompt_ids(load_builtin_tokenizer(), "default", messages[1:], "Answer briefly.")
    assert ids == _training_prompt(load_builtin_tokenizer(), "default", messages)
    assert load_builtin_tokenizer().decode(ids) == ("System: Answer briefly.<|im_end|>\nHuman: alpha beta<|im_end|>\n"
                                                    "Assistant:")  # LLaMA-Factory's default template


def test_chat_refuses_unknown_and_training_keys(full_run, capsys):
    assert main(["chat", str(full_run), "learning_rate=1e-3"]) == 2
    assert "does not apply to chat" in capsys.readouterr().err
    assert main(["chat", str(full_run), "temprature=0.5"]) == 2
    assert "did you mean 'temperature'" in capsys.readouterr().err


def _read_predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]


def test_do_predict_after_training_and_batched_equals_unbatched(alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from longtune.models.builtin import load_builtin_tokenizer

    run = tmp_path / "run"
    common = ["do_sample=false", "max_new_tokens=6", f"eval_dataset={alpaca_file}", "max_samples=7"]
    # training with do_predict: predictions of the final model, 3 prompts of different lengths per batch
    assert main(["train", *base_overrides(alpaca_file, run), *common, "do_predict=true",
                 "per_device_eval_batch_size=3"]) == 0
    batched = _read_predictions(run)
    # predict-only (the `predict` command), one prompt per batch: no padding at all
    single = tmp_path / "single"
    assert main(["predict", f"model_name_or_path={run / 'final'}", "template=chatml", "dtype=float64",
                 f"output_dir={single}", "per_device_eval_batch_size=1", *common]) == 0
    assert batched == _read_predictions(single) and len(batched) == 7
    rows = json.loads(alpaca_file.read_text())[:7]
    assert [r["label"] for r in batched] == [row["output"] for row in rows]
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float64).eval()
    tokenizer = load_builtin_tokenizer()
    for row, got in zip(rows, batched):
        messages = [{"role": "user", "content": f"{row['instruction']}\n{row['input']}"}]
        assert got["predict"] == _greedy_reply(model, tokenizer, "chatml", messages, 6)
        assert got["prompt"].endswith("<|im_start|>assistant\n")
    results = json.loads((run / "predict_results.json").read_text())
    want = average_similarity([r["predict"] for r in batched], [r["label"] for r in batched])
    assert {k: results[f"predict_{k}"] for k in want} == want


def test_llamafactory_predict_only_config(alpaca_file, tmp_path, capsys):
    """`longtune train` with do_train: false + do_predict: true (LLaMA-Factory's predict YAML) writes what
    `longtune predict` writes; no training happens and no dataset is needed."""
    common = ["model_name_or_path=builtin:tiny", "template=chatml", "do_sample=false", "max_new_tokens=4",
              f"eval_dataset={alpaca_file}", "max_samples=3", "per_device_eval_batch_size=2"]
    assert main(["train", *common, "do_train=false", "do_predict=true", "predict_with_generate=true",
                 f"output_dir={tmp_path / 'lf'}"]) == 0
    assert main(["predict", *common, f"output_dir={tmp_path / 'ours'}"]) == 0
    assert _read_predictions(tmp_path / "lf") == _read_predictions(tmp_path / "ours")
    assert not (tmp_path / "lf" / "final").exists()
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "examples" / "predict_demo.yaml")  # the shipped example validates
    assert not cfg.train.do_train and cfg.generation.do_predict and not cfg.generation.do_sample


def test_predict_needs_eval_dataset(alpaca_file, tmp_path, capsys):
    assert main(["predict", "model_name_or_path=builtin:tiny", f"output_dir={tmp_path}"]) == 2
    assert "needs eval_dataset" in capsys.readouterr().err
    assert main(["train", "model_name_or_path=builtin:tiny", f"output_dir={tmp_path}", "do_train=false"]) == 2
    assert "do_predict must be true" in capsys.readouterr().err
