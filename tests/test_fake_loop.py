"""The loop's logic on FakeBackend (selfie_lite/testing.py): canned samples and scripted judges on a toy model, so
that each test steers what the judge prefers and checks what the loop does with it; training and merging are real.
A 2-round run takes a few seconds."""

import json
from pathlib import Path

import pytest
from conftest import fake_run, toy_config
from safetensors.torch import load_file

from selfie_lite.judge import flat_sequences
from selfie_lite.loss import implicit_rewards
from selfie_lite.sample import load_samples
from selfie_lite.testing import FakeBackend, hashed_logp, reversing_judge


def weights(run_dir: Path, i: int) -> dict:
    return load_file(str(run_dir / f"round-{i}" / "model" / "model.safetensors"))


def test_the_judge_picks_by_the_canned_rewards(toy, tmp_path):
    cfg = toy_config(toy, method="paper")
    summary, backend = fake_run(cfg, toy, tmp_path / "run")
    assert summary["final_round"] == 2 and [h["round"] for h in summary["per_round"]] == [0, 1, 2]
    for i in (1, 2):
        rd = tmp_path / "run" / f"round-{i}"
        rows = load_samples(rd)
        seqs = flat_sequences(rows)
        # By hand: r = beta (log pi_{i-1} - log pi_init) from the canned log-probs; chosen = best, rejected = worst.
        rewards = implicit_rewards([hashed_logp(f"round-{i - 1}", p, r) for p, r in seqs],
                                   [hashed_logp("init", p, r) for p, r in seqs], cfg.beta)
        pairs = [json.loads(x) for x in (rd / "judged.jsonl").read_text().splitlines()]
        k = 0
        by_id = {p["pair_id"]: p for p in pairs}
        for r in rows:
            rw = rewards[k : k + len(r["responses"])]
            k += len(r["responses"])
            if len(set(r["responses"])) < 2:
                continue
            p = by_id[r["id"]]
            assert p["chosen"] == r["responses"][rw.index(max(rw))]
            assert p["rejected"] == r["responses"][rw.index(min(rw))]
            assert p["rewards"] == pytest.approx(rw)
    # Sampling uses pi_{i-1}; the paper's judge scores pi_init (its policy term comes from the sampling pass).
    assert ("generate", "round-1") in backend.calls and ("sequence_logps", "init") in backend.calls
    assert ("sequence_logps", "round-1") not in backend.calls


def test_by_default_the_guard_lets_round_2_train(toy, tmp_path):
    """guard.from_round = 3: even labels that reverse the seed-DPO judge's train in round 2 (every stop before round
    2 we measured was a false alarm); round 3 is checked."""
    cfg = toy_config(toy, rounds=3)
    out = tmp_path / "run"
    summary, backend = fake_run(cfg, toy, out, FakeBackend(cfg, logp=reversing_judge))
    assert (out / "round-2" / "done" / "train.json").is_file() and not (out / "round-2" / "done" / "guard.json").exists()
    g = json.loads((out / "round-3" / "done" / "guard.json").read_text())
    assert g["anchor_agreement"] == 1.0 and not g["stop"] and summary["final_round"] == 3  # pi_2 ranks as pi_0
    assert ("sequence_logps", "round-0") in backend.calls  # pi_0 scored once in round 2 (consistency), once in 3
    assert backend.calls.count(("sequence_logps", "round-0")) == 2


