"""Offline, stable output, and one tiny-preset build shared by the whole session.

The build lands in $SELFIE_LITE_CACHE when set (CI points it at a folder that survives between runs of the same
machine); otherwise in a session temp folder. Subprocess CLI tests inherit the variable and find the same build.
"""

import os
import sys
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


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    if not os.environ.get("SELFIE_LITE_CACHE"):
        os.environ["SELFIE_LITE_CACHE"] = str(tmp_path_factory.mktemp("selfie-cache"))
    return os.environ["SELFIE_LITE_CACHE"]


@pytest.fixture(scope="session")
def tiny_build(tiny_cache):
    """(preset, progress stages seen): the stages are empty when the cache held a build already."""
    from selfie_lite.tiny.build import build_tiny

    stages: list[tuple[str, float]] = []
    return build_tiny(progress=lambda stage, frac: stages.append((stage, frac))), stages


@pytest.fixture(scope="session")
def tiny_preset(tiny_build):
    return tiny_build[0]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run folders (runs/<timestamp>) land in the test's temp folder
