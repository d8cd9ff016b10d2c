"""vLLM in a child process (selfie_lite/vllm_process.py, sampler_vllm.py): the engine lives in a process of its own
for the sample stage and is gone, with all the memory it held, before the judge loads; its failures are one line;
it does not outlive a killed run; under `accelerate launch` each process (or each group of tensor_parallel_size
processes) runs its own engine on its own GPUs, and the samples are byte for byte the same whatever the layout.

vLLM needs a GPU, so these tests drive the real code path against tests/fake_vllm (a stand-in with vLLM's LLM /
SamplingParams surface and a CPU platform) on the toy model.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, launch, round_0_of, toy_run_once

FAKE = REPO / "tests" / "fake_vllm"
SAMPLES = ["samples/chunk-00000.jsonl", "samples/chunk-00001.jsonl", "samples/chunk-00002.jsonl",
           "samples/chunk-00003.jsonl"]

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _log(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    """tests/fake_vllm importable here and in every child this process starts; its log under tmp_path."""
    monkeypatch.syspath_prepend(str(FAKE))
    log = tmp_path / "vllm.log"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.delenv("FAKE_VLLM_FAIL", raising=False)
    yield log
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]  # the next test's find_spec("vllm") must not see the fake


@pytest.fixture(scope="module")
def run_one(tmp_path_factory):
    """A one-process, 1-round run with --sampler vllm on the toy model (the reference the launcher tests compare
    with; conftest.toy_run_once), linked into a folder of this worker's own."""
    root, args = toy_run_once(tmp_path_factory, "vllm", "vllm", env=lambda root: _env(root / "one.log"))
    work = tmp_path_factory.mktemp("vllm")
    for name in ("one", "sft", "one.log", "one.stderr"):
        (work / name).symlink_to(root / name)
    return work, args


def _env(log: Path, **extra) -> dict:
    return {"PYTHONPATH": f"{REPO}{os.pathsep}{FAKE}", "FAKE_VLLM_LOG": str(log), **extra}


@pytest.mark.cpu_agnostic  # the samples come from the fake engine's seeded draws: no float decides
def test_a_run_samples_with_vllm_in_a_child_process(run_one):
    root, _ = run_one
    loads = [e for e in _log(root / "one.log") if e["event"] == "load"]
    gens = [e for e in _log(root / "one.log") if e["event"] == "generate"]
    # One engine, in a child of the run, one request per chunk of 4 prompts, and gone at the end with its own process.
    assert len(loads) == 1 and " -m selfie_lite run --model " in loads[0]["parent_cmdline"]
    assert [g["prompts"] for g in gens] == [4, 4, 4, 4] and {g["pid"] for g in gens} == {loads[0]["pid"]}
    assert loads[0]["tensor_parallel_size"] == 1 and loads[0]["cuda_visible_devices"] is None  # one process: vLLM picks
    assert loads[0]["max_model_len"] == 32 + 8
    assert not _alive(loads[0]["pid"]) and not _alive(loads[0]["core_pid"])
    assert "sampler: vllm (asked for, on cpu)" in (root / "one.stderr").read_text()
    rows = [json.loads(x) for x in (root / "one" / "round-1" / "samples" / "chunk-00000.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(row["response_ids"]) == 2 for row in rows)
    assert (root / "one" / "round-1" / "done" / "judge.json").exists()  # the rest of the round ran on the backend


def test_the_engine_is_gone_before_the_stage_returns_and_redraws_the_same(tmp_path, fake_vllm, toy):

    from selfie_lite.config import load_config
    from selfie_lite.sample import sample_round
    from selfie_lite.testing import FakeBackend

    cfg = load_config(None, None, [{"model": str(toy[0]), "sample": {"sampler": "vllm", "max_new_tokens": 8,
                                                                      "chunk_size": 3}}])
    prompts = [f"why is the sun {w}" for w in ("red", "big", "good", "bad", "fine")]
    first = sample_round(cfg, tmp_path / "a", FakeBackend(cfg), toy[0], prompts, 1)
    pids = {e["pid"] for e in _log(fake_vllm)}
    assert len(pids) == 1 and os.getpid() not in pids
    assert not _alive(pids.pop())  # the child exited (and was reaped) before sample_round returned
    assert first["prompts"] == 5 and first["samples"] == 10
    # The chunk's seed, not the engine, decides the samples: a second engine (a resumed stage) draws the same bytes.
    (tmp_path / "b" / "samples").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "samples" / "chunk-00000.jsonl", tmp_path / "b" / "samples")
    sample_round(cfg, tmp_path / "b", FakeBackend(cfg), toy[0], prompts, 1)
    for f in ("chunk-00000.jsonl", "chunk-00001.jsonl"):
        assert (tmp_path / "a" / "samples" / f).read_bytes() == (tmp_path / "b" / "samples" / f).read_bytes()
    assert len([e for e in _log(fake_vllm) if e["event"] == "generate"]) == 3  # 2 chunks, then the missing one


@pytest.mark.cpu_agnostic  # the samples come from the fake engine's seeded draws: no float decides
def test_an_engine_that_cannot_start_stops_the_run_with_one_line(run_one):
    root, _ = run_one
    run = round_0_of(root / "one", root / "fail")
    r = launch(1, ["--resume", str(run)], _env(root / "fail.log", FAKE_VLLM_FAIL="load"))
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: vLLM could not start in its sampling process: RuntimeError: CUDA out of memory. Tried "
                      "to allocate 2.00 GiB"], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "hint: out of GPU memory" in r.stderr
    assert not (run / "round-1" / "done" / "sample.json").exists() and not (run / ".lock").exists()


