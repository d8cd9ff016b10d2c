"""Bad input and settings refused cleanly BEFORE any file is written: exit 2, one
`error:` line naming the key or file (and a `hint:`), no run folder and no data/ split. Driven through the CLI as a
user would, on a toy model folder (selfie_lite.testing, built in a second) rather than the tiny preset, except
where the preset's own data is the point.

The run tests replace loop.run_rounds with a stub that only splits the data: every check here happens before
training, and a test that expects a run to start (the defaults still pass) needs no more than the split.
"""

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
from conftest import invoke


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """A toy model folder and a 200-row preference set, built once per module; tests that break them copy them."""
    from selfie_lite.testing import build_toy_model, toy_preferences

    root = tmp_path_factory.mktemp("toy")
    build_toy_model(root / "sft")
    toy_preferences(root / "prefs.jsonl", n=200)
    return root


@pytest.fixture
def toy(toy_dir, tmp_path):
    """Copies of the toy model and data in this test's folder: (model folder, data file)."""
    shutil.copytree(toy_dir / "sft", tmp_path / "sft")
    shutil.copy(toy_dir / "prefs.jsonl", tmp_path / "prefs.jsonl")
    return tmp_path / "sft", tmp_path / "prefs.jsonl"


def small(model, data):
    """A one-round run on the toy set: 24 seed pairs, a 24-prompt pool, a 50-pair test split, into ./run."""
    return ["--model", model, "--data", data, "--seed", "24", "--rounds", "1", "--set", "data.pool_sizes=[24]",
            "--set", "data.test_size=50", "--out", "run"]


@pytest.fixture
def stub_rounds(monkeypatch):
    """run_rounds that only writes the data split, as the real one does first; nothing trains."""
    from selfie_lite import inputs as inputs_mod
    from selfie_lite import loop

    def fake(cfg, run_dir, backend, inputs, console, progress=None, split=None):
        inputs_mod.prepare_data(cfg, run_dir, inputs, split)
        return {"final_model": str(run_dir / "round-0" / "model")}

    monkeypatch.setattr(loop, "run_rounds", fake)


def refused(r, *fragments):
    """Exit 2, one `error:` line holding every fragment (plus at most a `hint:` line), nothing else said after it,
    no traceback and no Typer box; and nothing written: no run folder (./run or runs/) in the test's folder."""
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith("error: ")), None)
    assert start is not None, r.output
    tail = lines[start:]
    assert len(tail) == 1 or (len(tail) == 2 and tail[1].startswith("hint: ")), r.output
    for f in fragments:
        assert f in tail[0], (f, r.output)
    assert "Traceback" not in r.output and "╭" not in r.output
    assert not Path("run").exists() and not Path("runs").exists()
    return tail


def started(r):
    """The run passed every check: exit 0 and the data split written."""
    assert r.exit_code == 0, r.output
    assert (Path("run") / "data" / "split.json").is_file()


# -- (a) a section given as a value is named, whatever layer lays a table on top of it ---------------------------

SECTION_TABLES = {  # a flag (or --set) that lays a table of the section on top of `--set SECTION=5`
    "data": ["--seed", "24"],
    "sample": ["--sampler", "generate"],
    "judge": ["--set", "judge.batch_size=4"],
    "train": ["--set", "train.batch_size=4"],
    "refine": ["--set", "refine.alpha=0.1"],
    "lora": ["--set", "lora.r=8"],
    "robust": ["--set", "robust.lr_decay=1.0"],
    "guard": ["--select-by", "guard"],
}


@pytest.mark.parametrize("section", sorted(SECTION_TABLES))
def test_a_section_set_to_a_value_is_refused_even_under_a_later_table(section, toy):
    model, data = toy
    r = invoke("run", "--model", model, "--data", data, "--set", f"{section}=5", *SECTION_TABLES[section])
    refused(r, f"config key {section} must be a table of settings")


