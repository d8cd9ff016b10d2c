"""Faults in a run folder, resume and output: a resume checks each finished stage's outputs and
redoes the stage whose outputs are gone or damaged (saying so) to the same result; run files that cannot be rebuilt
are refused in one line naming them; a forced resume cannot change the data split; a full disk names its file and
leaves no temp file; weights follow the umask; a log keeps every column; the guard's verdict is printed once.

Driven through the CLI on the toy model with FakeBackend (selfie_lite/testing.py: canned samples and judges, real
training and merging), so a 2-round run takes seconds; bit-identity of redone stages is checked as
tests/test_loop.py checks kill-and-resume.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke, one_line
from safetensors.torch import load_file

import selfie_lite.backends
from selfie_lite.testing import FakeBackend, reversing_judge, toy_preferences

FLAGS = ["--seed", "24", "--rounds", "2", "--set", "data.pool_sizes=[16, 16]", "--set", "data.test_size=20",
         "--set", "sample.max_new_tokens=8", "--set", "sample.chunk_size=8", "--set", "train.batch_size=4",
         "--set", "train.grad_accum=1", "--set", "train.max_length=64", "--set", "train.max_prompt_length=32",
         "--set", "train.gradient_checkpointing=false", "--set", "lora.r=4", "--set", "lora.alpha=8"]
# The default method (selfie): round 2 has every stage but the guard (sample, judge, consistency, reference, train,
# merge), so each stage's declared outputs are checked somewhere below.


def fake_backend(cfg):
    return FakeBackend(cfg), "scripted (tests)"


@pytest.fixture(autouse=True)
def _fake(monkeypatch):
    monkeypatch.setattr(selfie_lite.backends, "get_backend", fake_backend)





@pytest.fixture(scope="module")
def finished(toy, tmp_path_factory):
    """A finished 2-round run, never changed: each test damages a copy (copy_run)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selfie_lite.backends, "get_backend", fake_backend)
        r = invoke("run", "--model", toy[0], "--data", toy[1], *FLAGS, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def weights(run: Path, i: int) -> dict:
    return load_file(str(run / f"round-{i}" / "model" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, rounds=(0, 1, 2)):
    for i in rounds:
        wa, wb = weights(a, i), weights(b, i)
        assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa), f"round {i}"


def snapshot(run: Path) -> dict:
    """Every file of a run folder with its size and mtime: what a refused command must leave alone."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}


def mtime(p: Path) -> int:
    return p.stat().st_mtime_ns


# -- (b) a deleted model, a damaged marker or chunk: redone, to the same result ----------------------------------


def test_a_deleted_model_is_merged_again_to_the_same_weights_and_never_reported_missing(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    shutil.rmtree(out / "round-1" / "model")
    shutil.rmtree(out / "round-2" / "model")
    trained = {n: mtime(out / "round-2" / "done" / f"{n}.json")
               for n in ("sample", "judge", "consistency", "reference", "train")}
    r = invoke("run", "--resume", out)
    assert r.exit_code == 0, r.output
    text = one_line(r)
    assert "resume: round-1 merge: model/ is missing; redoing the stage" in text
    assert "resume: round-2 merge: model/ is missing; redoing the stage" in text
    assert_same_weights(out, finished)  # merging the same adapter again is deterministic
    # The re-merged round 1 has the very bytes round 2 was made from: round 2's other stages stand.
    assert {n: mtime(out / "round-2" / "done" / f"{n}.json") for n in trained} == trained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_model"] == str((out / "round-2" / "model").resolve())
    assert (Path(summary["final_model"]) / "model.safetensors").is_file()
    assert f"Final model (round 2): {summary['final_model']}" in text


@pytest.mark.parametrize("lost", [("model",), ("model", "adapter")])
def test_a_deleted_round_0_model_under_an_unfinished_round_1_is_made_again(finished, tmp_path, lost):
    """round-0/model gone while round 1 had not trained: merged again from round-0/adapter, or, with the adapter
    gone too, trained again; either way the run then ends with the weights of the uninterrupted run."""
    out = copy_run(finished, tmp_path / "run")
    for name in ("adapter", "model"):
        shutil.rmtree(out / "round-1" / name)
    for name in ("done/train.json", "done/merge.json", "pairs.jsonl", "metrics.json"):
        (out / "round-1" / name).unlink()
    shutil.rmtree(out / "round-2")
    (out / "summary.json").unlink()
    for name in lost:
        shutil.rmtree(out / "round-0" / name)
    r = invoke("run", "--resume", out)
    assert r.exit_code == 0, r.output
    text = one_line(r)
    assert "resume: round-0 merge: model/ is missing; redoing the stage" in text
    assert ("resume: round-0 train: adapter/ is missing; redoing the stage" in text) == ("adapter" in lost)
    assert_same_weights(out, finished)
    for i in (1, 2):
        assert (out / f"round-{i}" / "judged.jsonl").read_text() == (finished / f"round-{i}" / "judged.jsonl").read_text()


def test_a_damaged_marker_or_sample_chunk_is_redone_to_the_same_files(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    (out / "round-1" / "done" / "judge.json").write_text('{"pairs": 1')  # cut short
    chunk = out / "round-2" / "samples" / "chunk-00001.jsonl"
    chunk.write_text(chunk.read_text()[:40])
    shutil.rmtree(out / "round-2" / "model")  # round 2 unfinished: its stages are looked into
    kept = {n: mtime(out / "round-2" / "done" / f"{n}.json") for n in ("judge", "consistency", "reference", "train")}
    r = invoke("run", "--resume", out)
    assert r.exit_code == 0, r.output
    text = one_line(r)
    assert "resume: round-1 judge: done/judge.json is damaged (not valid JSON); redoing the stage" in text
    assert "resume: round-2 sample: samples/chunk-00001.jsonl is damaged (line 1 is not JSON); redoing the stage" in text
    assert "Traceback" not in r.output
    # Redone to the same bytes, so what was made from them stands and the run ends as before.
    assert chunk.read_text() == (finished / "round-2" / "samples" / "chunk-00001.jsonl").read_text()
    marker = json.loads((out / "round-1" / "done" / "judge.json").read_text())
    assert marker["outputs_sha256"] == json.loads((finished / "round-1" / "done" / "judge.json").read_text())["outputs_sha256"]
    assert {n: mtime(out / "round-2" / "done" / f"{n}.json") for n in kept} == kept
    assert_same_weights(out, finished)


def test_a_damaged_chunk_of_an_unfinished_sampling_stage_is_sampled_again(finished, tmp_path):
    """Killed while sampling round 2, then a finished chunk was damaged: it is sampled again, not read."""
    out = copy_run(finished, tmp_path / "run")
    for p in (out / "round-2").iterdir():
        if p.name != "samples":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    chunk = out / "round-2" / "samples" / "chunk-00001.jsonl"
    chunk.write_bytes(b"\xff\xfe not text")
    r = invoke("run", "--resume", out)
    assert r.exit_code == 0, r.output
    assert "resume: round-2 sample: samples/chunk-00001.jsonl is damaged (not UTF-8 text); making it again" in one_line(r)
    assert chunk.read_text() == (finished / "round-2" / "samples" / "chunk-00001.jsonl").read_text()
    assert_same_weights(out, finished)


@pytest.mark.parametrize("stage,lose,said", [
    ("merge", ["model"], "model/ is missing"),
    ("judge", ["judged.jsonl", "model"], "judged.jsonl is missing"),  # without its model, round 1 is looked into
])
def test_a_stage_redone_with_other_results_redoes_what_was_made_from_it(finished, tmp_path, stage, lose, said):
    """A redone stage whose outputs differ from the ones its marker recorded (as when it is redone on another CPU)
    makes everything made from them stale: the later stages of its round and, through round 1's model, round 2."""
    out = copy_run(finished, tmp_path / "run")
    m = out / "round-1" / "done" / f"{stage}.json"
    m.write_text(json.dumps(json.loads(m.read_text()) | {"outputs_sha256": "sha256:made-elsewhere"}))
    for name in lose:
        path = out / "round-1" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    round_2 = mtime(out / "round-2" / "done" / "train.json")
    r = invoke("run", "--resume", out)
    assert r.exit_code == 0, r.output
    text = one_line(r)
    assert f"resume: round-1 {stage}: {said}; redoing the stage" in text
    if stage == "judge":
        assert "resume: round-1 judge: redone with other results than before; redoing the stages after it" in text
    assert "resume: round-2: it starts from a model that was made again with other weights; redoing the round" in text
    assert mtime(out / "round-2" / "done" / "train.json") != round_2  # round 2 trained again
    assert_same_weights(out, finished)  # on this machine the redone stages made the same bytes after all


# -- damaged files that cannot be rebuilt: one line, exit 2, nothing written ---------------------------------------


def test_a_damaged_config_json_is_refused_naming_the_file_and_the_way_back(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    (out / "config.json").write_text('{"model": ')
    before = snapshot(out)
    r = invoke("run", "--resume", out)
    assert r.exit_code == 2, r.output
    assert f"error: {out / 'config.json'} is damaged (not valid JSON)" in one_line(r)
    assert "cannot be resumed" in one_line(r) and "Traceback" not in r.output
    assert snapshot(out) == before
    # A --force change kept the settings before it: the hint points there.
    (out / "config.0.json").write_text((finished / "config.json").read_text())
    r = invoke("run", "--resume", out)
    assert r.exit_code == 2, r.output
    assert f"{out / 'config.0.json'} holds the settings before the last --force change" in one_line(r)


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "split.json").write_text("{"), "data/split.json is damaged (not valid JSON)"),
    (lambda d: (d / "split.json").unlink(), "data/split.json is missing, but rounds of this run have finished"),
    (lambda d: (d / "pool-2.jsonl").unlink(), "data/pool-2.jsonl is missing (part of the run's data split)"),
    (lambda d: (d / "seed.jsonl").write_text('{"prompt"\n'), "data/seed.jsonl is damaged (line 1 is not JSON)"),
])
def test_a_damaged_data_split_is_refused_before_anything_is_written(finished, tmp_path, damage, message):
    out = copy_run(finished, tmp_path / "run")
    damage(out / "data")
    before = snapshot(out)
    r = invoke("run", "--resume", out)
    assert r.exit_code == 2, r.output
    assert message in one_line(r) and "restore it from a backup" in one_line(r), r.output
    assert "Traceback" not in r.output
    assert snapshot(out) == before


