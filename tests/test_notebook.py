"""Item 17: examples/colab_quickstart.ipynb runs top to bottom on a CPU (its no-GPU path: the tiny preset, one small
round), executed by nbclient in a real Jupyter kernel, so that the notebook cannot rot. Its install cell is skipped
(SELFIE_LITE_SKIP_INSTALL=1): the selfie-lite under test is the one the kernel imports.
"""

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "colab_quickstart.ipynb"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.cpu_agnostic
def test_the_colab_notebook_runs_on_a_cpu(tiny_preset, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    monkeypatch.setenv("SELFIE_LITE_SKIP_INSTALL", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # its no-GPU path, even on a GPU machine
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))  # `!selfie-lite`
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails

    out = [_text(c) for c in nb.cells if c.cell_type == "code"]
    everything = "\n".join(out)
    assert "no GPU: this notebook runs the built-in tiny preset" in out[0]
    assert "SELFIE_LITE_SKIP_INSTALL=1" in out[1] and "selfie-lite " in out[1]  # --version ran
    run_dir = tmp_path / "runs" / "tiny-demo"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_round"] == 1 and Path(summary["final_model"]).is_dir()
    assert "labelled seed: 24 pairs" in everything  # the run cell's output, logged line by line
    assert "reusing the data split; round-0 (train, merge)" in everything  # the --resume cell
    assert f"final model: {summary['final_model']}" in everything
    ev = json.loads((run_dir / "eval.json").read_text())  # the api.evaluate cell
    assert ev["settings"]["scorer"] == "oracle" and ev["settings"]["prompts"] == 60
    assert f"round-1: win rate {ev['models']['round-1']['win_rate']:.3f}" in everything
    assert everything.count("PROMPT:") == 3 and "--- SPA:" in everything  # before/after on the test prompts
    assert "skipped: needs a GPU" in out[-1]
    assert "Traceback" not in everything
