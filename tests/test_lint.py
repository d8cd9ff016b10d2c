"""Every module imports, and ruff finds nothing (the linter is part of the dev extra)."""

import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import selfie_lite

ROOT = Path(__file__).resolve().parent.parent


def test_every_module_imports():
    optional = {"selfie_lite.backends.unsloth", "selfie_lite.sampler_vllm"}  # need the gpu extra to do anything
    for m in pkgutil.walk_packages(selfie_lite.__path__, "selfie_lite."):
        if m.name in optional or m.name == "selfie_lite.__main__":
            continue
        importlib.import_module(m.name)


def test_help_does_not_import_torch():
    code = "import sys; from selfie_lite.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is in the dev extra")
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    r = subprocess.run([ruff, "check", "selfie_lite", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
