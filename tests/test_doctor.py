"""`selfie-lite doctor`: the matrix logic with fake versions, the GPU/hub/disk checks with fake probes, and the command
end to end through CliRunner. Offline: the hub probe is faked everywhere except the loopback tests of probe_hub itself.
"""

from __future__ import annotations

import importlib.metadata
import socket
import sys
import threading
import time
import tomllib
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer
from packaging.requirements import Requirement as PackagingRequirement
from packaging.specifiers import SpecifierSet
from typer.testing import CliRunner

from selfie_lite import doctor, versions
from selfie_lite.doctor import FAIL, OK, WARN, Check, GpuInfo

Usage = namedtuple("Usage", "total used free")
GB = 10**9
H100 = GpuInfo(cuda_build="12.8", available=True, count=1, name="NVIDIA H100 80GB HBM3", total_bytes=85 * GB,
               free_bytes=84 * GB, bf16=True)
NO_GPU = GpuInfo(cuda_build=None, available=False)
REAL_PROBE = doctor.probe_hub  # the autouse fixture fakes doctor.probe_hub; the loopback tests use this
MATRIX = versions.supported_matrix().libraries  # this checkout's pyproject.toml
GOOD = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "trl": "1.16.0", "peft": "0.21.2", "datasets": "5.2.0",
        "accelerate": "1.15.0", "bitsandbytes": "0.50.2", "unsloth": None, "kernels": None}


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
              "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)

    def no_network(url, timeout_s=3.0):
        return True, "HTTP 200 (fake)"

    monkeypatch.setattr(doctor, "probe_hub", no_network)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def plenty(path):
    return Usage(500 * GB, 100 * GB, 400 * GB)


# -------------------------------------------------------------------------------------------------
# the matrix


@pytest.mark.parametrize("dist, version, status", [
    ("torch", "2.3.1", FAIL),
    ("torch", "2.4.0", OK),
    ("torch", "2.13.0+cpu", OK),          # local build tag ignored
    ("torch", None, FAIL),
    ("transformers", "4.57.1", FAIL),
    ("transformers", "5.0.0rc1", OK),     # a pre-release counts as its release
    ("transformers", "5.0.0", OK),
    ("transformers", "5.24.0", OK),
    ("transformers", "6.0.0", WARN),      # newer than tested: warn, don't fail
    ("trl", "1.14.9", FAIL),
    ("trl", "1.15.0", OK),
    ("trl", "1.99", OK),
    ("trl", "2.0", WARN),
    ("peft", "0.16.9", FAIL),
    ("peft", "0.17.0", OK),
    ("datasets", "4.6.9", FAIL),
    ("datasets", "4.7", OK),
    ("datasets", "5.2.0", OK),
    ("accelerate", "0.34.2", FAIL),
    ("accelerate", "1.0.0", OK),
    ("bitsandbytes", None, WARN),         # optional: never FAIL
    ("bitsandbytes", "0.44.1", WARN),
    ("bitsandbytes", "0.45.0", OK),
    ("peft", "not-a-version", WARN),
])
def test_version_against_matrix(dist, version, status):
    c = doctor.check_version(MATRIX[dist], version)
    assert (c.name, c.status) == (dist, status), c
    if status != OK:
        assert c.fix, "every WARN/FAIL carries a fix"
    if status == FAIL and version is not None:
        assert c.fix == f"pip install -U '{dist}{MATRIX[dist].spec}'"


def test_missing_optional_bitsandbytes_names_the_extra():
    c = doctor.check_version(MATRIX["bitsandbytes"], None)
    assert c.status == WARN and "not installed" in c.detail
    assert c.fix == "pip install 'selfie-lite[quant]'"


def test_missing_required_package_fails_with_install_line():
    c = doctor.check_version(MATRIX["transformers"], None)
    assert c.status == FAIL and c.detail == "not installed (need >=5.0,<6)"
    assert c.fix == "pip install -U 'transformers>=5.0,<6'"


@pytest.mark.parametrize("version, status", [((3, 10, 14), FAIL), ((3, 11, 0), OK), ((3, 13, 2), OK)])
def test_python(version, status):
    c = doctor.check_python(version)
    assert c.status == status and c.detail.startswith(".".join(map(str, version)))


