"""skip_bad_rows: malformed rows are left out and counted; without it the first one stops loading, naming file+row."""

from __future__ import annotations

import json

import pytest

from longtune.data import load_examples
from longtune.errors import DataError
from longtune.models.builtin import load_builtin_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_builtin_tokenizer()


def good(i: int) -> dict:
    return {"instruction": f"Question {i}?", "output": f"Answer {i}."}


def load(tok, root, name, **kw):
    return load_examples([name], dataset_dir=str(root), tokenizer=tok, template="chatml", stage="sft",
                         cutoff_len=128, cache_dir=str(root / "cache"), **kw)


def test_jsonl_with_two_bad_rows_among_ten(tok, tmp_path):
    lines = [json.dumps(good(i)) for i in range(10)]
    lines[3] = '{"instruction": "broken", "output": '  # line 4: not JSON
    lines[7] = json.dumps({"instruction": "no answer"})  # line 8: missing output
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as error:
        load(tok, tmp_path, "rows.jsonl")
    assert str(error.value).startswith(f"{path} line 4: invalid JSON")

    examples, stats = load(tok, tmp_path, "rows.jsonl", skip_bad_rows=True)
    assert len(examples) == 8
    assert (stats.rows, stats.kept, stats.skipped, stats.dropped) == (10, 8, 2, 0)
    assert stats.skipped_examples[0].startswith(f"{path} line 4: invalid JSON")
    assert "missing field 'output'" in stats.skipped_examples[1]
    kept_answers = [tok.decode([t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab != -100])
                    for e in examples]
    assert kept_answers == [f"Answer {i}.<|im_end|>\n" for i in range(10) if i not in (3, 7)]


def test_json_list_with_two_bad_rows_parse_and_render_errors(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
            for i in range(10)]
    rows[2] = {"messages": [{"role": "user", "content": "no reply"}]}  # fails when rendered: ends with a user turn
    rows[6] = {"messages": [{"role": "robot", "content": "??"}]}  # fails when parsed: unknown role
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))

    with pytest.raises(DataError) as error:  # rows are all parsed before any is rendered
        load(tok, tmp_path, "chat.json")
    assert str(error.value).startswith(f"{path} row 7: messages[0].role is 'robot'")
    rows[6] = rows[0]
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError) as error:
        load(tok, tmp_path, "chat.json")
    assert str(error.value).startswith(f"{path} row 3: a conversation must end with an assistant turn")
    rows[6] = {"messages": [{"role": "robot", "content": "??"}]}
    path.write_text(json.dumps(rows))
    examples, stats = load(tok, tmp_path, "chat.json", skip_bad_rows=True)
    assert len(examples) == 8 and stats.skipped == 2 and stats.rows == 10
    assert any(m.startswith(f"{path} row 7:") and "'robot'" in m for m in stats.skipped_examples)
    assert any(m.startswith(f"{path} row 3:") for m in stats.skipped_examples)


def test_bad_first_row_does_not_hide_the_format(tok, tmp_path):
    rows = ["not an object"] + [good(i) for i in range(4)]
    (tmp_path / "first.json").write_text(json.dumps(rows))
    examples, stats = load(tok, tmp_path, "first.json", skip_bad_rows=True)
    assert len(examples) == 4 and stats.skipped == 1
