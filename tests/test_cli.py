"""The CLI as a user drives it: exit codes and the one line they read. No traceback, nothing written."""

import os

import pytest
from conftest import invoke


def test_help_and_version_are_instant_and_show_examples():
    r = invoke("--help")
    assert r.exit_code == 0 and "selfie-lite run --seed 3.3pct" in r.output
    r = invoke("run", "--help")
    assert r.exit_code == 0 and "--resume" in r.output and "--random-seed" in r.output
    assert "runs/<timestamp>" in r.output  # not eaten as markup
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.startswith("selfie-lite ")


BAD = [
    (["run", "--seed", "0"], "need at least one labelled pair"),
    (["run", "--seed", "150%"], "at most 100%"),
    (["run", "--seed", "lots"], "is not a labelled share"),
    (["run", "--seed", "0pct"], "above 0%"),
    (["run", "--model", "/no/such/model"], "does not exist"),
    (["run", "--model", "some-org/some-model"], "hub is offline"),
    (["run", "--config", "missing.toml"], "config file missing.toml does not exist"),
    (["run", "--set", "rounds=abc"], "config key rounds: expected int"),
    (["run", "--set", "train.lr=1"], "unknown config key train.lr"),
    (["run", "--set", "beta"], "expected KEY=VALUE"),
    (["run", "--preset", "nope"], "no preset named 'nope'"),
    (["run", "--resume", "somewhere", "--out", "elsewhere"], "give one"),
    (["run", "--resume", "not-a-run"], "not a selfie-lite run folder"),
    (["run", "--backend", "unsloth"], "--backend unsloth is not available"),
    (["run", "--chat-template", "nope.jinja"], "no such file"),
    (["run", "--sampler", "vllm"], "--sampler vllm"),
    (["run", "--sampler", "fast"], "sample.sampler must be one of generate, vllm, auto"),
    (["run", "--rounds", "4"], "4 rounds need 4 prompt pools"),
    (["judge", "missing.jsonl", "--policy", "a", "--reference", "b"], "missing.jsonl does not exist"),
    (["tiny", "info", "--prompts", "0"], "--prompts must be at least 1, got 0"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "runs").exists()  # nothing written


def test_debug_shows_the_traceback():
    r = invoke("--debug", "run", "--seed", "0")
    assert r.exit_code != 0 and r.exception is not None


def test_unknown_key_in_a_config_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[sample]\ntemprature = 0.5\n")
    r = invoke("run", "--config", cfg)
    assert r.exit_code == 2 and "unknown config key sample.temprature" in r.output and "temperature" in r.output


def test_tiny_info_prints_the_sft_figures(tiny_preset):
    r = invoke("tiny", "info", "--prompts", "30")
    assert r.exit_code == 0, r.output
    for key in ("preferences.jsonl", "6,000 rows", "SFT model", "frac_good", "mean_score", "oracle"):
        assert key in r.output
    # The bench's calibration against the paper's baselines, as the results benchmark measured it (shipped file).
    from selfie_lite.tiny import calibration

    shipped = calibration.load()
    assert shipped is not None and "calibration against the paper's baselines" in r.output
    for f in shipped["figures"].values():
        assert f["what"] in r.output and f"{f['mean']:.3f} ± {f['sd']:.3f}" in r.output


def test_calibration_figures_and_verdicts():
    from selfie_lite.tiny.calibration import TARGETS, figures_of_seed, summarise

    def models(seed_wr, full_wr):
        return {"sft": {"frac_good": 0.5}, "dpo-seed": {"win_rate": seed_wr, "seed_pair_accuracy": 0.85},
                "dpo-100": {"win_rate": full_wr}}

    a = figures_of_seed(models(0.56, 0.66), {"gold_agreement_untied": 0.8})
    assert a["seed_gain_share"] == pytest.approx(0.06 / 0.16)
    b = figures_of_seed(models(0.52, 0.66), {"gold_agreement_untied": 0.8})  # the seed DPO barely moves
    s = summarise({1: a, 2: b}, source="test")
    assert set(s["figures"]) == set(TARGETS) and s["seeds"] == [1, 2]
    seed_wr = s["figures"]["dpo_seed_win_rate"]
    assert seed_wr["mean"] == pytest.approx(0.54) and seed_wr["holds"] is False  # a mean under 0.55 fails
    assert s["figures"]["dpo_100_win_rate"]["holds"] is True


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "p", "responses": ["a", "b"]}\nnot json\n', "in.jsonl line 2 is not JSON"),
    ('{"prompt": "p", "responses": ["only one"]}\n', 'in.jsonl row 1: need {"prompt": str, "responses": [at least 2 strings]}'),
    ('\n\n', "in.jsonl has no rows"),
    ('{"prompt": "p", "responses": ["a", "b"]}\n', "model folder no-such-policy does not exist"),
], ids=["not-json", "one-response", "empty", "no-policy"])
def test_judge_input_is_checked_before_any_model_loads(content, message, tmp_path):
    (tmp_path / "in.jsonl").write_text(content)
    r = invoke("judge", tmp_path / "in.jsonl", "--policy", "no-such-policy", "--reference", "no-such-ref",
               "-o", tmp_path / "pairs.jsonl")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "pairs.jsonl").exists()
