"""Bad input, faults and safety, each driven through the CLI as a user would."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ONE_ROUND, assert_one_line_error, invoke


@pytest.fixture
def prefs(tiny_preset, tmp_path):
    """A copy of the tiny gold set that a test may break."""
    rows = [json.loads(line) for line in tiny_preset.preferences.read_text().splitlines()]
    path = tmp_path / "prefs.jsonl"

    def write(rows_=None):
        path.write_text("".join(json.dumps(r) + "\n" for r in (rows if rows_ is None else rows_)))
        return path

    write.rows = rows
    return write


# -- bad input ------------------------------------------------------------------------------------


def test_malformed_rows_refuse_with_their_index(prefs, tmp_path):
    rows = [dict(r) for r in prefs.rows]
    for i in range(0, 1200, 10):  # 120 of 6000 rows: 2%, over the 1% limit
        rows[i]["chosen"] = 42 if i % 20 else ""
    r = invoke("run", "--data", prefs(rows), *ONE_ROUND)
    assert_one_line_error(r, 2, "rows in", "are invalid", "row 0: empty text", "data.max_bad_rows")
    assert not (tmp_path / "runs").exists()


def test_mixed_shapes_are_fine_when_each_row_is_valid(prefs):
    rows = [dict(r) for r in prefs.rows]
    for r in rows[::2]:  # every other row as message lists, UltraFeedback style
        r["chosen"] = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]
        r["rejected"] = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]
    from selfie_lite.config import DataConfig
    from selfie_lite.data import load_split

    s = load_split(DataConfig(source=str(prefs(rows)), labelled_share="24", test_size=50, pool_sizes=[24]), 1, 0)
    assert s.n_bad == 0 and len(s.seed_pairs) == 24


def test_wrong_column_name_suggests_the_close_one(prefs):
    rows = [{"prompt": r["prompt"], "chosen_response": r["chosen"], "rejected": r["rejected"]} for r in prefs.rows[:300]]
    r = invoke("run", "--data", prefs(rows), *ONE_ROUND)
    assert_one_line_error(r, 2, "has no column 'chosen'", "did you mean 'chosen_response'")


def test_empty_file(tmp_path, tiny_preset):
    (tmp_path / "empty.jsonl").write_text("")
    r = invoke("run", "--data", tmp_path / "empty.jsonl", *ONE_ROUND)
    assert_one_line_error(r, 2, "is empty")


def test_more_seed_pairs_than_the_data_holds(prefs):
    r = invoke("run", "--data", prefs(prefs.rows[:100]), "--seed", "500", "--rounds", "1",
               "--set", "data.pool_sizes=[10]", "--set", "data.test_size=10")
    assert_one_line_error(r, 2, "asks for 500 labelled pairs but the data has 100 valid rows")


def test_pools_too_small_for_the_rounds(prefs):
    r = invoke("run", "--data", prefs(prefs.rows[:200]), "--seed", "20", "--set", "data.test_size=50",
               "--set", "data.pool_sizes=[100, 100, 100]")
    assert_one_line_error(r, 2, "do not fit", "only 130 rows remain")


def test_model_without_chat_template_offers_the_flag(tiny_preset, tmp_path):
    model = tmp_path / "no-template"
    shutil.copytree(tiny_preset.model_dir, model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    for f in model.glob("chat_template.*"):
        f.unlink()
    r = invoke("run", "--model", model, *ONE_ROUND)
    assert_one_line_error(r, 2, "has no chat template", "--chat-template FILE")
    # ... and the flag fixes it.
    from selfie_lite.tiny.build import CHAT_TEMPLATE

    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.config import RunConfig

    tok = HFBackend(RunConfig(chat_template=str(tmp_path / "t.jinja"))).load_tokenizer(model)
    assert tok.chat_template == CHAT_TEMPLATE


def test_pickled_weights_are_refused(tiny_preset, tmp_path):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_preset.model_dir, model)
    for f in model.glob("*.safetensors"):
        f.unlink()
    (model / "pytorch_model.bin").write_bytes(b"not even a pickle")
    r = invoke("run", "--model", model, *ONE_ROUND)
    assert_one_line_error(r, 2, "only pickled weights", "safetensors only")


def test_trust_remote_code_is_off_unless_asked(monkeypatch, tiny_preset):
    from transformers import AutoModelForCausalLM

    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.config import RunConfig

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    HFBackend(RunConfig()).load(tiny_preset.model_dir)
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
    HFBackend(RunConfig(trust_remote_code=True)).load(tiny_preset.model_dir)
    assert seen["trust_remote_code"] is True


# -- faults ---------------------------------------------------------------------------------------


def test_disk_full_before_a_merge_names_the_space_and_resumes(tiny_preset, tmp_path, monkeypatch):
    """The disk fills up while round 0 trains (the check before training passed): the merge refuses with the
    merged model's estimated size, the adapter is already saved, and --resume merges it without training again."""
    import shutil

    from selfie_lite import disk

    real = shutil.disk_usage
    calls = []

    def filling_up(p):
        calls.append(p)
        return real(p)._replace(free=500) if len(calls) > 1 else real(p)

    monkeypatch.setattr(disk.shutil, "disk_usage", filling_up)
    out = tmp_path / "run"
    r = invoke("run", *ONE_ROUND, "--out", out)
    assert_one_line_error(r, 1, "not enough disk space to merge the adapter", "MB (the merged model)", "500 B free",
                          f"--resume {out}")
    assert (out / "round-0" / "done" / "train.json").exists() and not (out / "round-0" / "model").exists()
    assert (out / "round-0" / "adapter" / "adapter_model.safetensors").exists()
    trained = (out / "round-0" / "done" / "train.json").stat().st_mtime_ns
    monkeypatch.setattr(disk.shutil, "disk_usage", real)
    r = invoke("run", "--resume", out)
    assert r.exit_code == 0, r.output
    assert (out / "round-1" / "model" / "model.safetensors").exists()
    assert (out / "round-0" / "done" / "train.json").stat().st_mtime_ns == trained  # not trained again