def test_the_guard_stops_ships_the_previous_round_and_resumes_to_the_same_verdict(toy, tmp_path):
    cfg = toy_config(toy, guard={"from_round": 2})  # threshold 0.93, checking round 2 already
    out = tmp_path / "run"
    summary, _ = fake_run(cfg, toy, out, FakeBackend(cfg, logp=reversing_judge))
    guard = json.loads((out / "round-2" / "done" / "guard.json").read_text())
    assert guard["anchor_agreement"] == 0.0 and guard["stop"]
    assert summary["final_round"] == 1 and summary["final_model"] == str((out / "round-1" / "model").resolve())
    assert "round 2's self-labels agree with the seed-DPO judge on 0% of pairs" in summary["final_why"]
    assert not (out / "round-2" / "done" / "train.json").exists()  # stopped BEFORE training round 2
    w1 = weights(out, 1)

    again, backend = fake_run(cfg, toy, out, FakeBackend(cfg, logp=reversing_judge))  # resume: nothing new runs
    assert again["final_round"] == 1 and again["final_why"] == summary["final_why"]
    assert backend.calls == [] and not (out / "round-2" / "done" / "train.json").exists()

    # The verdict uses the current threshold: 0 lets the stopped run go on, from the measured agreement.
    on, backend = fake_run(toy_config(toy, guard={"min_anchor_agreement": 0.0, "from_round": 2}), toy, out,
                      FakeBackend(cfg, logp=reversing_judge))
    assert on["final_round"] == 2 and (out / "round-2" / "done" / "train.json").is_file()
    assert not any(what == "generate" for what, _ in backend.calls)  # round 2's samples were reused
    assert all(w1[k].equal(v) for k, v in weights(out, 1).items())


def test_consistency_on_scripted_judges(toy, tmp_path):
    """CREAM: round 2's judge (pi_1) reverses round 1's (pi_0) on every prompt, so every pair gets a = 0.5."""
    cfg = toy_config(toy, guard={"select": "last"}, robust={"consistency": "pair"})
    out = tmp_path / "run"
    fake_run(cfg, toy, out, FakeBackend(cfg, logp=reversing_judge))
    m = json.loads((out / "round-2" / "done" / "consistency.json").read_text())
    assert m["mean_consistency"] == 0.0 and m["disagreeing"] == 1.0 and m["mean_smoothing"] == 0.5
    pairs = [json.loads(x) for x in (out / "round-2" / "pairs.jsonl").read_text().splitlines()]
    assert {p["smoothing"] for p in pairs if not p.get("gold")} == {0.5}
    assert {p["smoothing"] for p in pairs if p.get("gold")} == {0.0}
    assert json.loads((out / "round-2" / "done" / "train.json").read_text())["smoothing_source"] == "consistency"
    assert json.loads((out / "round-1" / "done" / "train.json").read_text())["smoothing_source"] == "low-confidence"


class Interrupted(Exception):
    pass


class FailingOnce(FakeBackend):
    """Raises once, at the first call of `method` whose model tag is `tag` (round 2's stages), like a crash there."""

    def __init__(self, cfg, method, tag):
        super().__init__(cfg)
        self.method, self.tag, self.failed = method, tag, False

    def _maybe_fail(self, what, tag):
        if not self.failed and what == self.method and tag == self.tag:
            self.failed = True
            raise Interrupted(what)

    def generate(self, model, *a, **kw):
        from selfie_lite.testing import model_tag

        self._maybe_fail("generate", model_tag(model))
        return super().generate(model, *a, **kw)

    def sequence_logps(self, model, *a, **kw):
        from selfie_lite.testing import model_tag

        self._maybe_fail("sequence_logps", model_tag(model))
        return super().sequence_logps(model, *a, **kw)

    def save_adapter(self, model, out_dir, weights=None):
        self._maybe_fail("save_adapter", Path(out_dir).parent.name)
        return super().save_adapter(model, out_dir, weights)

    def merge(self, base_dir, adapter_dir, out_dir):
        self._maybe_fail("merge", Path(out_dir).parent.name)
        return super().merge(base_dir, adapter_dir, out_dir)


@pytest.fixture(scope="module")
def uninterrupted(toy, tmp_path_factory):
    cfg = toy_config(toy, guard={"select": "last"})
    out = tmp_path_factory.mktemp("whole") / "run"
    fake_run(cfg, toy, out)
    return cfg, out


@pytest.mark.parametrize("method,tag", [
    ("sequence_logps", "init"),       # the judge's reference pass (round 1)
    ("merge", "round-2"),             # round 2's merge, after its training
])  # every stage, killed for real (SIGKILL) on the tiny preset: test_loop.py
def test_a_crash_in_any_stage_resumes_to_the_same_weights(toy, tmp_path, uninterrupted, method, tag):
    cfg, whole = uninterrupted
    out = tmp_path / "run"
    backend = FailingOnce(cfg, method, tag)
    with pytest.raises(Interrupted):
        fake_run(cfg, toy, out, backend)
    fake_run(cfg, toy, out, backend)  # the same call again resumes
    for i in (0, 1, 2):
        a, b = weights(whole, i), weights(out, i)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), f"round {i}"
    assert (out / "round-2" / "judged.jsonl").read_text() == (whole / "round-2" / "judged.jsonl").read_text()