@pytest.mark.parametrize("version, has_gpu, status", [
    ("1.15.0", False, WARN),
    ("1.15.3", False, WARN),
    ("1.15.0", True, OK),     # on a GPU box trl 1.15 is fine (and what Unsloth wants)
    ("1.16.0", False, OK),
    ("1.14.0", False, FAIL),  # too old wins over the CPU warning
])
def test_trl_115_without_gpu(version, has_gpu, status):
    c = doctor.check_trl(version, has_gpu)
    assert c.status == status
    if status == WARN:
        assert "Triton" in c.detail and c.fix == "pip install -U 'trl>=1.16,<2'"


# -------------------------------------------------------------------------------------------------
# where the ranges come from: selfie-lite's own requirements

# As importlib.metadata.requires lists them, with other ranges than pyproject.toml's.
FAKE_REQUIRES = ["torch>=2.4", "transformers<7,>=5.30", "trl<3,>=1.15", "peft>=0.17", "datasets>=4.7",
                 "accelerate>=1.0", "typer>=0.12", 'bitsandbytes>=0.60; extra == "quant"',
                 'bitsandbytes>=0.45; extra == "dev"']


def test_ranges_follow_the_requirements():
    matrix = versions.matrix_from_requirements(FAKE_REQUIRES, ">=3.12", "fake metadata")
    checks = by_name(doctor.run_checks(versions=GOOD, gpu=NO_GPU, disk_usage=plenty, matrix=matrix))
    c = checks["transformers"]
    assert (c.status, c.detail, c.fix) == (FAIL, "5.24.0: too old (need >=5.30,<7)",
                                           "pip install -U 'transformers>=5.30,<7'")
    # optional: its extra's line (quant), not dev's; too old WARNs
    assert (checks["bitsandbytes"].status, checks["bitsandbytes"].detail) == (WARN, "0.50.2: too old (need >=0.60)")
    assert checks["trl"].status == OK and checks["peft"].status == OK
    assert doctor.check_python((3, 11, 7), matrix).detail.startswith("3.11.7: need >= 3.12")
    assert doctor.check_python((3, 12, 0), matrix).status == OK
    # trl 1.15 without a GPU: the fix keeps the requirements' upper bound
    assert doctor.check_trl("1.15.0", False, matrix.libraries["trl"]).fix == "pip install -U 'trl>=1.16,<3'"


def test_newer_than_the_range_warns_and_other_exclusions_too():
    matrix = versions.matrix_from_requirements(["transformers>=5.0,<5.20", "peft>=0.17,!=0.21.2"], ">=3.11", "fake")
    c = doctor.check_version(matrix.libraries["transformers"], "5.24.0")
    assert (c.status, c.detail) == (WARN, "5.24.0: newer than the tested range >=5.0,<5.20")
    c = doctor.check_version(matrix.libraries["peft"], "0.21.2")
    assert (c.status, c.detail) == (WARN, "0.21.2: outside the tested range >=0.17,!=0.21.2")
    assert doctor.check_version(matrix.libraries["peft"], "0.21.3").status == OK


def test_markers_pick_the_lines_that_apply_here():
    matrix = versions.matrix_from_requirements(
        ["torch>=2.4", 'torch<3; python_version >= "3"', 'peft>=9; python_version < "3"', "peft>=0.17"], None, "fake")
    assert matrix.libraries["torch"].spec == ">=2.4,<3"  # both lines apply: their ranges combine
    assert matrix.libraries["peft"].spec == ">=0.17"  # the Python 2 line does not apply
    assert doctor.check_python((3, 9, 0), matrix).status == OK  # no Requires-Python: any Python


def test_a_library_the_requirements_do_not_name_warns():
    matrix = versions.matrix_from_requirements(["torch>=2.4"], ">=3.11", "fake metadata")
    c = doctor.check_version(matrix.libraries["peft"], "0.21.2")
    assert (c.status, c.detail, c.fix) == (WARN, "0.21.2: supported range unknown (fake metadata does not name peft)",
                                           versions.UNKNOWN_FIX)
    c = doctor.check_version(matrix.libraries["peft"], None)
    assert (c.status, c.detail) == (FAIL, "not installed")  # missing is missing, range or not


