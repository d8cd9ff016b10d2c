"""The model card (README.md with the Hub's front matter) in the model folder a run ships, on the
toy model with FakeBackend (selfie_lite/testing.py): a guard-stopped run, a resume that goes on, eval's figures,
and the command that makes the run again."""

import json
import shlex

import pytest
import yaml
from huggingface_hub import ModelCard
from rich.console import Console

from selfie_lite import card
from selfie_lite.config import load_config, to_dict
from selfie_lite.inputs import Inputs
from selfie_lite.loop import STAGE_OUTPUTS, run_rounds
from selfie_lite.rundir import outputs_digest
from selfie_lite.testing import FakeBackend, reversing_judge


def config(toy, **over):
    model, data = toy
    layers = [{"model": str(model), "rounds": 2,
               "data": {"source": str(data), "labelled_share": "24", "pool_sizes": [16, 16], "test_size": 20},
               "sample": {"max_new_tokens": 8, "chunk_size": 8},
               "train": {"batch_size": 4, "grad_accum": 1, "max_length": 64, "max_prompt_length": 32,
                         "gradient_checkpointing": False, "learning_rate": 1e-3},
               "lora": {"r": 4, "alpha": 8}}]
    return load_config(None, None, layers + [over])


def run(cfg, toy, out):
    return run_rounds(cfg, out, FakeBackend(cfg, logp=reversing_judge), Inputs(toy[0], str(toy[1]), None, False),
                      Console(quiet=True))


def parse(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_the_card_follows_the_shipped_round_and_says_why(toy, tmp_path):
    cfg = config(toy, guard={"from_round": 2})  # the guard checks round 2 and stops: round 1 ships
    out = tmp_path / "run"
    summary = run(cfg, toy, out)
    assert summary["final_round"] == 1
    readme = out / "round-1" / "model" / "README.md"
    meta, body = parse(readme.read_text())
    # What the Hub reads: library, pipeline, tags; no base_model or datasets for a local model and a local file
    # (the Hub checks base_model against its models), no license that nobody stated.
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"dpo", "spa", "selfie-lite"} <= set(meta["tags"])
    assert "base_model" not in meta and "datasets" not in meta and "license" not in meta
    assert ModelCard(readme.read_text()).data.to_dict() == meta  # huggingface_hub reads the same fields back
    assert "round 2's self-labels agree with the seed-DPO judge on 0% of pairs" in body  # the guard's verdict
    assert "| ships | round 1: " in body and "| method | selfie " in body and "| labelled share | 24 (24 " in body
    rows = [line for line in body.splitlines() if line.startswith("| 0 (seed DPO)") or line.startswith("| **1")]
    assert len(rows) == 2 and "ships" in rows[1]
    assert "Not evaluated yet" in body
    assert not (out / "round-2" / "model").exists() and not (out / "round-0" / "model" / "README.md").exists()

    # The card is not a stage output: the merge's digest ignores it, and a resume that changes nothing leaves it.
    merge = json.loads((out / "round-1" / "done" / "merge.json").read_text())
    assert merge["outputs_sha256"] == outputs_digest(out / "round-1", STAGE_OUTPUTS["merge"])
    before = readme.stat().st_mtime_ns
    run(cfg, toy, out)
    assert readme.stat().st_mtime_ns == before

    # Going on (the guard off from round 2): round 2 ships, the card moves with it.
    on = config(toy, guard={"from_round": 2, "min_anchor_agreement": 0.0})
    assert run(on, toy, out)["final_round"] == 2
    assert not readme.exists()
    _, body = parse((out / "round-2" / "model" / "README.md").read_text())
    assert "| ships | round 2: the last round: every round's self-labels passed the guard |" in body


def test_eval_figures_go_into_the_card(toy, tmp_path):
    out = tmp_path / "run"
    cfg = config(toy, rounds=1, method="paper")
    run(cfg, toy, out)
    (out / "config.json").write_text(json.dumps(to_dict(cfg)))
    result = {"settings": {"prompts": 20, "scorer": "oracle", "baseline": str(toy[0]), "temperature": 0.7,
                           "max_new_tokens": 8},
              "models": {"baseline": {"win_rate": 0.5, "wins": 0, "ties": 20, "losses": 0, "mean_score": 0.1},
                         "round-0": {"win_rate": 0.55, "wins": 4, "ties": 14, "losses": 2, "mean_score": 0.2,
                                     "seed_pair_accuracy": 0.6, "mean_response_tokens": 7.5},
                         "round-1": {"win_rate": 0.625, "wins": 6, "ties": 13, "losses": 1, "mean_score": 0.25,
                                     "seed_pair_accuracy": 0.65, "mean_response_tokens": 7.25,
                                     "self_label_gold_agreement": 0.7}}}
    (out / "eval.json").write_text(json.dumps(result))
    path = card.write_card(out)  # what run_eval calls after writing eval.json
    _, body = parse(path.read_text())
    assert "20 held-out prompts, scorer oracle" in body
    assert "| **round-1, ships** | 0.625 | 6/13/1 | 0.250 | 0.650 | 0.700 | 7.2 |" in body
    assert "| round-0 | 0.550 | 4/14/2 | 0.200 | 0.600 | - | 7.5 |" in body
    assert "# The tiny" not in body and "| rounds | 1 self-labelling round asked for;" in body
    assert "| method | paper (the paper's loop exactly) |" in body