def test_an_engine_killed_mid_request_is_one_error(fake_vllm, toy, monkeypatch):
    from selfie_lite.errors import RunError
    from selfie_lite.vllm_process import EngineProcess

    monkeypatch.setenv("FAKE_VLLM_FAIL", "die")  # the engine starts, then the kernel kills it at the first request
    engine = EngineProcess({"model": str(toy[0])})
    with pytest.raises(RunError, match=r"^the vLLM sampling process died \(killed by signal 9\) before it answered$"):
        engine.generate([[1, 2]], [{"n": 2, "max_tokens": 4, "seed": 0}])
    assert not _alive(engine.pid) and engine.conn.closed
    assert not _alive(_log(fake_vllm)[0]["core_pid"])  # the dead engine's own process, an orphan, stopped too


def test_an_interrupted_request_does_not_wait_for_the_engine(fake_vllm, toy, monkeypatch):
    from selfie_lite.vllm_process import EngineProcess

    monkeypatch.setenv("FAKE_VLLM_FAIL", "hang")  # a request that would take ten minutes
    engine = EngineProcess({"model": str(toy[0])})
    engine.conn.send(("generate", [[1, 2]], [{"n": 2, "max_tokens": 4, "seed": 0}]))
    engine.busy = True  # where generate() stands when Ctrl-C reaches the run
    start = time.monotonic()
    engine.close()  # what the sample stage's clean-up does on the way out
    assert time.monotonic() - start < 10 and not _alive(engine.pid)
    assert not _alive(_log(fake_vllm)[0]["core_pid"])  # vLLM's own process too


def test_an_engine_does_not_outlive_a_killed_run(tmp_path, fake_vllm, toy):
    script = (
        "import os, signal, sys\n"
        "from selfie_lite.vllm_process import EngineProcess\n"
        f"e = EngineProcess({{'model': {str(toy[0])!r}}})\n"
        "print(e.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{FAKE}"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    child = int(r.stdout.split()[0])
    core = _log(fake_vllm)[0]["core_pid"]
    deadline = time.monotonic() + 15
    while (_alive(child) or _alive(core)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child) and not _alive(core)  # its watchdog saw the parent go and stopped the engine, whole


@pytest.mark.cpu_agnostic  # the samples come from the fake engine's seeded draws: no float decides
def test_two_processes_run_an_engine_each_and_sample_the_same(run_one):
    root, _ = run_one
    run = round_0_of(root / "one", root / "two")
    r = launch(2, ["--resume", str(run)], _env(root / "two.log"))
    assert r.returncode == 0, r.stderr[-3000:]
    loads = [e for e in _log(root / "two.log") if e["event"] == "load"]
    # One engine per process, each on its own process's GPU, each a child of its own process.
    assert sorted(e["cuda_visible_devices"] for e in loads) == ["0", "1"]
    assert len({e["ppid"] for e in loads}) == 2 and all(e["tensor_parallel_size"] == 1 for e in loads)
    assert all(e["launcher"] == {} for e in loads)  # not a member of the run's process group: no RANK, MASTER_PORT, ...
    assert sorted(e["prompts"] for e in _log(root / "two.log") if e["event"] == "generate") == [4, 4, 4, 4]
    for f in SAMPLES:
        assert (run / "round-1" / f).read_bytes() == (root / "one" / "round-1" / f).read_bytes(), f


@pytest.mark.cpu_agnostic  # the samples come from the fake engine's seeded draws: no float decides
def test_tensor_parallel_engines_span_the_gpus_of_their_processes(run_one):
    root, _ = run_one
    run = round_0_of(root / "one", root / "tp2")
    r = launch(2, ["--resume", str(run), "--set", "sample.tensor_parallel_size=2", "--force"], _env(root / "tp2.log"))
    assert r.returncode == 0, r.stderr[-3000:]
    loads = [e for e in _log(root / "tp2.log") if e["event"] == "load"]
    # One engine for the two processes, over both GPUs, started by process 0; process 1 lent it its GPU.
    assert [(e["cuda_visible_devices"], e["tensor_parallel_size"]) for e in loads] == [("0,1", 2)]
    for f in SAMPLES:
        assert (run / "round-1" / f).read_bytes() == (root / "one" / "round-1" / f).read_bytes(), f


def test_tensor_parallel_settings_that_cannot_work_are_refused(monkeypatch):
    from conftest import assert_one_line_error, invoke

    r = invoke("run", "--set", "sample.tensor_parallel_size=2")
    assert_one_line_error(r, 2, "sample.tensor_parallel_size = 2 would be ignored", "--sampler vllm")
    r = invoke("run", "--sampler", "vllm", "--set", "sample.tensor_parallel_size=0")
    assert_one_line_error(r, 2, "sample.tensor_parallel_size must be >= 1, got 0")
    from selfie_lite.errors import UserError
    from selfie_lite.validate import check_engines

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    check_engines(2)
    check_engines(4)
    with pytest.raises(UserError, match="= 3 must divide the 4 processes per machine"):
        check_engines(3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    check_engines(8)  # one process: vLLM itself says whether the machine has 8 GPUs