def test_a_section_as_a_value_in_a_config_file_or_a_preset_is_refused(toy, tmp_path, monkeypatch):
    from selfie_lite import config

    model, data = toy
    (tmp_path / "bad.toml").write_text("data = 5\n")
    refused(invoke("run", "--model", model, "--data", data, "--config", tmp_path / "bad.toml", "--seed", "24"),
            "config key data must be a table of settings")
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "broken.toml").write_text("train = 5\n")
    monkeypatch.setattr(config, "PACKAGED_PRESETS", presets)
    refused(invoke("run", "--preset", "broken", "--model", model, "--data", data, "--set", "train.batch_size=4"),
            "config key train must be a table of settings")


# -- (c) a python scorer that exits, returns a bool, NaN or inf ----------------------------------------------------


def write_scorer(path: Path, body: str) -> str:
    path.write_text("import math\nimport sys\n\n\ndef score(prompt, response):\n" + body + "\n")
    return f"python:{path}:score"


def test_a_scorer_that_calls_sys_exit_0_fails_eval_naming_the_scorer(toy, tmp_path):
    model, _ = toy
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "why is the cat on the mat"}\n{"prompt": "how big"}\n')
    spec = write_scorer(tmp_path / "quits.py", "    sys.exit(0)")
    r = invoke("eval", model, "--baseline", model, "--prompts", tmp_path / "prompts.jsonl", "--scorer", spec,
               "--max-new-tokens", "3", "--out", tmp_path / "ev")
    refused(r, f"the python scorer {tmp_path / 'quits.py'}:score on prompt 1 ('why is the cat on the mat') "
               "called sys.exit(0) instead of returning a score")
    assert not (tmp_path / "ev" / "eval.json").exists()


@pytest.mark.parametrize("body,fragment", [
    ("    sys.exit(3)", "called sys.exit(3) instead of returning a score"),
    ("    raise SystemExit", "called sys.exit() instead of returning a score"),
    ("    return True", "returned True, a bool; a scorer returns a number"),
    ("    return len(prompt) > 3", "returned True, a bool; a scorer returns a number"),
    ("    return math.nan", "returned nan; a scorer returns a finite number"),
    ("    return -math.inf", "returned -inf; a scorer returns a finite number"),
])
def test_a_scorer_must_return_a_finite_number_not_exit(body, fragment, tmp_path):
    from selfie_lite.errors import UserError
    from selfie_lite.scorers import parse_scorer

    scorer = parse_scorer(write_scorer(tmp_path / "s.py", body))
    with pytest.raises(UserError) as e:
        scorer.score(["fine prompt", "second prompt"], ["a", "b"])
    assert str(e.value).startswith(f"the python scorer {tmp_path / 's.py'}:score on prompt 1 ('fine prompt') {fragment}")
    # Numbers of any real kind still score (an int, a numpy float), and a Ctrl-C stays a Ctrl-C (exit 130).
    assert parse_scorer(write_scorer(tmp_path / "n.py", "    return 2")).score(["p"], ["r"]) == [2.0]
    (tmp_path / "np_s.py").write_text("import numpy\n\n\ndef score(p, r):\n    return numpy.float32(0.5)\n")
    assert parse_scorer(f"python:{tmp_path / 'np_s.py'}:score").score(["p"], ["r"]) == [0.5]
    with pytest.raises(KeyboardInterrupt):
        parse_scorer(write_scorer(tmp_path / "k.py", "    raise KeyboardInterrupt")).score(["p"], ["r"])


def test_a_scorer_module_that_exits_on_import_is_refused_before_the_run(toy, tmp_path):
    model, data = toy
    (tmp_path / "bye.py").write_text("import sys\nsys.exit(0)\n")
    refused(invoke("run", *small(model, data), "--select-by", f"python:{tmp_path / 'bye.py'}:score"),
            f"--select-by python:{tmp_path / 'bye.py'}:...: importing it called sys.exit(0)")


# -- (d) settings the chosen method ignores -------------------------------------------------------------------------