def test_nan_loss_stops_the_round_and_keeps_the_last_good_model(tiny_preset, tmp_path, monkeypatch):
    import torch

    from selfie_lite import trainer as train

    out = tmp_path / "run"
    real = train.dpo_losses
    calls = {"n": 0}

    def nan_in_round_1(*a, **k):  # round 0 trains normally; round 1's third step produces NaN
        losses, *rest = real(*a, **k)
        calls["n"] += 1
        if calls["n"] > 6 + 2:
            losses = losses * torch.tensor(float("nan"))
        return (losses, *rest)

    monkeypatch.setattr(train, "dpo_losses", nan_in_round_1)
    r = invoke("run", *ONE_ROUND, "--out", out)
    assert_one_line_error(r, 1, "the DPO loss became nan", "lower train.learning_rate", f"--resume {out}")
    assert (out / "round-0" / "model" / "model.safetensors").exists()  # the last good model is kept
    assert not (out / "round-1" / "model").exists() and not (out / "round-1" / "done" / "train.json").exists()
    monkeypatch.setattr(train, "dpo_losses", real)
    r = invoke("run", "--resume", out)  # once the cause is gone, the run finishes from where it stopped
    assert r.exit_code == 0, r.output
    assert (out / "round-1" / "model" / "model.safetensors").exists()


def test_out_of_memory_names_the_flags(monkeypatch, tiny_preset, tmp_path):
    import torch

    from selfie_lite.backends.hf import HFBackend

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(HFBackend, "generate", oom)
    out = tmp_path / "run"
    r = invoke("run", *ONE_ROUND, "--out", out)
    assert_one_line_error(r, 1, "out of GPU memory", "sample.batch_size", "--load-in-4bit", "gradient_checkpointing")


@pytest.mark.cpu_agnostic
def test_ctrl_c_stops_cleanly_and_prints_the_resume_command(tiny_preset, tmp_path):
    out = tmp_path / "run"
    # A shell's background jobs (CI) start with SIGINT ignored; a user's terminal does not: restore the default.
    p = subprocess.Popen([sys.executable, "-m", "selfie_lite", "run", *ONE_ROUND, "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "data" / "split.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    # 130, or killed by SIGINT: CPython re-raises SIGINT at exit when a KeyboardInterrupt crossed some C code
    # paths during the run; a shell reports both as $? = 130.
    assert p.returncode in (130, -signal.SIGINT), stderr[-2000:]
    assert f"selfie-lite run --resume {out}" in stderr
    assert "Traceback" not in stderr
    assert not (out / ".lock").exists()  # the lock is released


def test_a_swallowed_ctrl_c_still_stops_the_run_at_the_next_item():
    from selfie_lite.interrupt import ctrl_c_noted, safe_point

    # A terminal's Ctrl-C: SIGINT at its default disposition, whatever this test process inherited (a CI shell's
    # background job starts with SIGINT ignored, which ctrl_c_noted respects: see the next test).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ctrl_c_noted():
            safe_point("sample", 1)  # nothing pressed yet: carries on
            try:  # Python drops a KeyboardInterrupt raised inside a weakref callback or __del__; this stands for that
                signal.raise_signal(signal.SIGINT)  # delivered synchronously to this thread: no timing involved
            except KeyboardInterrupt:
                pass
            with pytest.raises(KeyboardInterrupt):
                safe_point("sample", 2)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handler was taken out again
        safe_point("sample", 3)  # the note ends with the run
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_ctrl_c_inside_a_destructor_prints_no_traceback_and_still_stops(capsys):
    import gc

    from selfie_lite.interrupt import ctrl_c_noted, safe_point

    class Interrupted:
        def __del__(self):
            raise KeyboardInterrupt  # what Python does when Ctrl-C lands while a __del__ runs

    hook = sys.unraisablehook
    with ctrl_c_noted():
        Interrupted()  # collected at once: Python can only report the exception through sys.unraisablehook
        gc.collect()
        with pytest.raises(KeyboardInterrupt):
            safe_point("sample", 1)
    assert "Traceback" not in capsys.readouterr().err
    assert sys.unraisablehook is hook  # the caller's hook is back


def test_ctrl_c_noted_keeps_an_ignored_sigint_ignored():
    from selfie_lite.interrupt import ctrl_c_noted, safe_point

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in `nohup selfie-lite run &`
    try:
        with ctrl_c_noted():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)  # ignored: no exception, nothing noted
            safe_point("sample", 1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_lock_left_by_a_dead_process_is_taken_over(tiny_preset, tmp_path):
    from selfie_lite.lock import RunLock

    (tmp_path / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()