def test_the_ranges_are_this_checkouts_pyproject_toml():
    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    project = tomllib.loads(path.read_text())["project"]
    required = {r.name: r.specifier for r in map(PackagingRequirement, project["dependencies"])}
    quant = {r.name: r.specifier for r in map(PackagingRequirement, project["optional-dependencies"]["quant"])}
    matrix = versions.supported_matrix()
    assert matrix.source == str(path)
    assert {d: r.specifier for d, r in matrix.libraries.items()} == {
        **{d: required[d] for d in versions.CHECKED}, "bitsandbytes": quant["bitsandbytes"]}
    assert matrix.python == SpecifierSet(project["requires-python"])
    assert all(not r.unknown for r in matrix.libraries.values())


def test_pyproject_lines_read_like_metadata_lines():
    project = {"dependencies": ["trl>=1.15,<2"],
               "optional-dependencies": {"quant": ["bitsandbytes>=0.45"],
                                         "gpu": ['bitsandbytes>=0.46; sys_platform == "linux"']}}
    assert versions.pyproject_requires(project) == [
        "trl>=1.15,<2", 'bitsandbytes>=0.45; extra == "quant"',
        'bitsandbytes>=0.46; sys_platform == "linux" and extra == "gpu"']


def test_installed_metadata_without_a_source_tree(monkeypatch):
    try:
        dist = importlib.metadata.distribution("selfie-lite")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("selfie-lite is not installed")
    monkeypatch.setattr(versions, "source_tree_project", lambda: None)  # as in a wheel install
    matrix = versions.supported_matrix()
    assert matrix.source == f"the metadata of the installed selfie-lite {dist.version}"
    lines = list(map(PackagingRequirement, dist.requires))
    assert matrix.libraries["trl"].specifier == next(r.specifier for r in lines if r.name == "trl" and not r.marker)
    assert matrix.libraries["bitsandbytes"].specifier == next(
        r.specifier for r in lines if r.name == "bitsandbytes" and r.marker and r.marker.evaluate({"extra": "quant"}))
    assert matrix.python == SpecifierSet(dist.metadata["Requires-Python"])