@pytest.mark.parametrize("flags,fragment", [
    (["--set", "method=paper", "--set", "guard.min_anchor_agreement=0.5"],
     "guard.min_anchor_agreement = 0.5 would be ignored: method = paper ships the last round, with no round guard"),
    (["--set", "method=paper", "--set", "guard.from_round=4"], "guard.from_round = 4 would be ignored: method = paper"),
    (["--set", "method=paper", "--set", "guard.probe_prompts=20"],
     "guard.probe_prompts = 20 would be ignored: method = paper answers no probe prompts"),
    (["--select-by", "last", "--set", "guard.from_round=5"],
     "guard.from_round = 5 would be ignored: guard.select = last ships the last round, with no round guard"),
    (["--select-by", "last", "--set", "guard.min_anchor_agreement=0.5"],
     "guard.min_anchor_agreement = 0.5 would be ignored: guard.select = last"),
    (["--set", "guard.probe_prompts=20"],
     "guard.probe_prompts = 20 would be ignored: guard.select = guard answers no probe prompts"),
    (["--select-by", "python:checks.py:score", "--set", "guard.from_round=4"],
     "guard.from_round = 4 would be ignored: guard.select = python:checks.py:score picks the round with that scorer"),
    (["--set", "data.split=validation"],
     "data.split = \"validation\" would be ignored: {data} is one file with no splits"),
])
def test_a_setting_the_method_ignores_is_refused(flags, fragment, toy):
    model, data = toy
    refused(invoke("run", *small(model, data), *flags), fragment.format(data=data))


def test_an_ignored_setting_in_a_config_file_is_refused_too(toy, tmp_path):
    model, data = toy
    (tmp_path / "paper.toml").write_text('method = "paper"\n\n[guard]\nfrom_round = 4\n')
    refused(invoke("run", *small(model, data), "--config", tmp_path / "paper.toml"),
            "guard.from_round = 4 would be ignored: method = paper")


@pytest.mark.parametrize("flags", [
    ["--set", "method=paper"],
    ["--select-by", "last"],
    ["--select-by", "last", "--set", "guard.min_anchor_agreement=0.93", "--set", "guard.from_round=3"],  # defaults
    ["--set", "method=paper", "--set", "robust.gold_replay=0.0"],  # the paper's own value: consistent, not ignored
    ["--set", "data.split=train"],  # the default
    ["--set", "guard.min_anchor_agreement=0.5", "--set", "guard.from_round=2"],  # the guard uses both
])
def test_defaults_and_settings_the_method_uses_still_pass(flags, toy, stub_rounds):
    model, data = toy
    started(invoke("run", *small(model, data), *flags))


def test_probe_prompts_with_a_scorer_selection_pass(toy, stub_rounds, tmp_path):
    model, data = toy
    spec = write_scorer(tmp_path / "s.py", "    return len(response)")
    started(invoke("run", *small(model, data), "--select-by", spec, "--set", "guard.probe_prompts=5"))


def test_only_what_the_user_wrote_counts_not_a_preset_or_a_resumed_run(tmp_path, monkeypatch):
    """A preset's guard settings (written for the default method) and a resumed run's saved settings are not the
    user's explicit choice: `--select-by last` over them passes."""
    from selfie_lite import config

    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "guarded.toml").write_text('[guard]\nfrom_round = 4\nmin_anchor_agreement = 0.8\n\n[data]\nsplit = "x"\n')
    monkeypatch.setattr(config, "PACKAGED_PRESETS", presets)
    cfg = config.load_config("guarded", None, [{"guard": {"select": "last"}}])
    assert cfg.guard.select == "last" and cfg.guard.from_round == 4
    saved = config.to_dict(config.RunConfig(guard=config.GuardConfig(from_round=5)))
    assert config.load_config(None, None, [{"guard": {"select": "last"}}], base=saved).guard.from_round == 5


# -- (e) non-finite numbers and a learning rate that cannot train ---------------------------------------------------


