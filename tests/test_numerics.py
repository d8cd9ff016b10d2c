"""Reproducible CPU numerics (issue: resume must not depend on the process it runs in) and the thread policy."""

import json
import os
import subprocess
import sys

import pytest

SAMPLE_AND_SCORE = r"""
import hashlib, json, struct, sys
import selfie_lite  # first, as the CLI does: pins MKL's reproducible mode
import torch
torch.set_num_threads(int(sys.argv[1]))
from selfie_lite.backends.hf import HFBackend
from selfie_lite.config import RunConfig
from selfie_lite.tiny.build import build_tiny
from selfie_lite.rundir import read_jsonl
preset = build_tiny()
prompts = [r["prompt"] for r in read_jsonl(preset.eval_prompts)[:32]]
be = HFBackend(RunConfig())
model, tok = be.load(preset.model_dir)
rows = be.generate(model, tok, prompts, num_samples=2, temperature=0.7, top_p=1.0, max_new_tokens=24,
                   batch_size=16, seed=7)
logps = be.sequence_logps(model, [(r["prompt_ids"], ids) for r in rows for ids in r["response_ids"]], batch_size=16)
floats = [x for r in rows for x in r["policy_logps"]] + logps
print(json.dumps({"ids": [r["response_ids"] for r in rows], "floats": floats}))
"""


def _run(threads: int, env_extra: dict | None = None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    r = subprocess.run([sys.executable, "-c", SAMPLE_AND_SCORE, str(threads)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_sampling_and_scoring_are_bit_identical_across_thread_counts(tiny_preset):
    """What made the kill/resume test fail on a clean clone: a process with 1 torch thread and one with 2 gave
    log-probs that differed in the fifth digit. With MKL's reproducible mode they are the same to the bit."""
    one, two = _run(1), _run(2)
    assert one["ids"] == two["ids"]
    assert one["floats"] == two["floats"]  # exact float equality, not approx


def test_importing_selfie_lite_pins_mkl_but_respects_a_users_choice():
    code = "import os, selfie_lite; print(os.environ.get('MKL_CBWR'))"
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "AUTO,STRICT"
    env["MKL_CBWR"] = "COMPATIBLE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "COMPATIBLE"


def test_thread_policy(tiny_preset, tmp_path):
    from selfie_lite.numerics import auto_threads, resolve_threads

    assert auto_threads(tiny_preset.model_dir, "cpu") == 1  # a small model on a CPU: one thread
    assert auto_threads(tiny_preset.model_dir, "cuda") is None  # a GPU run leaves the CPU threads alone
    assert auto_threads("HuggingFaceH4/zephyr-7b-beta", "cpu") is None  # not on disk: torch's default
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as f:
        f.truncate(500 * 2**20)  # sparse file: 500 MB of weights, no disk used
    assert auto_threads(big, "cpu") is None
    assert resolve_threads(3, tiny_preset.model_dir, "cpu") == 3  # an explicit setting wins


def test_torch_threads_restores_the_callers_count():
    import torch

    from selfie_lite.numerics import torch_threads

    before = torch.get_num_threads()
    with torch_threads(2) as n:
        assert n == torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(2):
        raise RuntimeError("a failing run")
    assert torch.get_num_threads() == before