def test_without_metadata_or_pyproject_every_range_is_unknown(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(versions, "source_tree_project", lambda: None)
    monkeypatch.setattr(versions.importlib.metadata, "distribution", not_installed)
    checks = by_name(doctor.run_checks(versions={**GOOD, "transformers": None}, gpu=NO_GPU, disk_usage=plenty))
    why = "supported range unknown (selfie-lite is not installed and its pyproject.toml is not beside the package)"
    for name in ("python", "torch", "trl", "peft", "datasets", "accelerate", "bitsandbytes"):
        assert checks[name].status == WARN and why in checks[name].detail, checks[name]
        assert checks[name].fix == versions.UNKNOWN_FIX
    assert (checks["transformers"].status, checks["transformers"].detail) == (FAIL, "not installed")


def test_source_tree_project_is_this_checkout():
    path, project = versions.source_tree_project()
    assert path == Path(doctor.__file__).resolve().parent.parent / "pyproject.toml"
    assert project["name"] == "selfie-lite"


# -------------------------------------------------------------------------------------------------
# unsloth and kernels


def test_unsloth_absent_is_ok():
    c = doctor.check_unsloth(None, GOOD, has_gpu=False)
    assert (c.status, c.detail) == (OK, "not installed (optional, GPU extra)")


def test_unsloth_caps_warn_with_the_cpu_stack():
    c = doctor.check_unsloth("2026.10.1", {"transformers": "5.24.0", "trl": "1.16.0", "datasets": "5.2.0"}, True)
    assert c.status == WARN
    assert "transformers 5.24.0" in c.detail and "trl 1.16.0" in c.detail and "datasets 5.2.0" in c.detail
    assert c.fix == "pip install 'transformers<5.18' 'trl<1.16' 'datasets<5', or run with --backend hf"


@pytest.mark.parametrize("versions, over", [
    ({"transformers": "5.17.2", "trl": "1.15.0", "datasets": "4.9.0"}, []),     # at every cap: fine
    ({"transformers": "5.18.0", "trl": "1.15.0", "datasets": "4.9.0"}, ["transformers"]),
    ({"transformers": "5.17.0", "trl": "1.16.0", "datasets": "4.9.0"}, ["trl"]),
    ({"transformers": "5.17.0", "trl": "1.15.0", "datasets": "5.0.0"}, ["datasets"]),
])
def test_unsloth_cap_boundaries(versions, over):
    c = doctor.check_unsloth("2026.10.1", versions, has_gpu=True)
    assert c.status == (WARN if over else OK), c
    for d in ("transformers", "trl", "datasets"):
        assert (f"{d} {versions[d]}" in c.detail) == (d in over)


def test_unsloth_installed_without_gpu_is_unused():
    c = doctor.check_unsloth("2026.10.1", {"transformers": "5.17.0", "trl": "1.15.0", "datasets": "4.9.0"}, False)
    assert c.status == OK and "unused without a CUDA GPU" in c.detail


class _NoUnsloth:
    """A meta-path finder that behaves like unsloth on a CPU box: importing it raises NotImplementedError."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "unsloth":
            raise NotImplementedError("Unsloth cannot find any torch accelerator")
        return None


def test_run_checks_never_imports_unsloth(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [_NoUnsloth(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    checks = by_name(doctor.run_checks(versions={**GOOD, "unsloth": "2026.10.1"}, gpu=NO_GPU, disk_usage=plenty))
    assert checks["unsloth"].status == WARN and "unused here" in checks["unsloth"].detail
    assert "unsloth" not in sys.modules


def test_installed_version_reads_metadata():
    assert versions.installed_version("torch").startswith("2.")
    assert versions.installed_version("no-such-dist-selfie-lite") is None


def test_kernels():
    assert doctor.check_kernels(None).status == OK
    c = doctor.check_kernels("0.9.0")
    assert c.status == WARN and "code from the hub" in c.detail and c.fix.startswith("pip uninstall kernels")


# -------------------------------------------------------------------------------------------------
# GPU


def test_cuda_absent_is_a_warning():
    c = doctor.check_cuda(NO_GPU)
    assert c.status == WARN and c.detail.startswith("no CUDA GPU: only the tiny preset is practical")
    assert "CPU build" in c.detail
    c = doctor.check_cuda(GpuInfo(cuda_build="12.8", available=False))
    assert c.status == WARN and "CUDA 12.8, no device visible" in c.detail


def test_cuda_present_shows_name_and_memory():
    c = doctor.check_cuda(H100)
    assert c.status == OK
    assert c.detail == "NVIDIA H100 80GB HBM3: 85.0 GB total, 84.0 GB free, CUDA 12.8"


def test_cuda_failures():
    assert doctor.check_cuda(GpuInfo(torch_imports=False, torch_error="OSError: libcudart.so.12")).status == FAIL
    assert doctor.check_cuda(GpuInfo(available=True, error="RuntimeError: driver too old")).status == FAIL


def test_bf16_line_only_with_cuda():
    on_gpu = by_name(doctor.run_checks(versions=GOOD, gpu=H100, disk_usage=plenty))
    assert on_gpu["bf16"].status == OK and on_gpu["cuda"].status == OK
    old_gpu = by_name(doctor.run_checks(versions=GOOD, gpu=GpuInfo(available=True, count=1, name="Tesla T4",
                                                                    total_bytes=16 * GB, free_bytes=15 * GB), disk_usage=plenty))
    assert old_gpu["bf16"].status == WARN and "fp16" in old_gpu["bf16"].fix
    assert "bf16" not in by_name(doctor.run_checks(versions=GOOD, gpu=NO_GPU, disk_usage=plenty))


def test_probe_gpu_on_this_cpu_machine():
    info = doctor.probe_gpu()
    assert info.torch_imports and not info.available


# -------------------------------------------------------------------------------------------------
# hub


def test_hub_reachable_with_fake_probe():
    seen = []
    c = doctor.check_hub(lambda url: (seen.append(url), (True, "HTTP 200"))[1], endpoint="https://hub.example")
    assert seen == ["https://hub.example"]
    assert (c.status, c.detail) == (OK, "https://hub.example reachable (HTTP 200)")


def test_hub_unreachable_is_a_warning():
    c = doctor.check_hub(lambda url: (False, "timed out"), endpoint="https://hub.example")
    assert c.status == WARN and "unreachable (timed out)" in c.detail and "local model folder still works" in c.detail
    assert "HF_ENDPOINT" in c.fix


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_hub_offline_by_setting_never_probes(monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)

    def must_not_run(url):
        raise AssertionError("probed the hub although HF_HUB_OFFLINE is set")

    c = doctor.check_hub(must_not_run)
    assert c.status == WARN and c.detail.startswith("offline by setting") and "HF_HUB_OFFLINE" in c.fix


def test_hub_default_endpoint_is_huggingface_hub_constant():
    from huggingface_hub import constants

    assert doctor.hub_endpoint() == constants.ENDPOINT


# The real probe, against servers on 127.0.0.1 (nothing leaves this machine).
class _Handler(BaseHTTPRequestHandler):
    code = 200

    def do_HEAD(self):
        self.send_response(self.code)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("code, reachable", [(200, True), (401, True), (503, False)])
def test_probe_hub_loopback(code, reachable):
    handler = type("H", (_Handler,), {"code": code})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        ok, what = REAL_PROBE(f"http://127.0.0.1:{server.server_port}/", timeout_s=2)
    finally:
        server.shutdown()
        server.server_close()
    assert (ok, what) == (reachable, f"HTTP {code}")


def test_probe_hub_connection_refused():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ok, what = REAL_PROBE(f"http://127.0.0.1:{port}/", timeout_s=2)
    assert not ok and "refused" in what.lower()


def test_probe_hub_silent_server_times_out():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)  # the kernel completes the handshake; nobody ever answers
    try:
        t0 = time.monotonic()
        ok, what = REAL_PROBE(f"http://127.0.0.1:{s.getsockname()[1]}/", timeout_s=0.3)
        assert not ok and time.monotonic() - t0 < 2
    finally:
        s.close()


def test_probe_hub_deadline_covers_a_stuck_lookup(monkeypatch):
    """urllib's timeout does not cover DNS: the thread deadline must."""
    release = threading.Event()
    monkeypatch.setattr(doctor.urllib.request, "urlopen", lambda *a, **k: release.wait(10))
    t0 = time.monotonic()
    try:
        ok, what = REAL_PROBE("https://hub.example", timeout_s=0.2)
    finally:
        release.set()
    assert (ok, what) == (False, "no answer in 0.2 s")
    assert time.monotonic() - t0 < 1.5


# -------------------------------------------------------------------------------------------------
# disk


@pytest.mark.parametrize("free, status", [
    (1.99 * GB, FAIL),
    (2 * GB, WARN),
    (19.99 * GB, WARN),
    (20 * GB, OK),
    (400 * GB, OK),
])
def test_disk_thresholds(tmp_path, free, status):
    seen = []

    def fake(path):
        seen.append(path)
        return Usage(500 * GB, 500 * GB - free, free)

    c = doctor.check_disk("disk: runs", tmp_path / "runs" / "new", "free some space", fake)
    assert seen == [tmp_path]  # the nearest folder that exists
    assert c.status == status
    assert c.detail.startswith(f"{free / GB:.1f} GB free at {tmp_path}")
    assert c.fix == ("" if status == OK else "free some space")
    if status != OK:
        assert "need >= 2 GB" in c.detail if status == FAIL else "~20 GB" in c.detail


def test_disk_unreadable_is_a_warning(tmp_path):
    def broken(path):
        raise PermissionError(13, "Permission denied")

    assert doctor.check_disk("disk: runs", tmp_path, "fix", broken).status == WARN


def test_run_checks_looks_at_out_and_hf_home(tmp_path, monkeypatch):
    seen = []

    def fake(path):
        seen.append(Path(path))
        return Usage(500 * GB, 100 * GB, 400 * GB)

    (tmp_path / "hf").mkdir()
    (tmp_path / "big").mkdir()
    checks = by_name(doctor.run_checks(tmp_path / "big" / "run1", versions=GOOD, gpu=NO_GPU, disk_usage=fake))
    assert seen == [tmp_path / "big", tmp_path / "hf"]
    assert checks["disk: runs"].status == OK and checks["disk: HF cache"].status == OK
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "big"))
    assert doctor.hf_cache_dir() == tmp_path / "big"