def float_settings():
    """Every float (or list-of-float) setting in the range table, dotted."""
    import typing

    from selfie_lite.config import RunConfig
    from selfie_lite.validate import RANGES

    out = []
    for key in RANGES:
        cls, parts = RunConfig, key.split(".")
        for p in parts[:-1]:
            cls = typing.get_type_hints(cls)[p]
        tp = typing.get_type_hints(cls)[parts[-1]]
        if tp is float or tp == list[float]:
            out.append((key, tp is not float))
    return out


@pytest.mark.parametrize("key,is_list", float_settings())
def test_every_float_setting_refuses_infinity(key, is_list):
    from selfie_lite.config import load_config, parse_override
    from selfie_lite.errors import UserError

    for raw in ("inf", "-inf"):
        value = f"[{raw}, {raw}, {raw}]" if is_list else raw
        with pytest.raises(UserError) as e:
            load_config(None, None, [parse_override(f"{key}={value}")])
        assert str(e.value) == f"{key}{'[0]' if is_list else ''} must be a finite number, got {float(raw)}"


def test_infinity_and_a_huge_learning_rate_are_refused_through_the_cli(toy, tmp_path):
    model, data = toy
    refused(invoke("run", *small(model, data), "--set", "beta=inf"), "beta must be a finite number, got inf")
    refused(invoke("run", *small(model, data), "--set", "train.learning_rate=inf"),
            "train.learning_rate must be a finite number, got inf")
    refused(invoke("run", *small(model, data), "--set", "train.learning_rate=1e30"),
            "train.learning_rate must be in (0, 1] (LoRA DPO uses about 1e-6 to 1e-3), got 1e+30")
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "why", "responses": ["yes good", "no bad"]}) + "\n")
    r = invoke("judge", tmp_path / "in.jsonl", "--policy", model, "--reference", model, "--beta", "inf",
               "-o", tmp_path / "pairs.jsonl")
    refused(r, "--beta must be a finite number, got inf")
    assert not (tmp_path / "pairs.jsonl").exists()
    refused(invoke("eval", model, "--baseline", model, "--temperature", "inf", "--out", tmp_path / "ev"),
            "--temperature must be a finite number, got inf")
    assert not (tmp_path / "ev").exists()


def test_a_learning_rate_of_one_is_still_allowed():
    from selfie_lite.config import load_config

    assert load_config(None, None, [{"train": {"learning_rate": 1}}]).train.learning_rate == 1.0


# -- an invalid --select-by scorer, found in the preflight ---------------------------------------------------------


@pytest.mark.parametrize("spec,flags,fragment", [
    ("python:/nonexistent.py:score", [], "--select-by python:/nonexistent.py:...: scorer file /nonexistent.py does not exist"),
    ("reward-model:/nonexistent", [], "reward model folder /nonexistent does not exist"),
    ("python:{scorer}", ["--set", "data.test_size=0"], "needs held-out prompts to probe the rounds with, but "
                                                       "data.test_size = 0 leaves none"),
    ("oracle", [], "the oracle scores only the tiny preset's prompts"),  # the toy set's prompts are not the preset's
    ("python:{folder}:score", [], "is a folder, expected a .py file"),
])
def test_a_bad_select_by_scorer_is_refused_before_anything_is_written(spec, flags, fragment, toy, tmp_path):
    model, data = toy
    (tmp_path / "s.py").write_text("def score(prompt, response):\n    return 1.0\n")
    (tmp_path / "adir").mkdir()
    spec = spec.format(scorer=f"{tmp_path / 's.py'}:score", folder=f"{tmp_path / 'adir'}/")
    refused(invoke("run", *small(model, data), "--select-by", spec, *flags), fragment)


# -- model folder problems, found without loading the weights ------------------------------------------------------


def _rewrite_tensors(path: Path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["truncated", "header", "config_json", "no_tokenizer", "tokenizer_json",
                                  "tokenizer_broken", "template", "nan", "is_a_file", "missing_shard"])
