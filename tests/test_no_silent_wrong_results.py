"""No wrong result without a word: inputs that used to give a silently wrong run now stop with exit 2 and
one line before anything is written, or warn and record what they changed. Driven through the CLI as a user would.

The run tests replace loop.run_rounds with a stub that only splits the data (and marks stages done where a test
needs finished stages): what is checked here happens before any training, so training would only cost time.
"""

import json
import shutil

import pytest
from conftest import ONE_ROUND, assert_one_line_error, invoke, write_prefs

# -- 1. relative paths and the SFT model a resume uses --------------------------------------------------------


def test_relative_model_and_data_are_stored_absolute(tiny_preset, gold_rows, stub_rounds, tmp_path, monkeypatch):
    from selfie_lite.fingerprint import model_fingerprint

    work = tmp_path / "work"
    shutil.copytree(tiny_preset.model_dir, work / "sft")
    write_prefs(work / "prefs.jsonl", gold_rows)
    monkeypatch.chdir(work)
    r = invoke("run", "--model", "sft", "--data", "prefs.jsonl", *ONE_ROUND, "--out", "run")
    assert r.exit_code == 0, r.output
    cfg = json.loads((work / "run" / "config.json").read_text())
    assert cfg["model"] == str((work / "sft").resolve())
    assert cfg["data"]["source"] == str((work / "prefs.jsonl").resolve())
    split = json.loads((work / "run" / "data" / "split.json").read_text())
    assert split["sft_model"] == cfg["model"]
    # A content hash: a copy of the same weights has the same one.
    assert split["sft_model_hash"].startswith("sha256:")
    assert split["sft_model_hash"] == model_fingerprint(tiny_preset.model_dir)

    # From another folder that holds its own (different) ./sft, the resume still uses the run's model.
    other = tmp_path / "other"
    shutil.copytree(tiny_preset.model_dir, other / "sft")
    _flip_last_byte(other / "sft" / "model.safetensors")
    monkeypatch.chdir(other)
    r = invoke("run", "--resume", work / "run")
    assert r.exit_code == 0, r.output


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fingerprint_of_big_weights_samples_them(tiny_preset, tmp_path, monkeypatch):
    """Over FULL_HASH_BYTES the hash reads the header and sampled blocks: copies match, another model does not."""
    from selfie_lite import fingerprint

    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 1000)  # the tiny model (2 MB) takes the big-model path
    shutil.copytree(tiny_preset.model_dir, tmp_path / "a")
    shutil.copytree(tiny_preset.model_dir, tmp_path / "b")
    assert fingerprint.model_fingerprint(tmp_path / "a") == fingerprint.model_fingerprint(tiny_preset.model_dir)
    _flip_last_byte(tmp_path / "b" / "model.safetensors")
    assert fingerprint.model_fingerprint(tmp_path / "b") != fingerprint.model_fingerprint(tmp_path / "a")
    assert fingerprint.model_fingerprint("org/hub-model") is None


def test_resume_refuses_a_different_sft_model(tiny_preset, stub_rounds, tmp_path, monkeypatch):
    work, other = tmp_path / "work", tmp_path / "other"
    shutil.copytree(tiny_preset.model_dir, work / "sft")
    shutil.copytree(tiny_preset.model_dir, other / "sft")
    _flip_last_byte(other / "sft" / "model.safetensors")  # another model that happens to sit at ./sft
    monkeypatch.chdir(work)
    r = invoke("run", "--model", "sft", *ONE_ROUND, "--out", "run")
    assert r.exit_code == 0, r.output
    # A run folder made before paths were stored absolute: config.json says "sft", as typed.
    cfg_path = work / "run" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, model="sft")))
    before = cfg_path.read_text()
    monkeypatch.chdir(other)
    r = invoke("run", "--resume", work / "run")
    assert_one_line_error(r, 2, f"started from the SFT model {(work / 'sft').resolve()} (sha256:",
                          "but this resume would use sft (sha256:")
    assert cfg_path.read_text() == before  # nothing written
    assert not (work / "run" / "round-0" / "done").exists()


