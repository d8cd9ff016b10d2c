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

    # Other settings on resume: refused (naming the key) unless forced; forced, the old settings are kept.
    import dataclasses

    saved = (out / "config.json").read_text()
    other = dataclasses.replace(toy_cfg, beta=0.2)
    with pytest.raises(UserError, match=r"was made with other settings: beta: 0.1 -> 0.2"):
        api.run(other, out, resume=True)
    assert (out / "config.json").read_text() == saved and not (out / "config.0.json").exists()
    api.run(other, out, resume=True, force=True)
    assert (out / "config.0.json").read_text() == saved and json.loads((out / "config.json").read_text())["beta"] == 0.2
    history = [json.loads(x) for x in (out / "config-history.jsonl").read_text().splitlines()]
    assert history[-1]["rev"] == 1 and history[-1]["changes"] == ["beta: 0.1 -> 0.2"]


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


def test_evaluate_and_judge_from_python(toy_cfg, tmp_path):
    """api.evaluate and api.judge on a finished toy run: the numbers they return are the ones worked out here from
    the files they wrote and from the models directly."""
    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.chat import chat_prompt_ids, chat_response_ids
    from selfie_lite.loss import implicit_reward
    from selfie_lite.rundir import read_jsonl

    run = tmp_path / "run"
    api.run(toy_cfg, run)
    scorer = tmp_path / "length.py"
    scorer.write_text("def score(prompt, response):\n    return float(len(response))\n")
    ev = api.evaluate(run, scorer=f"python:{scorer}:score", limit=6, max_new_tokens=6)
    assert list(ev.result["models"]) == ["sft", "round-0", "round-1"]
    assert json.loads(ev.eval_file.read_text()) == ev.result and ev.eval_file == run / "eval.json"
    assert ev.result["settings"]["scorer"] == f"python:{scorer}:score" and ev.result["settings"]["prompts"] == 6
    assert ev.result["models"]["sft"]["win_rate"] == 0.5  # the baseline against its own responses: all ties
    for name, m in ev.result["models"].items():
        rows = read_jsonl(run / "eval" / "outputs" / f"{name}.jsonl")
        lengths = [float(len(x)) for r in rows for x in r["responses"]]
        assert m["mean_score"] == pytest.approx(sum(lengths) / len(lengths))
    with pytest.raises(UserError, match="no finished round 7"):
        api.evaluate(run, rounds=[7])

    prefs = read_jsonl(toy_cfg.data.source)[:4]
    rows = [{"prompt": p["prompt"], "responses": [p["rejected"], p["chosen"], p["chosen"] + " ok"]} for p in prefs]
    policy = run / "round-1" / "model"
    pairs, dropped = api.judge(rows, policy, toy_cfg.model, beta=0.1)
    assert dropped == {"dropped_identical": 0, "dropped_empty_chosen": 0} and len(pairs) == len(rows)
    be = HFBackend(toy_cfg)
    tok = be.load_tokenizer(policy)
    seqs = [(chat_prompt_ids(tok, r["prompt"]), chat_response_ids(tok, r["prompt"], y)) for r in rows for y in r["responses"]]
    logps = {}
    for name, folder in (("policy", policy), ("ref", toy_cfg.model)):
        model, _ = be.load(folder)
        logps[name] = be.sequence_logps(model, seqs, batch_size=4)
        be.free(model)
    for k, (r, pair) in enumerate(zip(rows, pairs, strict=True)):
        rewards = [implicit_reward(p, q, 0.1) for p, q in zip(logps["policy"][3 * k: 3 * k + 3], logps["ref"][3 * k: 3 * k + 3], strict=True)]
        assert pair["chosen"] == r["responses"][max(range(3), key=lambda j: rewards[j])]
        assert pair["rejected"] == r["responses"][min(range(3), key=lambda j: rewards[j])]
        assert pair["rewards"] == pytest.approx(rewards, abs=1e-6)
    with pytest.raises(UserError, match="does not exist"):
        api.judge(rows, tmp_path / "no-model", toy_cfg.model)
    with pytest.raises(UserError, match=r"rows row 2: need \{"):
        api.judge([rows[0], {"prompt": "p", "responses": ["only one"]}], policy, toy_cfg.model)


def test_a_setting_added_since_the_run_started_is_no_change_at_its_default():
    from selfie_lite.api import resume_changes
    from selfie_lite.config import RunConfig, to_dict

    new = to_dict(RunConfig())
    saved = {k: v for k, v in new.items() if k != "robust"} | {"robust": {"gold_replay": 0.5}}  # an older config.json
    assert resume_changes(saved, new) == []
    changed = to_dict(RunConfig(rounds=2))
    assert resume_changes(saved, changed) == ["rounds: 3 -> 2"]
    off = {**new, "robust": {**new["robust"], "max_steps": 5}}
    assert resume_changes(saved, off) == ["robust.max_steps: 0 -> 5"]  # a missing key counts as its default
