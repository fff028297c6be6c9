"""Generate the synthetic datasets that ship in src/longtune/data/builtin/ (offline demo and tests).

The tasks are tiny and rule-based so that the builtin tiny model visibly learns them in a few hundred CPU steps.
Deterministic: every file comes from one seeded `random.Random`, so rerunning gives byte-identical files.
Usage: python scripts/make_builtin_data.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "longtune" / "data" / "builtin"

WORDS = (
    "cat dog sun moon tree fish bird star rain snow frog lamp book door cake milk ship road hill lake "
    "rock leaf wind fire gold ring bell coin drum kite rose seed wolf bear duck goat lion mole owl "
    "pear plum corn bean nut egg hat cup pen box map key car bus van jet boat red blue green pink"
).split()

SYSTEM_PROMPTS = (
    "You are a careful assistant. Answer with the result only.",
    "You are a helpful assistant.",
    "Reply briefly and exactly.",
)

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def make_task(rng: random.Random) -> tuple[str, str, str]:
    """One (instruction, input, output) triple of a rule-based task."""
    _, instruction, inp, out = make_kind_task(rng)
    return instruction, inp, out


def make_kind_task(rng: random.Random) -> tuple[int, str, str, str]:
    """(kind, instruction, input, output) of a rule-based task; `kind` (0..7) tells wrong_answer the rule."""
    kind = rng.randrange(8)
    if kind == 0:
        items = _words(rng, 3, 5)
        instruction = rng.choice(("Reverse the list of words.", "Write the words in reverse order."))
        return kind, instruction, " ".join(items), " ".join(reversed(items))
    if kind == 1:
        word = rng.choice(WORDS)
        return kind, rng.choice(("Uppercase the word.", "Write the word in capital letters.")), word, word.upper()
    if kind == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return kind, rng.choice(("Add the two numbers.", "What is the sum?")), f"{a} + {b}", str(a + b)
    if kind == 3:
        letters = rng.sample(string.ascii_lowercase, rng.randint(3, 6))
        return kind, "Sort the letters alphabetically.", "".join(letters), "".join(sorted(letters))
    if kind == 4:
        word, n = rng.choice(WORDS), rng.randint(2, 5)
        return kind, f"Repeat the word {n} times.", word, " ".join([word] * n)
    if kind == 5:
        items = _words(rng, 2, 7)
        return kind, "Count the words.", " ".join(items), str(len(items))
    if kind == 6:
        items = _words(rng, 3, 6)
        return kind, "What is the last word?", " ".join(items), items[-1]
    day = rng.randrange(7)
    return kind, f"Which day comes after {DAYS[day]}?", "", DAYS[(day + 1) % 7]


def wrong_answer(rng: random.Random, kind: int, inp: str, out: str) -> str:
    """A plausible mistake for the task `kind` (the input unchanged, an off-by-some number, ...), never `out`."""
    items = inp.split()
    if kind == 0:  # the list left as it was
        wrong = inp
    elif kind == 1:  # not uppercased, or only the first letter
        wrong = rng.choice((inp, inp.capitalize()))
    elif kind == 2:  # a sum off by a little
        wrong = str(int(out) + rng.choice((-10, -2, -1, 1, 2, 10)))
    elif kind == 3:  # the letters unsorted, or sorted backwards
        wrong = inp if inp != out else out[::-1]
    elif kind == 4:  # one repetition too few or too many
        n = len(out.split())
        wrong = " ".join([inp] * (n - 1 if n > 2 and rng.random() < 0.5 else n + 1))
    elif kind == 5:  # a miscount
        wrong = str(len(items) + rng.choice((-1, 1)))
    elif kind == 6:  # the first word instead of the last
        wrong = items[0]
    else:  # the day asked about, or the one before it
        day = DAYS.index(out)
        wrong = DAYS[(day + rng.choice((-1, -2))) % 7]
    if wrong == out:  # a palindromic list, a first word equal to the last, ...
        others = [w for w in WORDS if w not in items]
        wrong = " ".join(out.split()[:-1] + [rng.choice(others)]) if kind in (0, 6) else out + " " + out
    return wrong


def make_sft_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        instruction, inp, out = make_task(rng)
        row = {"instruction": instruction, "input": inp, "output": out}
        if i % 10 == 0:
            row["system"] = rng.choice(SYSTEM_PROMPTS)
        rows.append(row)
    return rows


def make_sharegpt_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        turns = []
        if i % 3 == 0:
            turns.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(rng.randint(2, 3)):
            instruction, inp, out = make_task(rng)
            question = f"{instruction}\n{inp}" if inp else instruction
            turns.append({"from": "human", "value": question})
            turns.append({"from": "gpt", "value": out})
        rows.append({"conversations": turns})
    return rows


def make_pt_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            start = rng.randrange(7)
            text = " ".join(f"{DAYS[(start + k) % 7]} is followed by {DAYS[(start + k + 1) % 7]}." for k in range(3))
        elif kind == 1:
            start = rng.randint(0, 6)
            text = "Counting: " + " ".join(NUMBER_WORDS[start : start + rng.randint(4, 6)]) + "."
        elif kind == 2:
            a = rng.randint(2, 9)
            text = " ".join(f"{a} times {b} is {a * b}." for b in range(1, rng.randint(4, 7)))
        elif kind == 3:
            x, y = rng.sample(WORDS, 2)
            text = f"The {x} sat next to the {y}. The {y} sat next to the {x}. They sat together."
        else:
            start = rng.randrange(20)
            text = "The alphabet goes " + " ".join(string.ascii_lowercase[start : start + rng.randint(4, 7)]) + "."
        rows.append({"text": text})
    return rows


def make_kv_rows(rng: random.Random, n: int) -> list[dict]:
    """Key-value retrieval: a long list of `key: value` lines, then a question about one key.

    About 8 tokens per line with the builtin tokenizer, so 22..310 lines span roughly 200..3000 tokens.
    Line counts are log-uniform so that most rows are short enough for CPU training.
    """
    rows = []
    for _ in range(n):
        n_lines = int(round(22 * (310 / 22) ** rng.random()))
        keys: list[str] = []
        seen: set[str] = set()
        while len(keys) < n_lines:
            key = "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
            if key not in seen:
                seen.add(key)
                keys.append(key)
        values = [str(rng.randint(1000, 9999)) for _ in keys]
        target = rng.randrange(n_lines)
        lines = "\n".join(f"{k}: {v}" for k, v in zip(keys, values, strict=True))
        question = f"Below is a list of keys and values.\n{lines}\nWhat is the value of key {keys[target]}?"
        rows.append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": values[target]}]}
        )
    return rows


def make_dpo_rows(rng: random.Random, n: int) -> list[dict]:
    """Alpaca preference rows: chosen is the correct answer, rejected a plausible wrong one."""
    rows = []
    for i in range(n):
        kind, instruction, inp, out = make_kind_task(rng)
        row = {"instruction": instruction, "input": inp, "chosen": out, "rejected": wrong_answer(rng, kind, inp, out)}
        if i % 10 == 0:
            row["system"] = rng.choice(SYSTEM_PROMPTS)
        rows.append(row)
    return rows


def make_kto_rows(rng: random.Random, n: int) -> list[dict]:
    """ShareGPT rows with a boolean `kto_tag`: exactly half correct answers (true), half wrong ones (false)."""
    tags = [True] * (n // 2) + [False] * (n - n // 2)
    rng.shuffle(tags)
    rows = []
    for i, desirable in enumerate(tags):
        kind, instruction, inp, out = make_kind_task(rng)
        question = f"{instruction}\n{inp}" if inp else instruction
        turns = [{"from": "system", "value": rng.choice(SYSTEM_PROMPTS)}] if i % 5 == 0 else []
        answer = out if desirable else wrong_answer(rng, kind, inp, out)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        rows.append({"conversations": turns, "kto_tag": desirable})
    return rows


def write_json(path: Path, rows: list[dict]) -> None:
    # One row per line: small diffs, and DataError line numbers match row numbers.
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "sft_demo.json", make_sft_rows(random.Random(1), 3000))
    write_json(args.out / "sharegpt_demo.json", make_sharegpt_rows(random.Random(2), 500))
    write_jsonl(args.out / "pt_demo.jsonl", make_pt_rows(random.Random(3), 2000))
    write_jsonl(args.out / "kv_retrieval.jsonl", make_kv_rows(random.Random(4), 300))
    write_json(args.out / "dpo_demo.json", make_dpo_rows(random.Random(5), 1500))
    write_json(args.out / "kto_demo.json", make_kto_rows(random.Random(6), 1500))
    for path in sorted(args.out.iterdir()):
        print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