def test_default_runs_dir(tmp_path):
    assert doctor.default_runs_dir() == tmp_path  # cwd (the fixture chdirs) while ./runs is missing
    (tmp_path / "runs").mkdir()
    assert doctor.default_runs_dir() == Path("runs")


def test_run_checks_order_and_names():
    names = [c.name for c in doctor.run_checks(versions=GOOD, gpu=H100, disk_usage=plenty)]
    assert names == ["python", "torch", "cuda", "bf16", "transformers", "trl", "peft", "datasets", "accelerate",
                     "bitsandbytes", "unsloth", "kernels", "hub", "write: runs", "disk: runs", "disk: HF cache"]


# -------------------------------------------------------------------------------------------------
# the command, registered the way cli.py registers it


def make_app() -> typer.Typer:
    app = typer.Typer()
    app.command("doctor")(doctor.doctor_cmd)

    @app.callback()
    def main():  # a group, like the real CLI, so the command is invoked as `doctor`
        pass

    return app


def row(output: str, name: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith(f"│ {name} ")]
    assert len(lines) == 1, f"no single row for {name!r} in:\n{output}"
    return lines[0]


def test_cli_passes_on_this_machine():
    result = CliRunner().invoke(make_app(), ["doctor"])
    assert result.exit_code == 0, result.output
    for name in ("python", "torch", "cuda", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
                 "unsloth", "kernels", "hub", "disk: runs", "disk: HF cache"):
        row(result.output, name)
    assert "WARN" in row(result.output, "cuda") and "only the tiny preset is practical" in row(result.output, "cuda")
    assert "OK" in row(result.output, "trl") and "1.16" in row(result.output, "trl")
    assert "OK" in row(result.output, "hub") and "fake" in row(result.output, "hub")
    assert "0 FAIL" in result.output