def test_a_broken_model_folder_is_refused_before_data_is_written(case, toy, tmp_path):
    model, data = toy
    weights = model / "model.safetensors"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        fragment = f"{weights} is truncated: "
    elif case == "header":
        raw = bytearray(weights.read_bytes())
        raw[8:16] = b"\xff" * 8  # the JSON header's first bytes
        weights.write_bytes(bytes(raw))
        fragment = f"{weights} is damaged: its safetensors header is not valid"
    elif case == "config_json":
        (model / "config.json").write_text('{"model_type": "llama",')
        fragment = f"{model / 'config.json'} is not valid JSON"
    elif case == "no_tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (model / f).unlink()
        fragment = f"{model} has no tokenizer files"
    elif case == "tokenizer_json":
        (model / "tokenizer.json").write_text((model / "tokenizer.json").read_text()[:200])
        fragment = f"{model / 'tokenizer.json'} is not valid JSON"
    elif case == "tokenizer_broken":
        (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
        fragment = f"could not load the tokenizer in {model}: "
    elif case == "template":
        (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}")  # no endfor
        fragment = f"the chat template of {model} does not work: TemplateSyntaxError"
    elif case == "nan":
        _rewrite_tensors(weights, lambda t: t["model.layers.0.mlp.down_proj.weight"].view(-1)[5:7].fill_(math.nan))
        fragment = f"{weights}: tensor model.layers.0.mlp.down_proj.weight holds NaN or infinite values"
    elif case == "is_a_file":
        model = tmp_path / "model.txt"
        model.write_text("not a folder")
        fragment = f"model folder {model} is a file, expected a model folder"
    else:  # a shard index that names a shard that is not there
        (model / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"lm_head.weight": "model.safetensors", "x.weight": "model-00002-of-00002.safetensors"}}))
        fragment = f"{model} is missing the weight shard model-00002-of-00002.safetensors"
    refused(invoke("run", *small(model, data)), fragment)


def test_a_broken_chat_template_file_is_named(toy, tmp_path):
    model, data = toy
    (tmp_path / "t.jinja").write_text("{% if messages %}{{ messages[0]['content'] }")
    refused(invoke("run", *small(model, data), "--chat-template", tmp_path / "t.jinja"),
            f"the chat template --chat-template {tmp_path / 't.jinja'} does not work: TemplateSyntaxError")
    (tmp_path / "latin1.jinja").write_bytes("{{ 'caf\xe9' }}".encode("latin-1"))
    refused(invoke("run", *small(model, data), "--chat-template", tmp_path / "latin1.jinja"),
            f"--chat-template {tmp_path / 'latin1.jinja'} is not UTF-8 text")


def test_nan_in_a_big_file_is_found_by_sampling_each_tensor(toy, monkeypatch):
    """Over FULL_CHECK_BYTES only the first and last SAMPLE_BYTES of every tensor are read: a tensor whose start is
    NaN (a diverged fine-tune leaves whole tensors NaN) is found; bf16 too, by its exponent bits."""
    import torch

    from selfie_lite import model_files as hf

    model, _ = toy
    monkeypatch.setattr(hf, "FULL_CHECK_BYTES", 0)
    monkeypatch.setattr(hf, "SAMPLE_BYTES", 64)
    assert hf.nonfinite_weights(model) is None
    weights = model / "model.safetensors"

    def poison(t):
        for k in t:
            t[k] = t[k].to(torch.bfloat16)
        t["model.embed_tokens.weight"][0, 0] = math.inf

    _rewrite_tensors(weights, poison)
    assert hf.nonfinite_weights(model) == (weights, "model.embed_tokens.weight")
    # A NaN in the middle of a big tensor is past the sample: the documented limit of the cheap check.
    _rewrite_tensors(weights, lambda t: t["model.embed_tokens.weight"].fill_(0.0).view(-1).__setitem__(500, math.nan))
    assert hf.nonfinite_weights(model) is None
    monkeypatch.setattr(hf, "FULL_CHECK_BYTES", 2**30)
    assert hf.nonfinite_weights(model) == (weights, "model.embed_tokens.weight")


