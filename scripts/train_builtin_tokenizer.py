"""Train the builtin byte-level BPE tokenizer (vocab 1024) into src/longtune/models/builtin_tokenizer/.

Offline and deterministic: trained with the `tokenizers` library on the builtin datasets plus the English
paragraphs below, single-threaded, so running it twice writes identical files. Run make_builtin_data.py first.
Usage: python scripts/train_builtin_tokenizer.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Rayon parallelism can reorder merge ties; one thread keeps training reproducible.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from longtune.data.templates import CHATML_JINJA as CHATML  # noqa: E402  (ChatML as Qwen2 writes it, no default system)

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "src" / "longtune" / "data" / "builtin"
DEFAULT_OUT = ROOT / "src" / "longtune" / "models" / "builtin_tokenizer"

VOCAB_SIZE = 1024
PAD_TOKEN, BOS_OF_TURN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_OF_TURN, EOS_TOKEN]

# Qwen2's split: letters runs, single digits (so arithmetic is learnable), punctuation runs, newlines, spaces.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENGLISH_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can learn simple patterns when the data is clean
and the task is regular. Each example in this collection asks for one short answer, and the answer follows
a rule that is easy to state: reverse the words, count them, add two numbers, or name the day that comes next.

Long documents are harder. To answer a question about a key that appeared thousands of tokens earlier, the
model has to attend across the whole sequence. That is what sequence parallelism is for: the sequence is cut
into pieces, each device holds a few of them, and attention is computed as the pieces travel around a ring.

Training a language model means predicting the next token. The loss is the average negative log probability
of the correct token, and it falls as the model learns. We measure it on every step, write it to a file, and
draw a plot at the end. If the loss does not fall, something is wrong with the data, the labels or the model.

Please answer the question. What is the value of the key? Write the answer only. Thank you for your help.
The weather today is sunny with a light wind from the west. In the evening there may be some rain.
"""


def training_texts() -> list[str]:
    """Every string the builtin data can show the tokenizer, plus plain English and the chat markup."""
    texts = [ENGLISH_TEXT]
    for name in ("sft_demo.json", "sharegpt_demo.json"):
        for row in json.loads((DATA_DIR / name).read_text(encoding="utf-8")):
            texts.extend(v for v in row.values() if isinstance(v, str))
            texts.extend(turn["value"] for turn in row.get("conversations", []))
    for name in ("pt_demo.jsonl", "kv_retrieval.jsonl"):
        for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "text" in row:
                texts.append(row["text"])
            texts.extend(m["content"] for m in row.get("messages", []))
    # Role names follow <|im_start|> in every rendered turn: make them frequent enough to become single tokens.
    texts.extend(f"{role}\n" for role in ("system", "user", "assistant", "tool") for _ in range(500))
    return texts


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_texts(), trainer=trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    raw = train_tokenizer()
    assert raw.get_vocab_size() == VOCAB_SIZE, raw.get_vocab_size()
    assert [raw.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[BOS_OF_TURN],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.iterdir():
        old.unlink()
    tokenizer.save_pretrained(str(args.out))
    for path in sorted(args.out.iterdir()):
        print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
