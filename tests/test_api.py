"""The Python API (selfie_lite.api), as a notebook would call it: on the toy model of selfie_lite.testing."""

import json

import pytest

from selfie_lite import api
from selfie_lite.config import load_config
from selfie_lite.errors import UserError
from selfie_lite.testing import build_toy_model, toy_preferences


@pytest.fixture(scope="module")
def toy_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    model, data = build_toy_model(root / "sft"), toy_preferences(root / "prefs.jsonl", n=120)
    return load_config(None, None, [{
        "model": str(model), "rounds": 1,
        "data": {"source": str(data), "labelled_share": "24", "pool_sizes": [12], "test_size": 20},
        "sample": {"max_new_tokens": 6, "chunk_size": 8},
        "train": {"batch_size": 4, "grad_accum": 1, "max_length": 64, "max_prompt_length": 32,
                  "gradient_checkpointing": False},
        "lora": {"r": 4, "alpha": 8}}])


def test_run_then_resume(toy_cfg, tmp_path):
    out = tmp_path / "run"
    summary = api.run(toy_cfg, out)
    assert summary["final_round"] == 1 and (out / "round-1" / "model" / "model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["final_model"] == summary["final_model"]
    assert json.loads((out / "config.json").read_text())["model"] == toy_cfg.model
    marker = (out / "round-1" / "done" / "train.json").stat().st_mtime_ns
    again = api.run(None, out, resume=True)  # the saved settings; every stage is done: nothing runs again
    assert again["final_model"] == summary["final_model"]
    assert (out / "round-1" / "done" / "train.json").stat().st_mtime_ns == marker
    with pytest.raises(UserError, match="already holds a run"):
        api.prepare(toy_cfg, out)


def test_bad_input_is_refused_before_anything_is_written(toy_cfg, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')  # no rejected
    import dataclasses

    cfg = dataclasses.replace(toy_cfg, data=dataclasses.replace(toy_cfg.data, source=str(bad)))
    with pytest.raises(UserError):
        api.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="not a selfie-lite run folder"):
        api.run(None, tmp_path / "nothing", resume=True)
