"""What the user sees: the screen in a terminal and in a log, brackets in paths and values,
--json, --report-to, --debug anywhere, unwritable outputs, disk estimates, locks, the labelled-seed line, resume and
final lines. Driven through the CLI; the end-to-end runs use the tiny preset at its smallest (conftest.ONE_ROUND).
"""

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ONE_ROUND, assert_one_line_error, invoke, make_run, write_prefs

REPO = Path(__file__).resolve().parents[1]


# -- a terminal, emulated: enough of VT100 for Rich's live display ------------------------------------------------


def screen(raw: str) -> list[str]:
    """The lines a terminal shows after `raw`: handles \\r, \\n, cursor up (ESC[nA), erase line (ESC[2K); colours and
    cursor show/hide are dropped."""
    lines, row, col = [""], 0, 0
    for token in re.split(r"(\x1b\[[0-9;?]*[A-Za-z]|\r|\n)", raw):
        if not token:
            continue
        if token == "\n":
            row += 1
            col = 0
            if row == len(lines):
                lines.append("")
        elif token == "\r":
            col = 0
        elif token.startswith("\x1b["):
            if token.endswith("A"):
                row = max(0, row - int(token[2:-1] or 1))
            elif token == "\x1b[2K":
                lines[row] = ""
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return lines


def test_round_tables_survive_the_live_display():
    """Item 6: results printed while the bars are live stay on screen, above the bars (they used to be erased)."""
    from rich.console import Console
    from rich.table import Table

    from selfie_lite.progress import Reporter

    tty = io.StringIO()  # stdout and stderr on one terminal
    err = Console(file=tty, force_terminal=True, width=100)
    out = Console(file=tty, force_terminal=True, width=100)
    with Reporter(err, out=out, log_every_s=0) as progress:
        for i in range(3):
            task = progress.start(f"stage {i}", total=3)
            for _ in range(3):
                progress.advance(task)
                progress.progress.refresh()
            progress.finish(task)
            t = Table(title=f"round-{i}", title_justify="left")
            t.add_column("stage")
            t.add_row(f"result-{i}")
            progress.print(t)
            progress.progress.refresh()
    shown = "\n".join(screen(tty.getvalue()))
    for i in range(3):
        assert f"round-{i}" in shown and f"result-{i}" in shown, shown
        assert re.search(rf"^stage {i} +━", shown, re.M), shown  # no title glued onto a bar line
    assert shown.index("round-2") < shown.rindex("stage 2")  # tables above the bars


def test_without_a_terminal_each_stage_logs_lines_with_counts_and_eta():
    """Item 8: with stderr redirected, a line at start, every log_every_s seconds and at the end."""
    from rich.console import Console

    from selfie_lite.progress import Reporter

    log = io.StringIO()
    with Reporter(Console(file=log, width=200), log_every_s=0) as progress:
        task = progress.start("sample", total=4, unit="prompts")
        for _ in range(4):
            progress.advance(task, tokens=10)
            time.sleep(0.01)
        progress.finish(task)
    lines = log.getvalue().splitlines()
    assert "sample: start, 0/4 prompts" in lines[0]
    assert re.search(r"sample: 2/4 prompts \(50%\), [\d,]+ tok/s, elapsed 0:00:00, eta 0:00:0\d", lines[2]), lines
    assert "sample: done, 4/4 prompts (100%) in 0:00:00" in lines[-1] and len(lines) == 6
    quiet = io.StringIO()
    with Reporter(Console(file=quiet, width=200), log_every_s=3600) as progress:
        task = progress.start("judge", total=100)
        for _ in range(100):
            progress.advance(task)
        progress.finish(task)
    assert len(quiet.getvalue().splitlines()) == 2  # start and done only: no line per item


def test_a_stage_whose_items_take_minutes_logs_a_pace_and_an_eta():
    """A real model's training step on a CPU takes a minute: the log said "0.0/s, eta ?" (Rich averages speed over
    the last 30 s only). Now: seconds per item, and the ETA at the mean pace so far."""
    from rich.console import Console

    from selfie_lite.progress import Reporter

    log = io.StringIO()
    now = [1000.0]
    with Reporter(Console(file=log, width=200), log_every_s=0) as progress:
        progress.progress.get_time = lambda: now[0]  # the stage's clock; each step below takes 60 s on it
        task = progress.start("train", total=10, unit="steps")
        for _ in range(2):
            now[0] += 60.0
            progress.advance(task)
    lines = log.getvalue().splitlines()
    # after step 2 at t=120 s: 60 s each, 8 steps left -> 8 minutes
    assert re.search(r"train: 2/10 steps \(20%\), 60 s each, elapsed 0:02:00, eta 0:08:00", lines[2]), lines