# -- --resume --force that would change the split -------------------------------------------------------------


def test_a_forced_resume_cannot_change_the_split_or_outgrow_it(finished, toy, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    other = toy_preferences(tmp_path / "other.jsonl", n=200, seed=1)
    before = snapshot(out)
    cases = [
        (["--data", other], "data.source"),
        (["--random-seed", "7"], "random_seed: 42 -> 7"),
        (["--set", "data.test_size=30"], "data.test_size: 20 -> 30"),
        (["--set", "data.pool_sizes=[16, 8]"], "data.pool_sizes"),
    ]
    for flags, change in cases:
        r = invoke("run", "--resume", out, "--force", *flags)
        assert r.exit_code == 2, (flags, r.output)
        assert f"error: --force cannot change the data split of {out}" in one_line(r) and change in one_line(r)
        assert snapshot(out) == before, flags  # config.json untouched, no config.0.json
    r = invoke("run", "--resume", out, "--force", "--rounds", "3", "--set", "data.pool_sizes=[16, 16, 16]")
    assert r.exit_code == 2 and "--force cannot change the data split" in one_line(r)  # the new pool is the split
    assert snapshot(out) == before
    # More rounds than the split has pools, where the settings would allow them (pools by ratio: any number).
    cfg = json.loads((out / "config.json").read_text())
    cfg["data"] |= {"pool_sizes": [], "pool_ratio": [1.0, 1.0, 1.0]}
    (out / "config.json").write_text(json.dumps(cfg))
    before = snapshot(out)
    r = invoke("run", "--resume", out, "--force", "--rounds", "3")
    assert r.exit_code == 2, r.output
    assert f"error: --rounds 3: {out} was split into 2 prompt pool(s)" in one_line(r)
    assert "at most 2 round(s)" in one_line(r) and snapshot(out) == before
    (out / "config.json").write_text((finished / "config.json").read_text())
    # What does not touch the split still goes through (nothing runs: every round has finished).
    r = invoke("run", "--resume", out, "--force", "--set", "train.learning_rate=1e-4")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["train"]["learning_rate"] == 1e-4
    assert (out / "config.0.json").is_file()


# -- writing: a full disk, permissions --------------------------------------------------------------------------


class _FullDisk:
    """open() for rundir: a file whose name contains `when` fails on write with ENOSPC, as a full disk does."""

    def __init__(self, when: str):
        self.when = when

    def __call__(self, path, *args, **kwargs):
        f = open(path, *args, **kwargs)  # noqa: SIM115
        if self.when in str(path):
            def write(_text):
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f


def test_a_full_disk_names_the_file_and_leaves_no_temp_file(finished, tmp_path, monkeypatch):
    from selfie_lite import rundir

    out = copy_run(finished, tmp_path / "run")
    shutil.rmtree(out / "round-2")
    (out / "summary.json").unlink()
    monkeypatch.setattr(rundir, "open", _FullDisk("chunk-00000"), raising=False)
    r = invoke("run", "--resume", out)
    assert r.exit_code == 1, r.output
    chunk = out / "round-2" / "samples" / "chunk-00000.jsonl"
    assert f"error: the disk is full (writing {chunk})" in one_line(r) and "Traceback" not in r.output
    assert not chunk.exists() and not list(out.rglob(".*.tmp-*"))
    monkeypatch.undo()
    monkeypatch.setattr(selfie_lite.backends, "get_backend", fake_backend)
    # What a writer killed mid-write (kill -9: no clean-up) leaves is removed by the next resume.
    stale = out / "round-1" / f".judged.jsonl.tmp-{dead_pid()}"
    stale.write_text("{")
    r = invoke("run", "--resume", out)  # space again: the resume samples the chunk and ends as the run did
    assert r.exit_code == 0, r.output
    assert not stale.exists() and not list(out.rglob(".*.tmp-*"))
    assert_same_weights(out, finished)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_file_to_be_replaced_is_writable_where_its_folder_is(tmp_path):
    """`report` writes report.png again, `judge --output` an existing file: not "is a file, not a folder"."""
    from selfie_lite.paths import writable_problem

    f = tmp_path / "report.png"
    f.write_bytes(b"old")
    assert writable_problem(f, "file") is None
    assert writable_problem(f, "folder") == "a file is in the way (need a folder)"
    assert writable_problem(f / "x.png", "file") == f"{f} is a file, not a folder"


def test_merged_weights_and_adapters_follow_the_umask(finished):
    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    for f in ("model/model.safetensors", "adapter/adapter_model.safetensors", "model/config.json", "pairs.jsonl"):
        assert (finished / "round-1" / f).stat().st_mode & 0o777 == want, f


# -- output: a log keeps every column; the guard's verdict once ---------------------------------------------------


@pytest.mark.cpu_agnostic
def test_a_log_keeps_every_column_of_the_tables(finished, tmp_path):
    """stdout to a pipe (a log, nohup, CI) with COLUMNS unset: Rich would cut the tables to 80 columns."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    out = copy_run(finished, tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "selfie_lite", "report", str(out)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    header = next(line for line in r.stdout.splitlines() if "round" in line and "pairs" in line)
    assert header.split() == ["round", "pairs", "gold", "anchor", "p(ch)", "distinct", "smooth", "loss", "margin",
                              "acc", "len"], header
    assert "…" not in r.stdout
    train = json.loads((finished / "round-2" / "done" / "train.json").read_text())
    loss = f"{train['loss_start']:.3f}→{train['loss_end']:.3f}"
    assert loss in r.stdout  # a whole figure, not "0.…"
    # The round tables a run prints (here a resume of the finished run, which reprints them).
    r = subprocess.run([sys.executable, "-m", "selfie_lite", "run", "--resume", str(out)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    assert any(line.split() == ["stage", "items", "seconds", "throughput", "details"]
               for line in r.stdout.replace("┃", " ").replace("│", " ").splitlines()), r.stdout
    judge = json.loads((out / "round-2" / "done" / "judge.json").read_text())
    assert f"dropped {judge['dropped_identical']} identical or tied, p(chosen) {judge['mean_p_chosen']:.2f}" in r.stdout


def test_the_guard_verdict_is_printed_once(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(selfie_lite.backends, "get_backend",
                        lambda cfg: (FakeBackend(cfg, logp=reversing_judge), "scripted (tests)"))
    r = invoke("run", "--model", toy[0], "--data", toy[1], *FLAGS, "--set", "guard.from_round=2",
               "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    text = one_line(r)
    assert text.count("round 2's self-labels agree with the seed-DPO judge on 0% of pairs") == 1, r.output
    assert "final model: round 1 (the round guard stopped the run)" in text


def test_output_checks_find_missing_shards_and_weights_cut_short(tmp_path):
    """What the resume check reads of weights: each safetensors header, its size, every shard its index names."""
    import torch
    from safetensors.torch import save_file

    from selfie_lite.loop import STAGE_OUTPUTS
    from selfie_lite.rundir import outputs_digest, outputs_problem

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        (model / name).write_text("{}")
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    for key, name in shards.items():
        save_file({key: torch.arange(4.0)}, str(model / name))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    merge = STAGE_OUTPUTS["merge"]
    assert outputs_problem(tmp_path, merge) is None
    digest = outputs_digest(tmp_path, merge)
    first = model / shards["a"]
    whole = first.read_bytes()
    first.write_bytes(whole[:-3])
    assert outputs_problem(tmp_path, merge) == (f"model/{shards['a']} is damaged ({len(whole) - 3} bytes where its "
                                                f"header says {len(whole)})")
    assert outputs_digest(tmp_path, merge) != digest
    first.write_bytes(whole[:6])
    assert outputs_problem(tmp_path, merge) == f"model/{shards['a']} is damaged (cut short)"
    first.write_bytes(whole)
    assert outputs_digest(tmp_path, merge) == digest
    (model / shards["b"]).unlink()
    assert outputs_problem(tmp_path, merge) == f"model/{shards['b']} is missing"
    assert outputs_problem(tmp_path, STAGE_OUTPUTS["train"]) == "adapter/ is missing"