def test_safetensors_headers_read_only_the_header(toy):
    """The header check reads 8 bytes and the JSON header, and agrees with the safetensors library."""
    from safetensors import safe_open

    from selfie_lite.model_files import safetensors_headers

    model, _ = toy
    weights = model / "model.safetensors"
    headers = safetensors_headers(model)[weights]
    with safe_open(str(weights), framework="pt") as f:
        assert sorted(headers) == sorted(f.keys())
        for k in f.keys():
            assert list(f.get_slice(k).get_shape()) == headers[k]["shape"]
    n = struct.unpack("<Q", weights.read_bytes()[:8])[0]
    assert 8 + n + max(v["data_offsets"][1] for v in headers.values()) == weights.stat().st_size


@pytest.mark.parametrize("targets,fragment", [
    ('["nope"]', "none of the LoRA targets ['nope'] exist in the model in {model}"),
    ('["q_proj", "nope"]', "lora.target_modules names nope, which the model in {model} does not have"),
])
def test_lora_targets_are_checked_from_the_tensor_names(targets, fragment, toy):
    model, data = toy
    tail = refused(invoke("run", *small(model, data), "--set", f"lora.target_modules={targets}"),
                   fragment.format(model=model))
    assert "q_proj" in tail[1] and "down_proj" in tail[1]  # the hint lists the model's own projections


def test_lora_targets_of_the_users_choosing_that_exist_pass(toy, stub_rounds):
    model, data = toy
    started(invoke("run", *small(model, data), "--set", 'lora.target_modules=["q_proj", "v_proj"]'))


def test_settings_this_machine_or_the_trainer_cannot_run(toy, tmp_path):
    import torch

    model, data = toy
    if not torch.cuda.is_available():
        refused(invoke("run", *small(model, data), "--set", "train.precision=fp16"),
                "train.precision = fp16 needs a CUDA GPU, and this machine has none")
    tail = refused(invoke("run", *small(model, data), "--set", "train.lr_scheduler=bogus"),
                   "train.lr_scheduler must be one of linear, cosine, ", "got 'bogus'")
    from transformers.trainer_utils import SchedulerType

    assert all(s.value in tail[0] for s in SchedulerType)


def test_a_config_file_that_is_not_utf8_or_is_a_folder(toy, tmp_path):
    model, data = toy
    (tmp_path / "latin1.toml").write_bytes('# caf\xe9\nrounds = 1\n'.encode("latin-1"))
    refused(invoke("run", *small(model, data), "--config", tmp_path / "latin1.toml"),
            f"config file {tmp_path / 'latin1.toml'} is not UTF-8 text (byte 0xe9 at offset 5)")
    (tmp_path / "conf.toml").mkdir()
    refused(invoke("run", *small(model, data), "--config", tmp_path / "conf.toml"),
            f"config file {tmp_path / 'conf.toml'} is a folder, expected a .toml file")


def test_a_valid_toy_model_passes_every_model_check(toy, stub_rounds):
    """The checks above on a good folder: nothing refused, the run starts (and a BOM'd TOML file reads)."""
    model, data = toy
    Path("ok.toml").write_bytes("\ufeffrounds = 1\n".encode())
    started(invoke("run", *small(model, data), "--config", "ok.toml"))


# -- smaller: usage errors, paths of the wrong kind, rows ---------------------------------------------------------


@pytest.mark.parametrize("args,fragment,command", [
    (["run", "--rounds", "abc"], "Invalid value for '--rounds'", "selfie-lite run"),
    (["run", "--report-to", "mlflow"], "'mlflow' is not one of 'none', 'tensorboard', 'wandb'", "selfie-lite run"),
    (["run", "--rouds", "2"], "No such option: --rouds", "selfie-lite run"),
    (["run", "--seed"], "Option '--seed' requires an argument.", "selfie-lite run"),  # an error with no context
    (["nonsense"], "No such command 'nonsense'", "selfie-lite"),
    (["tiny", "nonsense"], "No such command 'nonsense'", "selfie-lite tiny"),
    (["eval"], "Missing argument 'targets'", "selfie-lite eval"),
])
def test_usage_errors_are_one_line(args, fragment, command):
    r = invoke(*args)
    tail = refused(r, fragment)
    assert tail == [tail[0], f"hint: see {command} --help"]
    assert "Usage:" not in r.output


