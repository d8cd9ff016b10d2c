"""The CLI as a user drives it: exit codes and the one line they read. No traceback, nothing written."""

import os

import pytest
from typer.testing import CliRunner

from selfie_lite.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_and_version_are_instant_and_show_examples():
    r = invoke("--help")
    assert r.exit_code == 0 and "selfie-lite run --seed 3.3pct" in r.output
    r = invoke("run", "--help")
    assert r.exit_code == 0 and "--resume" in r.output and "--random-seed" in r.output
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
    (["run", "--sampler", "fast"], "sample.sampler must be generate, vllm or auto"),
    (["run", "--rounds", "4"], "4 rounds need 4 prompt pools"),
    (["judge", "missing.jsonl", "--policy", "a", "--reference", "b"], "missing.jsonl does not exist"),
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