def test_cli_hub_offline_and_brackets_survive(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(doctor, "installed_versions", lambda: {**GOOD, "torch": "2.13.0", "bitsandbytes": None})
    result = CliRunner().invoke(make_app(), ["doctor"])
    assert result.exit_code == 0, result.output
    assert "offline by setting" in row(result.output, "hub")
    assert "pip install 'selfie-lite[quant]'" in row(result.output, "bitsandbytes")  # not eaten as Rich markup


def test_cli_exits_1_when_the_disk_is_full(monkeypatch, tmp_path):
    seen = []

    def full(path):
        seen.append(Path(path))
        return Usage(100 * GB, 99 * GB, 1 * GB)

    monkeypatch.setattr(doctor.shutil, "disk_usage", full)
    result = CliRunner().invoke(make_app(), ["doctor", "--out", str(tmp_path / "elsewhere")])
    assert result.exit_code == 1, result.output
    assert "FAIL" in row(result.output, "disk: runs") and "1.0 GB free" in row(result.output, "disk: runs")
    assert "error: 2 checks failed: disk: runs, disk: HF cache" in result.output
    assert seen[0] == tmp_path


def test_cli_exits_1_when_a_library_is_missing(monkeypatch):
    monkeypatch.setattr(doctor, "installed_versions", lambda: {**GOOD, "transformers": None})
    result = CliRunner().invoke(make_app(), ["doctor"])
    assert result.exit_code == 1
    assert "FAIL" in row(result.output, "transformers")
    assert "1 check failed: transformers" in result.output


def test_cli_help_has_an_example():
    result = CliRunner().invoke(make_app(), ["doctor", "--help"])
    assert result.exit_code == 0
    assert "selfie-lite doctor --out" in result.output and "--out" in result.output
