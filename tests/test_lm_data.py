"""proxrl.lm.data: every input format through `datasets`, column mapping, one-line errors naming file, row, columns."""
import gzip
import json

import pytest

datasets = pytest.importorskip("datasets")

from proxrl.errors import UserError  # noqa: E402
from proxrl.lm.data import load_rows, load_table, write_jsonl  # noqa: E402

ROWS = [{"question": "1+1=", "answer": "2"}, {"question": "é+2=", "answer": "x"}, {"question": "3+3=", "answer": "6"}]
COLS = {"prompt": "question", "completion": "answer"}
WANT = [{"prompt": r["question"], "completion": r["answer"]} for r in ROWS]


def err(fn, *a, **kw):
    with pytest.raises(UserError) as e:
        fn(*a, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _write(tmp_path, fmt):
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", ROWS)
    if fmt == "jsonl.gz":
        p = tmp_path / "d.jsonl.gz"
        p.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
        return p
    if fmt == "json":
        p = tmp_path / "d.json"
        p.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
        return p
    if fmt == "csv":
        p = tmp_path / "d.csv"
        p.write_text("question,answer\n" + "".join(f"{r['question']},{r['answer']}\n" for r in ROWS), encoding="utf-8")
        return p
    if fmt == "parquet":
        p = tmp_path / "d.parquet"
        datasets.Dataset.from_list(ROWS).to_parquet(str(p))
        return p
    if fmt == "save_to_disk":
        p = tmp_path / "ds"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(p))
        return p
    if fmt == "save_to_disk:test":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                              "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
        return f"{tmp_path / 'dd'}:test"
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json", "csv", "parquet", "save_to_disk", "save_to_disk:test"])
def test_every_format_gives_the_same_rows(tmp_path, fmt):
    assert load_rows(_write(tmp_path, fmt), columns=COLS) == WANT


def test_text_files_one_row_per_non_blank_line(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("  first line \n\nsecond\n")
    assert load_table(p).rows == [{"text": "first line"}, {"text": "second"}]
    g = tmp_path / "t.txt.gz"
    g.write_bytes(gzip.compress(b"a b\n \nc\n"))
    assert load_rows(g, columns={"text": "text"}) == [{"text": "a b"}, {"text": "c"}]


def test_csv_columns_are_text(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('prompt,completion\n"1,2",0123\n3,4.50\n')
    rows = load_rows(p, columns={"p": "prompt", "c": "completion"})
    assert rows == [{"p": "1,2", "c": "0123"}, {"p": "3", "c": "4.50"}]


def test_dataset_dict_defaults_to_train_and_names_splits(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                          "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    assert load_rows(tmp_path / "dd", columns=COLS) == WANT[:1]
    msg = err(load_rows, f"{tmp_path / 'dd'}:validation", columns=COLS)
    assert "no split 'validation'" in msg and "train, test" in msg


def test_missing_column_names_the_columns_present_and_the_flag(tmp_path):
    p = _write(tmp_path, "csv")
    msg = err(load_rows, p, columns={"prompt": "prompt", "completion": "answer"})
    assert msg == ("d.csv has no column 'prompt' (columns: 'question', 'answer'); pass --prompt-column with the "
                   "column to use")
    # an optional column may be absent: its value is None
    assert load_rows(p, columns={"prompt": "nope", "chosen": "answer"}, optional=["prompt"])[0] == \
        {"prompt": None, "chosen": "2"}


def test_null_and_mistyped_values_name_file_row_and_column(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n')
    assert err(load_rows, p, columns={"prompt": "prompt", "completion": "completion"}) == \
        "d.jsonl row 2: 'completion' is empty (null); every row needs a value there"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 3}\n')
    assert err(load_rows, p, columns={"prompt": "prompt", "completion": "completion"}).startswith(
        "d.jsonl row 2: 'completion' must be a string, got int")
    p.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "user"}]}\n')
    msg = err(load_rows, p, columns={"messages": "messages"}, kinds={"messages": "messages"})
    assert msg.startswith("d.jsonl row 2: 'messages': message 0 needs string 'role' and 'content'"), msg
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": "plain"}])
    rows = load_rows(ok, columns={"prompt": "prompt"}, kinds={"prompt": "text_or_messages"})
    assert rows == [{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": "plain"}]


def test_unparsable_files_name_the_line(tmp_path):
    p = tmp_path / "data.jsonl"
    good = '{"prompt": "a", "completion": "b"}\n'
    p.write_text(good * 6 + '{"prompt": "a", completion: 1}\n')
    msg = err(load_table, p)
    assert msg.startswith("data.jsonl line 7: invalid JSON (") and "column" in msg
    p.write_text(good + "[1, 2]\n")
    assert err(load_table, p).startswith("data.jsonl line 2: expected a JSON object")
    p.write_bytes(good.encode() + b'{"prompt": "\xff"}\n')
    assert err(load_table, p).startswith("data.jsonl line 2: not valid UTF-8")
    p.write_text("\n\n")
    assert err(load_table, p) == "data.jsonl: no records; give a non-empty data file"
    q = tmp_path / "d.parquet"
    q.write_text("not parquet")
    assert err(load_table, q).startswith("cannot read data file d.parquet as PARQUET: ")
    u = tmp_path / "d.xlsx"
    u.write_text("x")
    assert "unknown format" in err(load_table, u)


def test_missing_file_and_offline_hub_name(tmp_path):
    assert err(load_table, tmp_path / "nope.jsonl").startswith(f"data file '{tmp_path / 'nope.jsonl'}' does not exist")
    assert "does not exist" in err(load_table, "data/missing.csv", what="prompts")
    msg = err(load_table, "some-org/some-data:test")
    assert msg.startswith("data 'some-org/some-data:test' is not a local file, and the hub data set "
                          "'some-org/some-data' cannot be loaded: the hub is unreachable or offline"), msg
    assert "pass a local file" in msg


def test_local_files_leave_no_cache_behind(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    load_rows(_write(tmp_path, "csv"), columns=COLS)
    assert not cache.exists() or not any(cache.rglob("*.arrow"))