def test_a_python_judge_selects_the_round_it_scores_best(toy, tmp_path, monkeypatch):
    """guard.select = python:MODULE:FUNCTION: every round answers the held-out probe prompts, the scorer picks."""
    (tmp_path / "toyscore.py").write_text("def score(prompt, response):\n    return response.split().count('good')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    goods = {"init": 0, "round-0": 1, "round-1": 3, "round-2": 2}  # round 1's answers are the best

    def respond(tag, prompt, k, rng):
        return " ".join(["good"] * goods[tag] + ["cat"] * (k + 1))  # k: the K samples differ

    cfg = toy_config(toy, guard={"select": "python:toyscore:score", "probe_prompts": 5})
    summary, _ = fake_run(cfg, toy, tmp_path / "run", FakeBackend(cfg, respond=respond))
    assert summary["final_round"] == 1
    assert summary["selection"]["scores"] == {0: 1.0, 1: 3.0, 2: 2.0} and summary["selection"]["prompts"] == 5
    assert "round 1 scored best under python:toyscore:score on 5 held-out prompts" in summary["final_why"]


def test_the_guard_stops_through_the_cli_and_a_forced_resume_goes_on(toy, tmp_path, monkeypatch):
    """The CLI's side of the guard, on a scripted judge (reversing_judge: round 2's labels disagree with the seed-DPO
    judge on every pair), so that the verdict never rests on one CPU's floats: the stop line, summary.json, a resume
    that changes nothing, and a forced lower threshold that reuses the measured agreement and trains round 2."""
    from typer.testing import CliRunner

    import selfie_lite.backends
    from selfie_lite.cli import app

    monkeypatch.setattr(selfie_lite.backends, "get_backend",
                        lambda cfg: (FakeBackend(cfg, logp=reversing_judge), "scripted judge"))
    model, data = toy
    out = tmp_path / "guarded"
    flags = ["--model", str(model), "--data", str(data), "--seed", "24", "--rounds", "2", "--out", str(out),
             "--set", "data.pool_sizes=[16, 16]", "--set", "data.test_size=20", "--set", "sample.max_new_tokens=8",
             "--set", "train.batch_size=4", "--set", "train.grad_accum=1", "--set", "train.max_length=64",
             "--set", "train.max_prompt_length=32", "--set", "train.gradient_checkpointing=false",
             "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "guard.from_round=2"]
    r = CliRunner().invoke(app, ["run", *flags])
    assert r.exit_code == 0, r.output
    g = json.loads((out / "round-2" / "done" / "guard.json").read_text())
    assert g["stop"] and g["anchor_agreement"] == 0.0 and g["threshold"] == 0.93
    assert "stopped before training it; shipping round 1" in " ".join(r.output.split())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_round"] == 1 and summary["final_model"] == str((out / "round-1" / "model").resolve())
    assert "agree with the seed-DPO judge" in summary["final_why"]
    assert not (out / "round-2" / "model").exists() and not (out / "round-2" / "done" / "train.json").exists()
    # A resume reads the verdict from disk: it stops at the same place and writes nothing new.
    before = sorted(p.relative_to(out) for p in out.rglob("*") if ".lock" not in p.name)
    r = CliRunner().invoke(app, ["run", "--resume", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "summary.json").read_text())["final_round"] == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*") if ".lock" not in p.name) == before
    # A lower threshold, forced, lets the stopped run go on: the measured agreement is reused, round 2 trains.
    r = CliRunner().invoke(app, ["run", "--resume", str(out), "--force", "--set", "guard.min_anchor_agreement=0.0"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "summary.json").read_text())["final_round"] == 2
    assert json.loads((out / "round-2" / "done" / "guard.json").read_text()) == g  # not measured again
