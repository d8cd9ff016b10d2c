"""The whole loop on the tiny preset, its artifacts, and kill-anywhere-then-resume giving the same result.

Small pools keep the file within a few minutes on 2 cores; the kills run the real CLI in a subprocess and end it
with SIGKILL (SELFIE_LITE_KILL_AT), so nothing gets to clean up, as with a lost Colab VM.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TWO_ROUNDS
from safetensors.torch import load_file
from typer.testing import CliRunner

from selfie_lite.cli import app
from selfie_lite.judge import judge_pairs

# The paper's loop (every round trains, no counter-measure): the guard's and the counter-measures' own tests below
# and in test_robust.py switch theirs on.
PAPER = [*TWO_ROUNDS, "--set", "method='paper'"]
STAGE_FILES = ["done/sample.json", "done/judge.json", "done/train.json", "done/merge.json", "samples", "judged.jsonl",
               "pairs.jsonl", "metrics.json", "model/model.safetensors", "model/config.json", "model/tokenizer.json",
               "adapter/adapter_model.safetensors"]


def cli(*args, env=None, check=True):
    """The real console script in a subprocess, as a user would run it."""
    e = dict(os.environ, **(env or {}))
    r = subprocess.run([sys.executable, "-m", "selfie_lite", *map(str, args)], capture_output=True, text=True, env=e,
                       timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def final_weights(run_dir: Path) -> dict:
    return load_file(str(sorted(run_dir.glob("round-*/model/model.safetensors"))[-1]))


def pairs_of(run_dir: Path) -> dict:
    return {p.parent.name: (p.read_text()) for p in sorted(run_dir.glob("round-*/judged.jsonl"))}


@pytest.fixture(scope="module")
def reference_run(tiny_preset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = CliRunner().invoke(app, ["run", *PAPER, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out, r.output


def test_each_stage_records_its_own_peak_memory(reference_run):
    """done/<stage>.json carries the stage's peak RSS (rss.py); a stage's peak is its own: after a reset the peak
    follows what the process holds now, not what an earlier stage held."""
    import sys

    from selfie_lite import rss

    out, _ = reference_run
    markers = sorted(out.glob("round-*/done/*.json"))
    assert {m.stem for m in markers} >= {"train", "merge", "sample", "judge"}
    if not sys.platform.startswith("linux"):
        pytest.skip("per-stage peak RSS is read from /proc (Linux)")
    for m in markers:
        peak = json.loads(m.read_text())["peak_rss_mb"]
        assert isinstance(peak, float) and 20 < peak < 64 * 1024, (m, peak)
    assert rss.reset_peak()
    held = bytearray(256 * 2**20)  # 256 MB, touched
    high = rss.peak_mb()
    del held
    assert rss.reset_peak()
    assert high - rss.peak_mb() > 200  # the reset forgot the 256 MB


def test_full_loop_writes_every_artifact(reference_run):
    out, output = reference_run
    assert "built-in tiny preset" in output or "tiny" in output
    assert "done in " in output and "round 2" in output
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["labelled_share"] == "48" and config["rounds"] == 2
    split = json.loads((out / "data" / "split.json").read_text())
    assert split["seed_pairs"] == 48
    from selfie_lite.tiny import build_tiny

    assert split["sft_model"] == str(build_tiny().model_dir)  # what eval compares the run with
    for f in ("done/train.json", "done/merge.json", "pairs.jsonl", "model/model.safetensors", "metrics.json"):
        assert (out / "round-0" / f).exists(), f
    for i in (1, 2):
        for f in STAGE_FILES:
            assert (out / f"round-{i}" / f).exists(), (i, f)
        pairs = [json.loads(line) for line in (out / f"round-{i}" / "pairs.jsonl").read_text().splitlines()]
        assert 0 < len(pairs) <= 40
        for p in pairs:
            assert p["chosen"] != p["rejected"]
            assert p["reward_chosen"] >= p["reward_rejected"]
            assert {"margin", "extrapolated_margin", "smoothed"} <= set(p)
        m = json.loads((out / f"round-{i}" / "metrics.json").read_text())
        assert m["sample"]["prompts"] == 40 and m["sample"]["tokens_per_s"] > 0
        assert m["judge"]["pairs"] == len(pairs) and 0 <= m["judge"]["gold_agreement"] <= 1
        assert {"loss_start", "loss_end", "mean_margin", "frac_smoothed", "pairs_per_s"} <= set(m["train"])
        assert m["merge"]["model_bytes"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_model"].endswith("round-2/model") and len(summary["per_round"]) == 3
    # The merged model is a standard HF folder: it loads with transformers alone.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out / "round-2" / "model"))


def test_rounds_change_the_model(reference_run):
    out, _ = reference_run
    w0, w2 = load_file(str(out / "round-0/model/model.safetensors")), final_weights(out)
    assert any(not torch.equal(w0[k], w2[k]) for k in w0)


def test_resume_of_a_finished_run_redoes_nothing(reference_run):
    out, _ = reference_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    r = CliRunner().invoke(app, ["run", "--resume", str(out)])
    assert r.exit_code == 0, r.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before


def test_resume_with_other_settings_refuses_and_names_them(reference_run):
    out, _ = reference_run
    r = CliRunner().invoke(app, ["run", "--resume", str(out), *PAPER, "--set", "train.learning_rate=0.5"])
    assert r.exit_code == 2
    lr = json.loads((out / "config.json").read_text())["train"]["learning_rate"]
    assert f"train.learning_rate: {lr} -> 0.5" in r.output and "--force" in r.output


def test_second_run_on_a_locked_folder_refuses(reference_run):
    out, _ = reference_run
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    try:
        r = CliRunner().invoke(app, ["run", "--resume", str(out)])
        assert r.exit_code == 2 and "in use by another run" in r.output
    finally:
        (out / ".lock").unlink()


@pytest.mark.cpu_agnostic
def test_kill_at_every_stage_then_resume_gives_the_same_result(reference_run, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "killed"
    # One run, killed (SIGKILL) inside each stage in turn, resumed each time.
    kills = ["train:2", "sample:16", "judge:1", "merge:1"]
    r = cli("run", *PAPER, "--out", out, env={"SELFIE_LITE_KILL_AT": kills[0]}, check=False)
    assert r.returncode == -9, r.stderr
    for spec in kills[1:]:
        r = cli("run", "--resume", out, env={"SELFIE_LITE_KILL_AT": spec}, check=False)
        assert r.returncode == -9, (spec, r.stderr[-2000:])
    cli("run", "--resume", out)
    assert pairs_of(out) == pairs_of(ref)
    a, b = final_weights(out), final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.rglob(".*.tmp*"))  # no temp leftovers after the final resume


def test_degenerate_samples_are_dropped():
    rows = [
        {"id": 0, "prompt": "a", "responses": ["same", "same"]},
        {"id": 1, "prompt": "b", "responses": ["", "x"]},  # empty wins the reward below: dropped
        {"id": 2, "prompt": "c", "responses": ["", "good"]},  # empty loses: kept as rejected
        {"id": 3, "prompt": "d", "responses": ["p", "q", "r"]},  # K = 3: best vs worst
    ]
    pol = [0.0, 0.0, 5.0, 1.0, 1.0, 5.0, 1.0, 3.0, 2.0]
    ref = [0.0] * 9
    pairs, drops = judge_pairs(rows, pol, ref, beta=0.1)
    assert drops == {"dropped_identical": 1, "dropped_empty_chosen": 1}
    assert [(p["pair_id"], p["chosen"], p["rejected"]) for p in pairs] == [(2, "good", ""), (3, "q", "p")]
    assert pairs[1]["reward_chosen"] == pytest.approx(0.3) and pairs[1]["reward_rejected"] == pytest.approx(0.1)
    assert pairs[1]["p_chosen"] == pytest.approx(1 / (1 + pytest.importorskip("math").exp(-0.2)))


def test_judge_command_labels_a_file(tiny_preset, reference_run, tmp_path):
    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.chat import chat_prompt_ids, chat_response_ids
    from selfie_lite.config import RunConfig

    ref_run, _ = reference_run
    prompts = [json.loads(line)["prompt"] for line in tiny_preset.eval_prompts.read_text().splitlines()[:6]]
    rows = [{"prompt": p, "responses": ["The answer is 3.", "um, maybe 3?", "3"]} for p in prompts]
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft, policy = str(tiny_preset.model_dir), str(ref_run / "round-1" / "model")
    r = CliRunner().invoke(app, ["judge", str(f), "--policy", policy, "--reference", sft, "-o", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 0, r.output
    pairs = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(pairs) == 6
    # Recompute one prompt's rewards by hand: beta * (log pi(y|x) - log ref(y|x)), best vs worst.
    be = HFBackend(RunConfig())
    pol_model, tok = be.load(policy)
    ref_model, _ = be.load(sft)
    seqs = [(chat_prompt_ids(tok, prompts[0]), chat_response_ids(tok, prompts[0], y)) for y in rows[0]["responses"]]
    rewards = [0.1 * (a - b) for a, b in zip(be.sequence_logps(pol_model, seqs, batch_size=8),
                                             be.sequence_logps(ref_model, seqs, batch_size=8), strict=True)]
    best, worst = max(range(3), key=lambda j: rewards[j]), min(range(3), key=lambda j: rewards[j])
    assert pairs[0]["chosen"] == rows[0]["responses"][best] and pairs[0]["rejected"] == rows[0]["responses"][worst]
    assert pairs[0]["reward_chosen"] == pytest.approx(rewards[best], abs=1e-4)


def test_judge_command_with_policy_equal_to_reference_finds_no_preference(tiny_preset, tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": "Add 2 and 3.", "responses": ["The answer is 5.", "5"]}) + "\n")
    model = str(tiny_preset.model_dir)
    r = CliRunner().invoke(app, ["judge", str(f), "--policy", model, "--reference", model, "-o", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 0 and "wrote 0 pairs" in r.output and "dropped 1 identical or tied" in r.output


# -- the round guard and the final model ------------------------------------------------------------


def test_guard_agreement_counts_the_sampled_tokens_of_each_pair():
    from selfie_lite.guard import agreement, pair_indices

    rows = [{"id": 0, "responses": ["a", "b"]}, {"id": 5, "responses": ["c", "d", "e"]}]
    pairs = [{"pair_id": 5, "chosen": "e", "rejected": "c"}, {"pair_id": 0, "chosen": "a", "rejected": "b"}]
    idx = pair_indices(rows, pairs)
    assert idx == [(4, 2), (0, 1)]  # flat positions: a b | c d e
    rewards = [1.0, 2.0, 0.0, 9.0, 3.0]  # the anchor prefers e over c (agrees) and b over a (disagrees)
    assert agreement(rewards, idx) == 0.5
    assert agreement([1.0, 1.0, 0.0, 0.0, 0.0], idx) == 0.5  # ties count 1/2 each
    assert agreement(rewards, []) == 1.0


# The paper's loop plus the guard alone (method = selfie with every robust.* setting at its off value).
GUARD_ONLY = ["--set", "method='selfie'", "--set", "guard.select='guard'", "--set", "robust.gold_replay=0.0",
              "--set", "robust.train_reference='previous'", "--set", "robust.consistency='off'",
              "--set", "guard.from_round=2"]


def _continue_from_round_1(ref: Path, dst: Path) -> Path:
    """A copy of the reference run with round 2 judged but not trained: the guard decides before training."""
    import shutil

    shutil.copytree(ref, dst, ignore=shutil.ignore_patterns(".lock"))
    rd = dst / "round-2"
    for name in ("adapter", "model"):
        shutil.rmtree(rd / name)
    for name in ("done/train.json", "done/merge.json", "pairs.jsonl", "metrics.json"):
        (rd / name).unlink()
    (dst / "summary.json").unlink()
    return dst


def test_guard_that_passes_trains_every_round(reference_run, tmp_path):
    ref, _ = reference_run
    out = _continue_from_round_1(ref, tmp_path / "passed")
    r = CliRunner().invoke(app, ["run", "--resume", str(out), "--force", *GUARD_ONLY,
                                 "--set", "guard.min_anchor_agreement=0.0"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_round"] == 2 and "passed the guard" in summary["final_why"]
    # The guard only decides: with it passed, round 2 trains to the very weights of the unguarded run.
    a, b = final_weights(out), final_weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_judge_picks_the_final_round(reference_run, tmp_path, monkeypatch):
    """guard.select = python:MODULE:FUNCTION ships the round whose answers the scorer likes best."""
    from selfie_lite.config import from_dict
    from selfie_lite.guard import select_by_scorer
    from selfie_lite.inputs import sft_model_of

    ref, _ = reference_run
    (tmp_path / "short_scorer.py").write_text("def score(prompt, response):\n    return -len(response)\n")
    cfg = from_dict(json.loads((ref / "config.json").read_text()) | {
        "guard": {"select": f"python:{tmp_path / 'short_scorer.py'}:score", "probe_prompts": 12}})
    from selfie_lite.backends.hf import HFBackend

    sel = select_by_scorer(cfg, ref, HFBackend(cfg), Path(sft_model_of(ref)), last_round=2)
    assert sorted(sel["scores"]) == [0, 1, 2] and sel["prompts"] == 12
    assert sel["scores"][sel["round"]] == max(sel["scores"].values())


def test_select_by_a_scorer_through_the_cli(reference_run, tmp_path):
    """run --select-by python:FILE:FUNCTION: resuming a finished run only re-picks the shipped round."""
    import shutil

    ref, _ = reference_run
    out = tmp_path / "picked"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns(".lock"))
    (tmp_path / "long_scorer.py").write_text("def score(prompt, response):\n    return len(response)\n")
    spec = f"python:{tmp_path / 'long_scorer.py'}:score"
    paper_loop = GUARD_ONLY[:-2]  # without guard.from_round: a scorer picks the round, there is no guard
    r = CliRunner().invoke(app, ["run", "--resume", str(out), "--force", *paper_loop, "--select-by", spec,
                                 "--set", "guard.probe_prompts=8"])  # the paper's loop, but a scorer picks
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    sel = summary["selection"]
    assert summary["final_round"] == int(max(sel["scores"], key=lambda k: (sel["scores"][k], int(k))))  # JSON: str keys
    assert summary["final_model"] == str((out / f"round-{summary['final_round']}" / "model").resolve())
    assert f"under {spec}" in summary["final_why"]


def test_select_by_a_bad_judge_stops_before_anything_is_written(tiny_preset, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", *TWO_ROUNDS, "--select-by", "magic", "--out", str(out)])
    assert r.exit_code == 2 and "guard.select must be one of last, guard, oracle" in r.output
    assert not out.exists()