def test_a_bare_command_group_still_shows_its_help():
    r = invoke("tiny")
    assert "Usage:" in r.output and "build" in r.output and "error:" not in r.output


def test_paths_of_the_wrong_kind_say_what_they_are(toy, tmp_path):
    model, data = toy
    (tmp_path / "adir").mkdir()
    refused(invoke("run", "--model", model, "--data", tmp_path / "adir", "--out", "run"),
            f"{tmp_path / 'adir'} is a folder but not a saved dataset (no dataset_dict.json or state.json)")
    refused(invoke("run", *small(model, data), "--chat-template", tmp_path / "adir"),
            f"--chat-template {tmp_path / 'adir'} is a folder, expected a Jinja template file")
    refused(invoke("report", data), f"{data} is a file, expected a run folder")
    refused(invoke("run", *small(model, data), "--select-by", f"reward-model:{data}"),
            f"reward model folder {data} is a file, expected a model folder")


def _rows(data: Path) -> list[dict]:
    return [json.loads(line) for line in data.read_text().splitlines()]


def test_message_list_rows_whose_user_turn_is_not_the_prompt_are_invalid(toy):
    model, data = toy
    rows = _rows(data)
    for r in rows:  # UltraFeedback's shape: the prompt, and message lists that repeat it
        r["chosen"] = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]
        r["rejected"] = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]
    for r in rows[:10]:  # 10 of 200 (5%, over the 1% tolerated): the lists answer another question
        r["chosen"][0]["content"] = "a different question"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(invoke("run", *small(model, data)), "10 of 200 rows in", "row 0: the user turn in chosen differs from prompt")


def test_row_checks(tmp_path):
    from selfie_lite.data import normalize_row

    user = [{"role": "user", "content": "q"}]
    ok = {"prompt": "q", "chosen": [*user, {"role": "assistant", "content": "a"}],
          "rejected": [*user, {"role": "assistant", "content": "b"}]}
    assert normalize_row(ok) == {"prompt": "q", "chosen": "a", "rejected": "b"}
    assert normalize_row({**ok, "prompt": " q \n"})["prompt"] == " q \n"  # only spaces around it differ: the same
    assert normalize_row({**ok, "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}) \
        == "the user turn in rejected differs from prompt"
    no_prompt = {k: v for k, v in ok.items() if k != "prompt"}
    no_prompt["rejected"] = [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]
    assert normalize_row(no_prompt) == "the user turn in rejected differs from the one in chosen"
    plain = {"prompt": "q", "chosen": "a", "rejected": "b"}
    assert normalize_row({**plain, "score_chosen": math.nan}) == "score_chosen is nan, not a finite number"
    assert normalize_row({**plain, "score_rejected": math.inf}) == "score_rejected is inf, not a finite number"
    assert normalize_row({**plain, "score_chosen": 7, "score_rejected": 2.5})["score_chosen"] == 7.0


def test_nan_scores_in_a_file_are_invalid_rows(toy):
    """json reads NaN literals: such rows are counted bad with their reason, like any invalid row."""
    model, data = toy
    lines = data.read_text().splitlines()
    lines[:5] = [line[:-1] + ', "score_chosen": NaN}' for line in lines[:5]]
    data.write_text("\n".join(lines) + "\n")
    refused(invoke("run", *small(model, data)), "5 of 200 rows in", "row 0: score_chosen is nan, not a finite number")


def test_a_byte_order_mark_does_not_cost_the_first_row(toy):
    from selfie_lite.data import load_rows

    _, data = toy
    rows = load_rows(str(data))
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    assert load_rows(str(data)) == rows and len(rows) == 200
