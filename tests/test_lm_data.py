"""proxrl.lm.data: JSONL / text readers with file-and-line errors."""
import pytest

from proxrl.errors import UserError
from proxrl.lm.data import read_jsonl, read_text_lines, write_jsonl


def err(fn, *a):
    with pytest.raises(UserError) as e:
        fn(*a)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_read_jsonl_ok(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n  \n{"prompt": "é", "completion": "", "x": 1}\n',
                 encoding="utf-8")
    rows = read_jsonl(p, ["prompt", "completion"])
    assert rows == [{"prompt": "a", "completion": "b"}, {"prompt": "é", "completion": "", "x": 1}]
    assert read_jsonl(write_jsonl(tmp_path / "o.jsonl", rows)) == rows


def test_read_jsonl_errors(tmp_path):
    p = tmp_path / "data.jsonl"
    good = '{"prompt": "a", "completion": "b"}\n'
    p.write_text(good * 6 + '{"prompt": "a", completion: 1}\n')
    msg = err(read_jsonl, p, ["prompt"])
    assert msg.startswith("data.jsonl line 7: invalid JSON (") and "column" in msg
    p.write_text(good * 8 + '{"prompt": "a"}\n')
    assert err(read_jsonl, p, ["prompt", "completion"]).startswith("data.jsonl line 9: missing key 'completion'")
    p.write_text(good + "[1, 2]\n")
    assert err(read_jsonl, p, []).startswith("data.jsonl line 2: expected a JSON object")
    p.write_text("\n\n")
    assert "no records" in err(read_jsonl, p, [])
    p.write_bytes(good.encode() + b'{"prompt": "\xff"}\n')
    assert err(read_jsonl, p, []).startswith("data.jsonl line 2: not valid UTF-8")
    assert "nope.jsonl" in err(read_jsonl, tmp_path / "nope.jsonl", [])
    assert "not a file" in err(read_jsonl, tmp_path, [])


def test_read_text_lines(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("  first line \n\nsecond\n")
    assert read_text_lines(p) == ["first line", "second"]
    assert read_text_lines(p, strip=False, skip_blank=False) == ["  first line ", "", "second"]
    p.write_text(" \n")
    assert "no non-blank lines" in err(read_text_lines, p)
    assert "missing.txt" in err(read_text_lines, tmp_path / "missing.txt")