# -- one real run, in a pseudo-terminal ----------------------------------------------------------------------------


@pytest.mark.cpu_agnostic
def test_a_run_in_a_terminal(tiny_preset, tmp_path):
    """Items 6, 9, 15, 16 end to end: every round's table stays on the screen, the labelled-seed line, only the
    non-default settings, no FutureWarning, a last line with the time and the next command, tensorboard logs."""
    import pty

    pytest.importorskip("tensorboard")

    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm", COLUMNS="120", PYTHONPATH=str(REPO), PYTHONWARNINGS="default")
    p = subprocess.Popen([sys.executable, "-m", "selfie_lite", "run", *ONE_ROUND, "--out", "out", "--report-to", "tensorboard"],
                         cwd=tmp_path,
                         stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert p.wait(timeout=300) == 0
    os.close(master)
    raw = b"".join(chunks).decode()
    shown = "\n".join(screen(raw))
    assert "round 0 (seed DPO)" in shown and "round 1" in shown
    assert re.search(r"│ merge +│ 1 model", shown) and shown.count("│ merge ") == 2, shown  # both tables whole
    assert "labelled seed: 24 pairs (0.4% of 6,000); the random seed is --random-seed 42" in shown
    assert "settings other than the defaults:" in shown and "data.labelled_share = \"24\"" in shown
    assert "lora.target_modules" not in shown and "refine.lambdas" not in shown  # defaults: in config.json only
    assert "FutureWarning" not in raw
    assert re.search(r"done in [\d a-z]+\. Final model \(round 1\): " + re.escape(str(tmp_path / "out")), shown)
    assert "next: selfie-lite eval out" in shown
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["final_model"] == str(tmp_path / "out" / "round-1" / "model")  # absolute though --out was not

    # Item 9, --report-to tensorboard: each round's metrics, and TRL's own step logs.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rounds = EventAccumulator(str(tmp_path / "out" / "tensorboard" / "rounds")).Reload()
    assert [e.step for e in rounds.Scalars("round/train/loss_end")] == [0, 1]
    assert [e.step for e in rounds.Scalars("round/judge/pairs")] == [1]
    train_logs = list((tmp_path / "out" / "round-0" / "trainer" / "runs").glob("*"))
    assert len(train_logs) == 1 and "train/loss" in EventAccumulator(str(train_logs[0])).Reload().Tags()["scalars"]


# -- item 7: what users type is shown as typed ------------------------------------------------------------------


def test_brackets_in_paths_and_values_are_shown_as_typed(tiny_preset, tmp_path, stub_rounds):
    r = invoke("run", "--data", "prefs[old].jsonl", *ONE_ROUND)
    assert_one_line_error(r, 2, "prefs[old].jsonl")
    r = invoke("run", "--set", "guard.select=[/bold]x")  # was a MarkupError traceback
    assert_one_line_error(r, 2, "got '[/bold]x'")
    r = invoke("run", "--backend", "unsloth")
    assert_one_line_error(r, 2, "pip install 'selfie-lite[gpu]'")
    out = tmp_path / "out" / "[exp1]"
    r = invoke("run", *ONE_ROUND, "--out", out)
    assert r.exit_code == 0, r.output
    assert f"run {out}" in r.output and f"selfie-lite eval {out}" in r.output
    r = invoke("run", *ONE_ROUND, "--out", out)
    assert_one_line_error(r, 2, f"{out} already holds a run", f"--resume {out}")


def test_report_shows_a_bracketed_run_folder_and_model_names(tmp_path):

    run = make_run(tmp_path / "[exp1]")
    ev = json.loads((run / "eval.json").read_text())
    ev["models"]["my[best]"] = ev["models"].pop("round-3")
    (run / "eval.json").write_text(json.dumps(ev))
    r = invoke("report", run, "--no-plot")
    assert r.exit_code == 0, r.output
    assert f"run {run}:" in r.output and "my[best]" in r.output


# -- item 9: --json and --report-to ---------------------------------------------------------------------------


def test_json_output_is_the_only_thing_on_stdout(tmp_path):

    run = make_run(tmp_path / "run")
    r = invoke("report", run, "--no-plot", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [x["round"] for x in data["rounds"]] == [0, 1, 2, 3] and data["png"] is None
    assert data["rounds"][3]["metrics"]["train"]["loss_end"] == pytest.approx(0.35)
    assert f"run {run}:" in r.stderr and "0.693→0.350" in r.stderr  # the table still shows, on stderr

    r = invoke("doctor", "--out", tmp_path, "--json")
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["write: runs"]["status"] == "OK" and "python" in checks


def test_run_json_is_the_summary_on_stdout(tiny_preset, tmp_path, stub_rounds):
    out = tmp_path / "run"
    r = invoke("run", *ONE_ROUND, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # summary.json as run_rounds returned it, plus the run folder and the time
    assert summary["final_model"] == str(out / "round-0" / "model")
    assert summary["run_dir"] == str(out.resolve())
    assert isinstance(summary["seconds"], float) and summary["seconds"] >= 0  # a stubbed run can take < 0.05 s
    assert "labelled seed: 24 pairs" in r.stderr and "done in" in r.stderr


def test_report_to_wandb_without_the_package_is_exit_2(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    r = invoke("run", "--report-to", "wandb", "--out", tmp_path / "x")
    assert_one_line_error(r, 2, "--report-to wandb needs the wandb package", "pip install wandb")
    assert not (tmp_path / "x").exists()
    r = invoke("run", "--report-to", "mlflow")
    assert r.exit_code == 2 and "mlflow" in r.output


# -- item 11 ----------------------------------------------------------------------------------------------------


def test_debug_works_after_the_command_too():
    from selfie_lite.errors import UserError

    r = invoke("run", "--seed", "0", "--debug")
    assert isinstance(r.exception, UserError)  # the traceback is not swallowed
    r = invoke("run", "--seed", "0")
    assert r.exit_code == 2 and not isinstance(r.exception, UserError) and "Traceback" not in r.output


# -- item 12: outputs that cannot be written -------------------------------------------------------------------


def test_unwritable_outputs_are_exit_2_naming_the_path(tmp_path, tiny_preset):

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = invoke("run", *ONE_ROUND, "--out", blocker / "run")
    assert_one_line_error(r, 2, f"--out {blocker / 'run'}", "is a file, not a folder")
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n")
    r = invoke("judge", tmp_path / "in.jsonl", "--policy", "a", "--reference", "b", "-o", tmp_path)
    assert_one_line_error(r, 2, f"--output {tmp_path}", "is a folder")
    run = make_run(tmp_path / "run")
    r = invoke("report", run, "--png", blocker / "r.png")
    assert_one_line_error(r, 2, f"--png {blocker / 'r.png'}")
    r = invoke("eval", run, "--out", blocker)
    assert_one_line_error(r, 2, f"--out {blocker}: a file is in the way")
    assert not any(p.name == "runs" for p in tmp_path.iterdir())


def test_a_read_only_folder_is_named(tmp_path, monkeypatch):
    """Root writes anywhere, so the permission answer is faked; the message and exit code are what is tested."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real(p, mode, **k))
    r = invoke("run", "--out", ro / "run")
    assert_one_line_error(r, 2, f"--out {ro / 'run'}: cannot write to {ro}")
    r = invoke("doctor", "--out", ro / "run", "--json")
    assert r.exit_code == 1 and "1 check failed: write: runs" in r.stderr
    check = next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "write: runs")
    assert check["status"] == "FAIL" and check["detail"] == f"{ro / 'run'}: cannot write to {ro} (permission denied or a read-only disk)"


# -- item 13: disk estimates from the model ----------------------------------------------------------------------


def test_disk_need_is_estimated_from_the_model(tiny_preset):
    from selfie_lite.disk import format_bytes, merged_model_bytes, model_params

    params = tiny_preset.manifest["model"]["params"]
    assert model_params(tiny_preset.model_dir) == params  # from the safetensors headers
    assert merged_model_bytes(tiny_preset.model_dir) == int(params * 4 * 1.1)  # fp32 on a CPU
    assert merged_model_bytes(tiny_preset.model_dir, "cuda") == int(params * 2 * 1.1)
    assert merged_model_bytes("no-org/no-such-model") is None  # unknown: not checked, not "0.00 GB"
    assert format_bytes(2.2e6) == "2.2 MB" and format_bytes(15.3e9) == "15.3 GB"


def test_a_full_disk_stops_before_training_with_real_numbers(tiny_preset, tmp_path, monkeypatch):
    import shutil

    from selfie_lite import disk

    real = shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: real(p)._replace(free=500))
    out = tmp_path / "run"
    r = invoke("run", *ONE_ROUND, "--out", out)
    assert_one_line_error(r, 1, "not enough disk space to train round 0 and merge it", "MB (adapter", "500 B free",
                          f"--resume {out}")
    assert "0.00 GB" not in r.output
    assert not (out / "round-0" / "done" / "train.json").exists()  # no training spent on a round that cannot be kept


# -- item 14: locks and default run folders ------------------------------------------------------------------------


def _lock(run_dir, **info):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".lock").write_text(json.dumps(info) if info else "")
    return run_dir / ".lock"


def test_lock_takeover_as_documented(tmp_path):
    from selfie_lite.errors import UserError
    from selfie_lite.lock import RunLock

    said = []
    host = socket.gethostname()
    cases = {
        "lost-vm": ({"pid": 4321, "host": "colab-vm-1", "beat": time.time() - 3600}, "no sign of life from colab-vm-1 for 60 min"),
        "rebooted": ({"pid": os.getpid(), "host": host, "boot_id": "another-boot"}, "this machine has restarted since"),
        "reused-pid": ({"pid": os.getpid(), "host": host, "pid_start": "1"}, f"pid {os.getpid()} now belongs to another process"),
        "dead": ({"pid": 2**22 + 12345, "host": host}, "its process 4206649 is gone"),
    }
    for name, (info, why) in cases.items():
        _lock(tmp_path / name, **info)
        with RunLock(tmp_path / name, on_takeover=said.append):
            assert json.loads((tmp_path / name / ".lock").read_text())["pid"] == os.getpid()
        assert said[-1].endswith(why), (name, said)
    old_empty = _lock(tmp_path / "empty")
    os.utime(old_empty, (time.time() - 60, time.time() - 60))
    with RunLock(tmp_path / "empty", on_takeover=said.append):
        pass
    assert said[-1] == "taking over the lock of an unknown run: the lock file is empty or unreadable"

    _lock(tmp_path / "alive-elsewhere", pid=4321, host="other-node", beat=time.time() - 20)
    with pytest.raises(UserError, match=r"in use by another run \(pid 4321 on other-node, last sign of life 20 s ago\)"):
        RunLock(tmp_path / "alive-elsewhere").__enter__()
    _lock(tmp_path / "alive-here", pid=os.getpid(), host=host)  # this very process: alive, same start
    with pytest.raises(UserError, match="in use by another run"):
        RunLock(tmp_path / "alive-here").__enter__()
    _lock(tmp_path / "being-written")  # empty and fresh: another run may be writing it right now
    with pytest.raises(UserError):
        RunLock(tmp_path / "being-written").__enter__()


def test_the_lock_heartbeat_keeps_a_live_run_from_being_taken_over(tmp_path, monkeypatch):
    from selfie_lite import lock as run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    with run_lock.RunLock(tmp_path) as lock:
        first = lock.info["beat"]
        time.sleep(0.3)
        beat = json.loads((tmp_path / ".lock").read_text())["beat"]
        assert beat > first
    assert not (tmp_path / ".lock").exists()


def test_resume_takes_over_a_lost_vms_lock_with_one_line(tiny_preset, tmp_path, stub_rounds):
    out = tmp_path / "run"
    assert invoke("run", *ONE_ROUND, "--out", out).exit_code == 0
    _lock(out, pid=777, host="lost-colab-vm", beat=time.time() - 600)
    r = invoke("run", "--resume", out)
    assert r.exit_code == 0, r.output
    assert "lock: taking over the lock of pid 777 on lost-colab-vm: no sign of life from lost-colab-vm for 10 min" in r.output


def test_default_run_folders_are_unique_within_a_second(tiny_preset, tmp_path, stub_rounds, monkeypatch):
    from selfie_lite.paths import claim_run_dir

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261202-120000" if fmt == "%Y%m%d-%H%M%S" else "t")
    for _ in range(2):
        r = invoke("run", *ONE_ROUND)
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["20261202-120000", "20261202-120000-2"]
    assert (tmp_path / "runs" / "20261202-120000-2" / "config.json").is_file()
    assert claim_run_dir(tmp_path / "runs" / "20261202-120000") == tmp_path / "runs" / "20261202-120000-3"


# -- items 15 and 16 ------------------------------------------------------------------------------------------


def test_seed_spellings_are_one_share_and_the_seed_line_says_what_it_is(tiny_preset, tmp_path, stub_rounds):
    out = tmp_path / "run"
    small = [a for a in ONE_ROUND if a not in ("--seed", "24")]
    r = invoke("run", *small, "--seed", "3.3%", "--out", out)
    assert r.exit_code == 0, r.output
    assert "labelled seed: 198 pairs (3.3% of 6,000, --seed 3.3pct); the random seed is --random-seed 42" in r.output
    assert json.loads((out / "config.json").read_text())["data"]["labelled_share"] == "3.3pct"
    for spelling in ("3.3pct", "3.3 %", "3.30%"):
        r = invoke("run", "--resume", out, "--seed", spelling)
        assert r.exit_code == 0, (spelling, r.output)
    r = invoke("run", "--resume", out, "--seed", "198")  # the same count, but another setting
    assert_one_line_error(r, 2, 'data.labelled_share: "3.3pct" -> "198"')


def test_resume_says_what_it_reuses(tiny_preset, tmp_path, stub_rounds):
    out = tmp_path / "run"
    stub_rounds.stages = ["train"]
    assert invoke("run", *ONE_ROUND, "--out", out).exit_code == 0
    (out / "round-1" / "samples").mkdir(parents=True)
    for c in range(2):
        (out / "round-1" / "samples" / f"chunk-{c:05d}.jsonl").write_text("")
    r = invoke("run", "--resume", out)
    assert r.exit_code == 0, r.output
    assert "resuming " + str(out) in r.output
    assert "reusing the data split; round-0 (train); round-1 (2 sample chunks); the rest runs now" in r.output
    assert "labelled seed: 24 pairs (0.4% of 6,000)" in r.output  # from data/split.json on a resume


def test_skipped_bad_rows_are_said_on_screen(tiny_preset, gold_rows, tmp_path, stub_rounds):
    rows = [dict(r) for r in gold_rows]
    for i in range(0, 30, 3):
        rows[i]["chosen"] = ""
    r = invoke("run", "--data", write_prefs(tmp_path / "p[1].jsonl", rows), *ONE_ROUND, "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert f"warning: skipped 10 invalid row(s) of 6,000 in {tmp_path / 'p[1].jsonl'}" in r.output


# -- item 10: the figure -----------------------------------------------------------------------------------------


def test_report_figure_has_a_loss_panel_and_a_length_axis_not_from_zero(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    run = make_run(tmp_path / "run", rounds=2)
    curves = {0: [0.693, 0.68, 0.66], 1: [0.65, 0.6], 2: [0.64, 0.61, 0.58, 0.55]}
    for i, curve in curves.items():
        p = run / f"round-{i}" / "done" / "train.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), "loss_curve": curve}))
    saved = {}
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.setdefault("fig", self), real(self, *a, **k))[1])
    r = invoke("report", run)
    assert r.exit_code == 0, r.output
    axes = {ax.get_title(): ax for ax in saved["fig"].axes}
    loss = axes["DPO loss per optimizer step"]
    lines = [ln for ln in loss.get_lines() if ln.get_label().startswith(("seed", "round"))]
    assert [ln.get_label() for ln in lines] == ["seed DPO", "round 1", "round 2"]
    assert list(lines[2].get_xdata()) == [6, 7, 8, 9] and list(lines[2].get_ydata()) == curves[2]
    low, high = axes["Mean response length"].get_ylim()
    assert 8 < low < 9 and high < 13  # eval lengths 9..11 tokens, samples 11..12: the axis does not start at 0


def test_matplotlib_is_in_the_default_install():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("matplotlib") for d in deps)


def test_wandb_tracker_logs_each_round_into_one_run_per_folder(tmp_path, monkeypatch):
    """wandb is not installed here: a stand-in module records what the tracker asks of it."""
    import importlib.machinery
    import types

    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def define_metric(self, *a, **k):
            calls.append(("define_metric", a, k))

        def log(self, values):
            calls.append(("log", values))

        def finish(self):
            calls.append(("finish",))

    fake.init = lambda **k: (calls.append(("init", k)), Run())[1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from selfie_lite.tracking import Tracker

    ids = []
    for _ in range(2):  # a run, then its --resume: the same W&B run
        t = Tracker("wandb", tmp_path / "run", {"beta": 0.1})
        ids.append(calls[-3][1]["id"] if calls[-3][0] == "init" else None)
        t.log_round(1, {"judge": {"pairs": 18, "gold_agreement": 0.83, "config_rev": 0},
                        "train": {"loss_end": 0.61, "loss_curve": [0.7, 0.6], "train_reference": "given"}})
        t.close()
    assert ids[0] == ids[1] and ids[0].startswith("selfie-")
    init = next(c[1] for c in calls if c[0] == "init")
    assert init["resume"] == "allow" and init["name"] == "run" and init["config"] == {"beta": 0.1}
    logged = next(c[1] for c in calls if c[0] == "log")
    assert logged == {"round/index": 1, "round/judge/pairs": 18.0, "round/judge/gold_agreement": 0.83,
                      "round/train/loss_end": 0.61}  # numbers only: no lists, text or config_rev
    assert t.report_to == "wandb"  # what train.py hands to TRL