@pytest.mark.cpu_agnostic
def test_a_users_own_readme_is_left_alone(toy, tmp_path):
    out = tmp_path / "run"
    (out / "round-0" / "model").mkdir(parents=True)
    (out / "round-0" / "model" / "README.md").write_text("# my notes\n")
    summary = {"final_round": 0, "final_why": "the last round", "per_round": [{"round": 0}]}
    assert card.write_card(out, to_dict(config(toy)), summary) is None
    assert (out / "round-0" / "model" / "README.md").read_text() == "# my notes\n"


@pytest.mark.cpu_agnostic
def test_smollm2_carries_its_hub_id_and_license():
    cfg = to_dict(load_config("smol"))
    summary = {"final_round": 2, "final_why": "the last round: every round's self-labels passed the guard",
               "per_round": [{"round": i} for i in range(3)], "data": {"seed_pairs": 31, "pools": [24, 24, 32]}}
    meta, body = parse(card.card_text(cfg, summary))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "datasets" not in meta  # builtin:smol is made on this machine, not a Hub dataset
    assert body.count("\n# SmolLM2-135M-Instruct, aligned with SPA (selfie-lite)") == 1
    assert "selfie-lite run --preset smol\n" in body  # the preset as it is: nothing else to say
    hub = to_dict(load_config(None, None, [{"model": "HuggingFaceH4/mistral-7b-sft-beta",
                                            "data": {"source": "HuggingFaceH4/ultrafeedback_binarized"}}]))
    meta, _ = parse(card.card_text(hub, summary))
    assert meta["base_model"] == "HuggingFaceH4/mistral-7b-sft-beta"
    assert meta["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"]
    assert card.hub_id_of("/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/abc") == \
        "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.cpu_agnostic
@pytest.mark.parametrize("preset, layer, expect", [
    (None, {"model": "/models/sft", "data": {"source": "/data/prefs [v2].jsonl", "labelled_share": "3.3pct"},
            "rounds": 2, "random_seed": 7, "train": {"learning_rate": 2e-4},
            "lora": {"target_modules": ["q_proj", "v_proj"]}}, "--data '/data/prefs [v2].jsonl'"),
    (None, {"model": "/models/sft", "method": "paper", "beta": 0.05, "sample": {"temperature": 0.9},
            "guard": {"select": "last"}}, "--set method=paper --set sample.temperature=0.9\n"),
    ("tiny", {"data": {"labelled_share": "24", "pool_sizes": [24]}, "rounds": 1},
     "selfie-lite run --preset tiny --seed 24 --rounds 1 --set 'data.pool_sizes=[24]'\n"),
    ("smol", {"data": {"split": "2024"}}, "selfie-lite run --preset smol --set 'data.split=\"2024\"'\n"),
])
def test_the_reproduce_command_makes_the_same_settings(preset, layer, expect):
    """The card's command, parsed as the CLI parses its flags (cli.build_config), gives config.json's settings."""
    from selfie_lite.cli import build_config
    from selfie_lite.config import absolute_paths

    cfg = to_dict(absolute_paths(load_config(preset, None, [layer])))
    command = card.reproduce_command(cfg)
    assert expect in command + "\n"
    words = shlex.split(command)
    assert words[:2] == ["selfie-lite", "run"]
    args = {"--preset": None, "--model": None, "--data": None, "--seed": None, "--rounds": None,
            "--random-seed": None, "--beta": None}
    sets = []
    it = iter(words[2:])
    for flag in it:
        value = next(it)
        if flag == "--set":
            sets.append(value)
        else:
            assert flag in args
            args[flag] = value
    again, _ = build_config(args["--preset"], None, args["--seed"], args["--model"], args["--data"],
                            int(args["--rounds"]) if args["--rounds"] else None,
                            int(args["--random-seed"]) if args["--random-seed"] else None, None, False,
                            float(args["--beta"]) if args["--beta"] else None, None, False, sets)
    assert to_dict(again) == cfg
