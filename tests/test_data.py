"""Each data source, the validation of rows, and a deterministic split."""

import json

import pytest

from selfie_lite.config import DataConfig
from selfie_lite.data import load_rows, load_split, normalize_row, split_rows, validate_rows
from selfie_lite.errors import UserError


def make_rows(n, messages=False):
    rows = []
    for i in range(n):
        p, c, r = f"question {i}?", f"good answer {i}", f"bad answer {i}"
        if messages:  # UltraFeedback-binarized shape: message lists
            rows.append({
                "prompt": p,
                "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                "score_chosen": 8.0, "score_rejected": 3.0,
            })
        else:
            rows.append({"prompt": p, "chosen": c, "rejected": r})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_parquet_and_disk_folder_give_the_same_rows(tmp_path):
    import datasets

    rows = make_rows(20, messages=True)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dictfolder"))
    write_jsonl(tmp_path / "d.jsonl", rows)
    expected = [normalize_row(r) for r in rows]
    for src in ("d.jsonl", "d.parquet", "folder", "dictfolder"):
        got = [normalize_row(r) for r in load_rows(str(tmp_path / src))]
        assert got == expected, src
    assert expected[0] == {"prompt": "question 0?", "chosen": "good answer 0", "rejected": "bad answer 0",
                           "score_chosen": 8.0, "score_rejected": 3.0}


def test_prompt_taken_from_messages_when_missing():
    row = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}
    assert normalize_row(row) == {"prompt": "hi", "chosen": "hello", "rejected": "go away"}


@pytest.mark.parametrize(
    "row,reason",
    [({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
     ({"prompt": "p", "chosen": "", "rejected": "r"}, "empty text"),
     ({"prompt": 3, "chosen": "c", "rejected": "r"}, "prompt is missing or not text"),
     ({"prompt": "p", "chosen": 5, "rejected": "r"}, "chosen/rejected must be text"),
     ({"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": "high"}, "score_chosen must be a number")],
)
def test_bad_rows_are_named(row, reason):
    assert reason in normalize_row(row)


def test_few_bad_rows_are_skipped_and_counted():
    rows = make_rows(200)
    rows[5]["chosen"] = ""
    good, bad = validate_rows(rows, max_bad=0.01)
    assert len(good) == 199 and bad == [(5, "empty text")]


def test_too_many_bad_rows_refuse_with_indexes():
    rows = make_rows(100)
    for i in (3, 7, 9):
        rows[i]["rejected"] = None
    with pytest.raises(UserError, match=r"3 of 100 rows .*\(row 3: chosen/rejected"):
        validate_rows(rows, max_bad=0.01)


def test_wrong_column_name_suggests_the_close_one(tmp_path):
    rows = [{"prompt": "p", "choosen": "c", "rejected": "r"}] * 5
    with pytest.raises(UserError, match="no column 'chosen'") as e:
        validate_rows(rows, 0.01)
    assert "'choosen'" in e.value.hint


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="is empty"):
        load_rows(str(tmp_path / "empty.jsonl"))
    with pytest.raises(UserError, match="not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="unsupported file type"):
        load_rows(str(write_jsonl(tmp_path / "x.csv", make_rows(2))))


def test_hub_name_while_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hub is offline"):
        load_rows("argilla/ultrafeedback-binarized-preferences-cleaned")


def test_split_sizes_and_determinism():
    rows = make_rows(1000)
    cfg = DataConfig(labelled_share="3.3pct", test_size=100)
    a = split_rows(rows, cfg, rounds=3, random_seed=7)
    b = split_rows(rows, cfg, rounds=3, random_seed=7)
    c = split_rows(rows, cfg, rounds=3, random_seed=8)
    assert len(a.seed_pairs) == 33 and len(a.test_pairs) == 100
    assert [len(p) for p in a.pools] == [int(867 * 8 / 58), int(867 * 20 / 58), int(867 * 30 / 58)]
    assert a.seed_pairs == b.seed_pairs and a.pools == b.pools and a.test_pairs == b.test_pairs
    assert a.seed_pairs != c.seed_pairs
    # Seed, pools and test never share a prompt.
    seen = [r["prompt"] for r in a.seed_pairs] + [p for pool in a.pools for p in pool] + [r["prompt"] for r in a.test_pairs]
    assert len(seen) == len(set(seen))


def test_explicit_pool_sizes_and_too_small_data():
    rows = make_rows(300)
    s = split_rows(rows, DataConfig(labelled_share="10", test_size=50, pool_sizes=[20, 30, 40]), rounds=3, random_seed=0)
    assert [len(p) for p in s.pools] == [20, 30, 40]
    with pytest.raises(UserError, match="do not fit"):
        split_rows(rows, DataConfig(labelled_share="10", test_size=50, pool_sizes=[100, 100, 100]), rounds=3, random_seed=0)
    with pytest.raises(UserError, match="cannot hold"):
        split_rows(rows, DataConfig(labelled_share="280", test_size=50), rounds=3, random_seed=0)
    # Seed-only DPO (rounds = 0) may use every row, but seed and test pairs still never overlap.
    s = split_rows(rows, DataConfig(labelled_share="250", test_size=50), rounds=0, random_seed=0)
    assert len(s.seed_pairs) == 250 and len(s.test_pairs) == 50 and s.pools == []
    with pytest.raises(UserError, match="cannot hold 280 seed pairs, a 50-row test split$"):
        split_rows(rows, DataConfig(labelled_share="280", test_size=50), rounds=0, random_seed=0)


def test_load_split_end_to_end(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", make_rows(400, messages=True))
    s = load_split(DataConfig(source=str(path), labelled_share="5%", test_size=40), rounds=2, random_seed=1)
    assert len(s.seed_pairs) == 20 and len(s.pools) == 2 and s.n_rows == 400 and s.n_bad == 0


def test_jsonl_with_mixed_shapes_and_a_broken_line(tmp_path):
    rows = make_rows(300)
    rows[1::2] = make_rows(300, messages=True)[1::2]  # odd rows as message lists, even rows as plain strings
    text = "".join(json.dumps(r) + "\n" for r in rows).splitlines()
    text[7] = '{"prompt": "cut off'  # one broken line
    (tmp_path / "mixed.jsonl").write_text("\n".join(text) + "\n")
    good, bad = validate_rows(load_rows(str(tmp_path / "mixed.jsonl")), max_bad=0.01)
    assert len(good) == 299 and bad == [(7, "line is not valid JSON")]
    assert good[0]["chosen"] == "good answer 0" and good[1]["chosen"] == "good answer 1"


def test_identical_pairs_are_dropped_and_counted(tmp_path):
    rows = make_rows(100)
    for r in rows[:7]:
        r["rejected"] = r["chosen"]
    s = load_split(DataConfig(source=str(write_jsonl(tmp_path / "d.jsonl", rows)), labelled_share="10", test_size=20,
                              pool_sizes=[30]), 1, 0)
    assert s.n_identical == 7 and s.n_rows == 93
    assert all(p["chosen"] != p["rejected"] for p in s.seed_pairs + s.test_pairs)
    for r in rows[:60]:
        r["rejected"] = r["chosen"]
    with pytest.raises(UserError, match="60 of 100 rows in .* have chosen identical to rejected"):
        load_split(DataConfig(source=str(write_jsonl(tmp_path / "d.jsonl", rows)), labelled_share="10", test_size=20,
                              pool_sizes=[30]), 1, 0)