def test_resume_refuses_when_the_recorded_sft_model_is_gone(tiny_preset, stub_rounds, tmp_path, monkeypatch):
    shutil.copytree(tiny_preset.model_dir, tmp_path / "sft")
    r = invoke("run", "--model", tmp_path / "sft", *ONE_ROUND, "--out", "run")
    assert r.exit_code == 0, r.output
    (tmp_path / "sft").rename(tmp_path / "sft-moved")
    before = (tmp_path / "run" / "config.json").read_text()
    r = invoke("run", "--resume", "run")
    assert_one_line_error(r, 2, f"run started from the SFT model {(tmp_path / 'sft').resolve()}, which is missing now",
                          "put that model back")
    assert (tmp_path / "run" / "config.json").read_text() == before
    # The same weights in their new place are accepted (the content hash matches), with --force for the new path.
    r = invoke("run", "--resume", "run", "--model", tmp_path / "sft-moved", *ONE_ROUND, "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == str((tmp_path / "sft-moved").resolve())


# -- 2. numeric settings out of range --------------------------------------------------------------------------

RANGE_BAD = [
    (["run", "--set", "data.test_size=-5"], "data.test_size must be >= 0, got -5"),
    (["run", "--set", "sample.chunk_size=0"], "sample.chunk_size must be >= 1, got 0"),
    (["run", "--set", "sample.batch_size=0"], "sample.batch_size must be >= 1, got 0"),
    (["run", "--set", "judge.batch_size=0"], "judge.batch_size must be >= 1, got 0"),
    (["run", "--set", "sample.max_new_tokens=0"], "sample.max_new_tokens must be >= 1, got 0"),
    (["run", "--set", "lora.r=0"], "lora.r must be >= 1, got 0"),
    (["run", "--set", "lora.alpha=0"], "lora.alpha must be > 0, got 0"),
    (["run", "--random-seed", "-1"], "--random-seed must be in [0, 2147483647], got -1"),
    (["run", "--set", "refine.window_pairs=0"], "refine.window_pairs must be >= 1, got 0"),
    (["run", "--set", "refine.vocab_chunk=0"], "refine.vocab_chunk must be >= 1, got 0"),
    (["run", "--set", "train.warmup_ratio=1.0"], "train.warmup_ratio must be in [0, 1), got 1.0"),
    (["run", "--set", "train.warmup_ratio=-0.1"], "train.warmup_ratio must be in [0, 1), got -0.1"),
    (["run", "--set", "refine.warmup_frac=1.5"], "refine.warmup_frac must be in [0, 1], got 1.5"),
    (["run", "--set", "data.max_bad_rows=2"], "data.max_bad_rows must be in [0, 1], got 2.0"),
    (["run", "--set", "train.weight_decay=-0.1"], "train.weight_decay must be >= 0, got -0.1"),
    (["run", "--set", "train.max_grad_norm=-1"], "train.max_grad_norm must be >= 0, got -1.0"),
    (["run", "--set", "train.max_length=0"], "train.max_length must be >= 1, got 0"),
    (["run", "--set", "refine.lambdas=[0.5, -0.25, 0.125]"], "refine.lambdas[1] must be >= 0, got -0.25"),
    (["run", "--set", "data.pool_ratio=[8, 0, 30]"], "data.pool_ratio[1] must be > 0, got 0.0"),
    (["run", "--set", "data.pool_sizes=[10, 0, 5]"], "data.pool_sizes[1] must be >= 1, got 0"),
    (["run", "--beta", "-1"], "beta must be > 0, got -1.0"),
    (["run", "--set", "lora.dropout=1"], "lora.dropout must be in [0, 1), got 1.0"),
    (["judge", "in.jsonl", "--policy", "a", "--reference", "b", "--beta", "-1"], "--beta must be > 0, got -1.0"),
    (["judge", "in.jsonl", "--policy", "a", "--reference", "b", "--beta", "0"], "--beta must be > 0, got 0.0"),
    (["judge", "in.jsonl", "--policy", "a", "--reference", "b", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["eval", "nowhere", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["eval", "nowhere", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["eval", "nowhere", "--random-seed", "-3"], "--random-seed must be in [0, 2147483647], got -3"),
]


@pytest.mark.parametrize("args,message", RANGE_BAD, ids=[" ".join(a) for a, _ in RANGE_BAD])
def test_out_of_range_settings_exit_2_before_anything_is_written(args, message, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n")
    r = invoke(*args)
    assert_one_line_error(r, 2, message)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "pairs.jsonl").exists()


# -- 3. chosen == rejected -------------------------------------------------------------------------------------


def test_identical_pairs_are_dropped_with_a_warning(gold_rows, stub_rounds, tmp_path):
    rows = [dict(r) for r in gold_rows]
    for r in rows[:10]:
        r["rejected"] = r["chosen"] + "  "  # the same text (surrounding space does not make a preference)
    r = invoke("run", "--data", write_prefs(tmp_path / "prefs.jsonl", rows), *ONE_ROUND, "--out", "run")
    assert r.exit_code == 0, r.output
    assert "warning: 10 of 6000 rows have chosen identical to rejected (no preference): dropped" in r.output
    split = json.loads((tmp_path / "run" / "data" / "split.json").read_text())
    assert split["dropped_identical_pairs"] == 10 and split["valid_rows"] == 5990
    for name in ("seed.jsonl", "test.jsonl"):
        pairs = [json.loads(x) for x in (tmp_path / "run" / "data" / name).read_text().splitlines()]
        assert pairs and all(p["chosen"].strip() != p["rejected"].strip() for p in pairs)


def test_mostly_identical_pairs_are_refused(gold_rows, tmp_path):
    rows = [dict(r, rejected=r["chosen"]) if i % 5 < 3 else r for i, r in enumerate(gold_rows)]  # 60%
    r = invoke("run", "--data", write_prefs(tmp_path / "prefs.jsonl", rows), *ONE_ROUND, "--out", "run")
    assert_one_line_error(r, 2, "3600 of 6000 rows in", "have chosen identical to rejected: nothing to learn from",
                          "same field")
    assert not (tmp_path / "run").exists()


# -- 4. --resume --force keeps the old settings ----------------------------------------------------------------


def test_forced_resume_keeps_the_old_settings_and_names_them(tiny_preset, stub_rounds, tmp_path):
    stub_rounds.stages = ["train", "merge"]
    out = tmp_path / "run"
    r = invoke("run", *ONE_ROUND, "--out", out)
    assert r.exit_code == 0, r.output
    old = json.loads((out / "config.json").read_text())
    assert json.loads((out / "round-0" / "done" / "train.json").read_text())["config_rev"] == 0

    lr0 = old["train"]["learning_rate"]  # the preset's, as saved
    change = f"train.learning_rate: {json.dumps(lr0)} -> 0.0001"
    r = invoke("run", "--resume", out, *ONE_ROUND, "--set", "train.learning_rate=1e-4")
    assert_one_line_error(r, 2, "was made with other settings", change, "--force")
    assert not (out / "config.0.json").exists()

    r = invoke("run", "--resume", out, *ONE_ROUND, "--set", "train.learning_rate=1e-4", "--force")
    assert r.exit_code == 0, r.output
    for line in (f"settings changed (--force): config rev 0 -> 1: {change}",
                 f"The old settings are kept in {out / 'config.0.json'}",
                 "ran under config rev 0: round-0 train", "unfinished stages run under config rev 1"):
        assert line in r.output, (line, r.output)
    assert json.loads((out / "config.0.json").read_text()) == old
    assert json.loads((out / "config.json").read_text())["train"]["learning_rate"] == 1e-4
    (hist,) = [json.loads(x) for x in (out / "config-history.jsonl").read_text().splitlines()]
    assert hist["rev"] == 1 and hist["previous"] == "config.0.json"
    assert hist["changes"] == [change]
    train, merge = (json.loads((out / "round-0" / "done" / f"{s}.json").read_text()) for s in ("train", "merge"))
    assert (train["config_rev"], train["learning_rate"]) == (0, lr0)
    assert (merge["config_rev"], merge["learning_rate"]) == (1, 1e-4)

    # A plain resume changes nothing: no new revision.
    r = invoke("run", "--resume", out)
    assert r.exit_code == 0, r.output
    assert len((out / "config-history.jsonl").read_text().splitlines()) == 1 and not (out / "config.1.json").exists()
