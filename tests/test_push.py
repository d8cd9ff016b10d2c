"""`selfie-lite push`, without a network: a stand-in for the Hub client records the repo, the
private flag and every file of the one commit; refusals (Hub off, no token, bad repo id) come before any request."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error, invoke
from rich.console import Console

from selfie_lite import card, publish
from selfie_lite.config import load_config, to_dict
from selfie_lite.inputs import Inputs
from selfie_lite.loop import run_rounds
from selfie_lite.testing import FakeBackend, build_toy_model, toy_preferences


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records what push asks of it."""

    def __init__(self):
        self.calls = []
        self.files: dict[str, bytes] = {}

    def create_repo(self, repo_id, *, private=None, repo_type=None, exist_ok=False, **kw):
        self.calls.append(("create_repo", repo_id, private, repo_type, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, *, commit_message, repo_type=None, **kw):
        self.calls.append(("create_commit", repo_id, commit_message))
        for op in operations:
            src = op.path_or_fileobj
            self.files[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, str) else bytes(src)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished 1-round run of the toy model (FakeBackend): round 1 ships, with its card."""
    root = tmp_path_factory.mktemp("toy")
    model, data = build_toy_model(root / "sft"), toy_preferences(root / "prefs.jsonl", n=120)
    cfg = load_config(None, None, [{"model": str(model), "rounds": 1,
                                    "data": {"source": str(data), "labelled_share": "16", "pool_sizes": [8],
                                             "test_size": 8},
                                    "sample": {"max_new_tokens": 4, "chunk_size": 8},
                                    "train": {"batch_size": 4, "grad_accum": 1, "max_length": 48,
                                              "max_prompt_length": 24, "gradient_checkpointing": False,
                                              "seed_epochs": 1}, "lora": {"r": 2, "alpha": 4}}])
    out = root / "run"
    run_rounds(cfg, out, FakeBackend(cfg), Inputs(model, str(data), None, False), Console(quiet=True))
    (out / "config.json").write_text(json.dumps(to_dict(cfg)))  # what api.execute writes first
    return out


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The Hub on, a token, and the recording client in place of HfApi."""
    recorder = RecordingHub()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(publish, "hub_client", lambda token: recorder if token == "hf_test_token" else None)
    return recorder


@pytest.mark.cpu_agnostic
def test_push_uploads_the_shipped_model_and_its_card_in_one_commit(toy_run, hub):
    r = invoke("push", toy_run, "--repo", "alice/toy-spa", "--private", "--json")
    assert r.exit_code == 0, r.output
    assert hub.calls == [("create_repo", "alice/toy-spa", True, "model", True),
                         ("create_commit", "alice/toy-spa", "selfie-lite push: round 1 of run run")]
    model = toy_run / "round-1" / "model"
    local = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())
    assert sorted(hub.files) == local and "README.md" in local and "model.safetensors" in local
    assert hub.files["model.safetensors"] == (model / "model.safetensors").read_bytes()
    meta = yaml.safe_load(hub.files["README.md"].decode().split("---\n")[1])
    assert meta["library_name"] == "transformers" and "spa" in meta["tags"] and "gguf" not in meta["tags"]
    assert json.loads(r.stdout)["files"] == local


@pytest.mark.cpu_agnostic
def test_push_gguf_adds_the_file_a_modelfile_and_the_tag(toy_run, hub, monkeypatch):
    """The conversion itself is tested in test_export.py; here a stand-in writes the file so that the plan is seen."""
    from selfie_lite import export

    made = []

    def fake_export(plan, progress=None):
        made.append((plan.model_dir, plan.outtype))
        plan.out.write_bytes(b"GGUF fake")
        plan.modelfile.write_text(export.ollama_modelfile(plan.model_dir, plan.out))
        return {"gguf": str(plan.out)}

    monkeypatch.setattr(export, "converter_available", lambda: True)
    monkeypatch.setattr(export, "run_export", fake_export)
    r = invoke("push", toy_run, "--repo", "alice/toy-spa", "--gguf", "--outtype", "q8_0")
    assert r.exit_code == 0, r.output
    assert made == [(toy_run / "round-1" / "model", "q8_0")]
    assert hub.calls[0] == ("create_repo", "alice/toy-spa", False, "model", True)
    assert hub.files["toy-spa-q8_0.gguf"] == b"GGUF fake"
    assert "FROM ./toy-spa-q8_0.gguf" in hub.files["Modelfile"].decode()
    readme = hub.files["README.md"].decode()
    assert "- gguf" in readme.split("---\n")[1] and "`toy-spa-q8_0.gguf`" in readme
    assert "gguf" not in (toy_run / "round-1" / "model" / "README.md").read_text()  # the local card is unchanged


@pytest.mark.cpu_agnostic
@pytest.mark.parametrize("env, args, message", [
    ({"HF_HUB_OFFLINE": "1"}, [], "error: push needs the Hugging Face Hub, which is switched off here (HF_HUB_OFFLINE=1)"),
    ({"HF_TOKEN": None}, [], "error: push needs a Hugging Face token with write access, and none was found"),
    ({}, ["--repo", "toy-spa"], "error: --repo toy-spa: expected USER/NAME"),
    ({}, ["--repo", "alice/toy spa"], "error: --repo alice/toy spa: "),
    ({}, ["--gguf", "--outtype", "q4"], "error: --outtype must be one of f16, bf16, q8_0, got 'q4'"),
])
def test_push_refuses_before_any_request(toy_run, hub, monkeypatch, tmp_path, env, args, message):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))  # no `hf auth login`
    for k, v in env.items():
        monkeypatch.delenv(k) if v is None else monkeypatch.setenv(k, v)
    card_before = (toy_run / "round-1" / "model" / "README.md").stat().st_mtime_ns
    r = invoke("push", toy_run, *(args if "--repo" in args else ["--repo", "alice/toy-spa", *args]))
    assert_one_line_error(r, 2, message)
    assert hub.calls == [] and (toy_run / "round-1" / "model" / "README.md").stat().st_mtime_ns == card_before


@pytest.mark.cpu_agnostic
def test_a_failed_upload_is_one_line(toy_run, hub, monkeypatch):
    def refuse(*a, **k):
        raise OSError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\nmore")

    monkeypatch.setattr(hub, "create_repo", refuse)
    r = invoke("push", toy_run, "--repo", "alice/toy-spa")
    assert_one_line_error(r, 1, "error: uploading to alice/toy-spa failed: OSError: 401 Client Error: Unauthorized")
    assert "more" not in r.output


@pytest.mark.cpu_agnostic
def test_push_a_run_without_a_shipped_model(tmp_path, hub):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    r = invoke("push", run, "--repo", "alice/x")
    assert_one_line_error(r, 2, f"error: {run} has not shipped a model yet (no summary.json")
    assert hub.calls == [] and card.write_card(run) is None
