"""`selfie-lite report`: the per-round table and the PNG, from a run folder written here by hand."""


import pytest
from conftest import invoke, make_run

from selfie_lite.report import collect, report_table


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
