"""`selfie-lite report`: the per-round table and the PNG, from a run folder written here by hand."""

import json
import random

import pytest
from typer.testing import CliRunner

from selfie_lite.cli import app
from selfie_lite.report import collect, report_table

runner = CliRunner()  # drives the real `selfie-lite` app, as a user would


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_run(root, rounds=3, with_eval=True):
    """A run folder as the loop leaves it: config, per-stage done markers, pairs.jsonl with pair stats."""
    rng = random.Random(0)
    _write_json(root / "config.json", {"rounds": rounds, "refine": {"low_conf_frac": 0.1}})
    (root / "data").mkdir(parents=True)
    for i in range(rounds + 1):
        d = root / f"round-{i}"
        if i > 0:
            _write_json(d / "done" / "sample.json", {"prompts": 100, "mean_response_tokens": 10.0 + i})
            _write_json(d / "done" / "judge.json", {"pairs": 90, "dropped_identical": 10, "gold_agreement": 0.6 + 0.05 * i,
                                                    "mean_p_chosen": 0.55, "distinct_samples": 1.0 - 0.1 * i})
        if i >= 2:
            _write_json(d / "done" / "guard.json", {"anchor_agreement": 1.0 - 0.02 * i, "threshold": 0.93})
        _write_json(d / "done" / "train.json", {"pairs": 90, "loss_start": 0.693, "loss_end": 0.5 - 0.05 * i,
                                                "mean_margin": 0.3 * (i + 1), "reward_accuracy": 0.8,
                                                "frac_smoothed": 0.0 if i == 0 else 0.1, "lam": 0.5 / 2 ** max(i - 1, 0)})
        _write_json(d / "done" / "merge.json", {"seconds": 0.1, "model_bytes": 1000})
        rows = []
        for k in range(90):
            z = rng.gauss(0.5, 0.4)
            rows.append({"pair_id": k, "prompt": "p", "chosen": "c", "rejected": "r", "margin": z,
                         "extrapolated_margin": 1.3 * z, "smoothed": i > 0 and z < 0.0, "low_confidence": z < 0.0})
        (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if rounds == 3:
        _write_json(root / "summary.json", {"final_round": 2, "final_why": "round 3's self-labels [disagree]"})
    if with_eval:
        models = {"sft": {"win_rate": 0.5, "wins": 0, "ties": 300, "losses": 0, "mean_score": 0.6,
                          "seed_pair_accuracy": 0.5, "mean_response_tokens": 9.0, "mean_response_words": 6.0}}
        for i in range(rounds + 1):
            models[f"round-{i}"] = {"win_rate": 0.55 + 0.05 * i, "wins": 100, "ties": 100, "losses": 100,
                                    "mean_score": 0.65 + 0.05 * i, "seed_pair_accuracy": 0.6 + 0.02 * i,
                                    "mean_response_tokens": 9.0 + i, "mean_response_words": 6.0}
        _write_json(root / "eval.json", {"settings": {"judge": "oracle", "prompts": 300, "baseline": "/x/sft-model",
                                                      "labelled_pairs": 500}, "models": models})
    return root


def test_report_table_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path / "run")
    r = invoke("report", run)
    assert r.exit_code == 0, r.output
    lines = [x.strip() for x in r.output.splitlines()]
    row3 = next(x for x in lines if x.startswith("3 ")).split()
    # round, pairs, gold agreement, anchor agreement, p(chosen), distinct samples, smoothed
    assert row3[:7] == ["3", "90", "0.750", "0.940", "0.550", "0.70", "0.10"]
    assert row3[7] == "0.693→0.350" and row3[-1] == "13.0"  # loss first -> last, sample length
    assert next(x for x in lines if x.startswith("1 ")).split()[3] == "-"  # no guard before round 2
    assert "ships round 2: round 3's self-labels [disagree]" in r.output  # summary.json's verdict, brackets kept
    assert any(x.startswith("0 seed") for x in lines)
    eval3 = next(x for x in lines if x.startswith("round-3")).split()
    assert eval3[1] == "0.700" and eval3[-3] == "0.660"  # win rate, seed-pair accuracy
    assert next(x for x in lines if x.startswith("sft")).split()[1] == "0.500"
    png = run / "report.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    w, h = Image.open(png).size
    assert w >= 1200 and h >= 800

    r = invoke("report", run, "--png", tmp_path / "fig" / "r.png")
    assert r.exit_code == 0 and (tmp_path / "fig" / "r.png").is_file()


def test_report_without_eval_or_plot(tmp_path):
    run = make_run(tmp_path / "run", rounds=1, with_eval=False)
    r = invoke("report", run, "--no-plot")
    assert r.exit_code == 0, r.output
    assert "selfie-lite eval" in r.output and "seed-pair acc" not in r.output
    assert not (run / "report.png").exists()
    data = collect(run)
    assert [x["round"] for x in data["rounds"]] == [0, 1]
    assert sum(p["smoothed"] for p in data["rounds"][1]["pairs"]) > 0
    assert report_table(data).row_count == 2


def test_report_on_a_partial_run_still_plots(tmp_path):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path / "run", rounds=0, with_eval=False)
    r = invoke("report", run)
    assert r.exit_code == 0, r.output
    assert (run / "report.png").is_file()


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "is not a selfie-lite run folder"),
])
def test_report_bad_folder_is_exit_2(tmp_path, make, message):
    r = invoke("report", make(tmp_path))
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
