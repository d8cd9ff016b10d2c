"""`selfie-lite doctor`: is this machine ready for a run? One line per check, OK / WARN / FAIL, each with its fix.

Checks: Python, torch, CUDA and GPU memory (plus bf16 on a GPU), the library versions against the supported matrix
(selfie-lite's own requirements, read from pyproject.toml or the installed metadata: supported_matrix), the optional
extras (bitsandbytes, unsloth) and the `kernels` package, hub reachability, whether the runs folder (--out) can be
written, and free disk there and in the Hugging Face cache.

Every check is a small function that returns a `Check`; the inputs (versions, GPU facts, the hub probe, disk usage)
are arguments, so the logic is testable with fake values and no GPU or network. `run_checks()` gathers the real
inputs and returns the list; `doctor_cmd` prints it as a table and exits 1 if anything FAILs (WARN is fine).
Nothing here imports unsloth (versions come from importlib.metadata) and torch is imported only inside probe_gpu.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from selfie_lite import hub
from selfie_lite.console import console, friendly_errors, json_output
from selfie_lite.errors import RunError, describe
from selfie_lite.versions import (
    TRL_WITHOUT_GPU,
    UNKNOWN_FIX,
    UNSLOTH_CAPS,
    Matrix,
    Requirement,
    installed_versions,
    lower_bounds_first,
    release,
    supported_matrix,
)

if TYPE_CHECKING:
    pass

OK, WARN, FAIL = "OK", "WARN", "FAIL"

GB = 1e9  # decimal gigabytes, as disk.check_free_space reports them
DISK_FAIL_BYTES = 2 * GB  # below this nothing useful fits (the tiny preset needs MBs, one checkpoint more)
DISK_WARN_BYTES = 20 * GB  # a merged 7B model in 16 bit is ~15 GB, plus adapters and samples
HUB_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str
    fix: str = ""


# -------------------------------------------------------------------------------------------------
# Checks: pure functions of their arguments


def check_python(version: tuple[int, ...] | None = None, matrix: Matrix | None = None) -> Check:
    version = tuple(sys.version_info[:3]) if version is None else tuple(version)
    shown = ".".join(map(str, version))
    matrix = supported_matrix() if matrix is None else matrix
    if matrix.python is None:
        return Check("python", WARN, f"{shown}: supported range unknown ({matrix.source})", UNKNOWN_FIX)
    if not matrix.python.contains(shown):
        need = ", ".join(f"{s.operator} {s.version}" for s in sorted(matrix.python, key=lower_bounds_first))
        return Check("python", FAIL, f"{shown}: need {need} (transformers 5 and trl 1.16 do)",
                     f"create the venv with Python {need}")
    return Check("python", OK, shown)


def check_version(req: Requirement, version: str | None) -> Check:
    """One library against its range: missing or below a minimum (>=, >) FAILs (WARNs when optional); outside the
    range otherwise (newer than tested) WARNs."""
    bad = WARN if req.optional else FAIL
    if version is None:
        if req.optional:
            return Check(req.dist, WARN, f"not installed (optional: {req.purpose})" if req.purpose
                         else "not installed (optional)", req.missing_fix or req.pip)
        need = f" (need {req.spec})" if req.spec else ""
        return Check(req.dist, FAIL, f"not installed{need}", req.missing_fix or req.pip)
    if req.specifier is None:
        return Check(req.dist, WARN, f"{version}: supported range unknown ({req.unknown})", UNKNOWN_FIX)
    try:
        v = release(version)
    except Exception:
        return Check(req.dist, WARN, f"{version}: cannot parse this version (need {req.spec})", req.pip)
    failed = [s for s in req.specifier if not s.contains(v, prereleases=True)]
    if not failed:
        return Check(req.dist, OK, version)
    if any(s.operator in (">=", ">") for s in failed):
        return Check(req.dist, bad, f"{version}: too old (need {req.spec})", req.pip)
    newer = all(s.operator in ("<", "<=") for s in failed)
    return Check(req.dist, WARN, f"{version}: {'newer than' if newer else 'outside'} the tested range {req.spec}",
                 f"if a run breaks: {req.pip}")


def check_trl(version: str | None, has_gpu: bool, req: Requirement | None = None) -> Check:
    """The range, plus a supported trl older than TRL_WITHOUT_GPU (trl 1.15) on a machine without a GPU: its
    DPOTrainer needs a GPU Triton driver."""
    req = supported_matrix().libraries["trl"] if req is None else req
    c = check_version(req, version)
    if c.status == OK and not has_gpu and release(version) < release(TRL_WITHOUT_GPU):
        return Check("trl", WARN, f"{version}: its DPOTrainer crashes without a GPU Triton driver",
                     req.at_least(TRL_WITHOUT_GPU).pip)
    return c


def check_unsloth(version: str | None, versions: Mapping[str, str | None], has_gpu: bool) -> Check:
    """Optional GPU extra. Absent is fine; present, it needs a GPU and the versions it caps."""
    if version is None:
        return Check("unsloth", OK, "not installed (optional, GPU extra)")
    over = []
    for dist, first_bad in UNSLOTH_CAPS.items():
        v = versions.get(dist)
        try:
            if v is not None and release(v) >= release(first_bad):
                over.append((dist, v, first_bad))
        except Exception:
            continue
    unused = "" if has_gpu else "; unused here: no CUDA GPU, so --backend auto picks hf"
    if over:
        found = ", ".join(f"{d} {v}" for d, v, _ in over)
        pins = " ".join(f"'{d}<{b}'" for d, _, b in over)
        return Check("unsloth", WARN, f"{version}: Unsloth caps {found}{unused}",
                     f"pip install {pins}, or run with --backend hf")
    if not has_gpu:
        return Check("unsloth", OK, f"{version}: installed, but unused without a CUDA GPU (--backend auto picks hf)")
    return Check("unsloth", OK, f"{version} (--backend auto uses it)")


def check_kernels(version: str | None) -> Check:
    if version is None:
        return Check("kernels", OK, "not installed")
    # transformers >= 5.25 lists `kernels` as a requirement but imports it only when asked; bitsandbytes, on an
    # AVX512-BF16 CPU, asks it for a kernel from the hub at import time. Both work without it (measured here).
    return Check("kernels", WARN, f"{version}: installed; bitsandbytes may fetch code from the hub through it at run time",
                 "pip uninstall kernels (transformers lists it but runs without it), or set HF_HUB_OFFLINE=1")


@dataclass(frozen=True)
class GpuInfo:
    torch_imports: bool = True
    torch_error: str = ""
    cuda_build: str | None = None  # torch.version.cuda: None for a CPU build
    available: bool = False
    count: int = 0
    name: str = ""
    total_bytes: int = 0
    free_bytes: int = 0
    bf16: bool = False
    error: str = ""  # a CUDA query that failed


def probe_gpu() -> GpuInfo:
    """What torch sees. Imports torch here, not at module level, so `selfie-lite --help` stays instant."""
    try:
        import torch
    except Exception as e:  # a broken CUDA install can raise OSError, not only ImportError
        return GpuInfo(torch_imports=False, torch_error=describe(e))
    cuda_build = torch.version.cuda
    try:
        if not torch.cuda.is_available():
            return GpuInfo(cuda_build=cuda_build)
        count = torch.cuda.device_count()
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        return GpuInfo(cuda_build=cuda_build, available=True, count=count, name=name, total_bytes=total,
                       free_bytes=free, bf16=bool(torch.cuda.is_bf16_supported()))
    except Exception as e:
        return GpuInfo(cuda_build=cuda_build, available=True, error=f"{type(e).__name__}: {e}")


def check_cuda(gpu: GpuInfo) -> Check:
    if not gpu.torch_imports:
        return Check("cuda", FAIL, f"torch does not import: {gpu.torch_error}",
                     "reinstall torch: pip install --force-reinstall torch")
    if not gpu.available:
        build = "torch is a CPU build" if gpu.cuda_build is None else f"torch built for CUDA {gpu.cuda_build}, no device visible"
        return Check("cuda", WARN, f"no CUDA GPU: only the tiny preset is practical ({build})",
                     "for the 7B presets use a machine with an NVIDIA GPU and a CUDA build of torch")
    if gpu.error:
        return Check("cuda", FAIL, f"a CUDA GPU is present but cannot be queried: {gpu.error}",
                     "check the driver with nvidia-smi; match torch's CUDA build to it")
    more = f" (GPU 0 of {gpu.count})" if gpu.count > 1 else ""
    return Check("cuda", OK, f"{gpu.name}{more}: {gpu.total_bytes / GB:.1f} GB total, {gpu.free_bytes / GB:.1f} GB free, "
                 f"CUDA {gpu.cuda_build}")


def check_bf16(gpu: GpuInfo) -> Check:
    if gpu.bf16:
        return Check("bf16", OK, "supported: train.precision auto trains in bf16")
    return Check("bf16", WARN, "not supported on this GPU (pre-Ampere): precision auto falls back to fp32",
                 "set train.precision = \"fp16\" to halve memory, or use an Ampere or newer GPU")


def hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except Exception:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def probe_hub(url: str, timeout_s: float = HUB_TIMEOUT_S) -> tuple[bool, str]:
    """HEAD `url`: (reachable, what happened). Bounded to about timeout_s of wall time, DNS included.

    urllib's timeout covers each socket operation but not name resolution, so the request runs in a daemon thread
    that we stop waiting for at the deadline.
    """
    result: list[tuple[bool, str]] = []

    def head():
        try:
            req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "selfie-lite-doctor"})
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                result.append((True, f"HTTP {r.status}"))
        except urllib.error.HTTPError as e:  # a server answered; 5xx or a proxy asking for credentials is not "reached"
            result.append((e.code < 500 and e.code != 407, f"HTTP {e.code}"))
        except urllib.error.URLError as e:
            result.append((False, str(e.reason)))
        except Exception as e:
            result.append((False, f"{type(e).__name__}: {e}"))

    t = threading.Thread(target=head, name="selfie-lite-hub-probe", daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    return result[0] if result else (False, f"no answer in {timeout_s:g} s")


def check_hub(probe: Callable[[str], tuple[bool, str]] | None = None, endpoint: str | None = None) -> Check:
    if hub.offline():
        return Check("hub", WARN, "offline by setting (HF_HUB_OFFLINE=1): hub models and datasets will not download",
                     "unset HF_HUB_OFFLINE to download, or pass local folders (--model ./my-model)")
    endpoint = endpoint or hub_endpoint()
    ok, what = (probe or probe_hub)(endpoint)
    if ok:
        return Check("hub", OK, f"{endpoint} reachable ({what})")
    return Check("hub", WARN, f"{endpoint} unreachable ({what}); a local model folder still works",
                 "check the network or proxy (HTTPS_PROXY), set HF_ENDPOINT to a mirror, or pass local folders")


def default_runs_dir() -> Path:
    return Path("runs") if Path("runs").is_dir() else Path.cwd()


def hf_cache_dir() -> Path:
    """Where hub downloads land: HF_HUB_CACHE if set, else HF_HOME (default ~/.cache/huggingface). Read at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface"


def check_writable_dir(name: str, folder: Path, fix: str) -> Check:
    """Can a run be written there: the folder, or the nearest existing parent it would be made in."""
    from selfie_lite.paths import writable_problem

    problem = writable_problem(Path(folder))
    if problem:
        return Check(name, FAIL, f"{folder}: {problem}", fix)
    return Check(name, OK, f"{folder}: writable" + ("" if Path(folder).exists() else " (will be created)"))


def check_disk(name: str, folder: Path, fix: str, disk_usage: Callable = shutil.disk_usage) -> Check:
    """Free space on the disk that holds `folder` (or its nearest existing parent: it may not exist yet)."""
    probe = Path(folder).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = disk_usage(probe).free
    except OSError as e:
        return Check(name, WARN, f"{folder}: cannot read free space ({e.strerror or e})", fix)
    where = f"{free / GB:.1f} GB free at {probe}" if probe == Path(folder).expanduser().absolute() \
        else f"{free / GB:.1f} GB free at {probe} (for {folder})"
    if free < DISK_FAIL_BYTES:
        return Check(name, FAIL, f"{where}: need >= {DISK_FAIL_BYTES / GB:g} GB", fix)
    if free < DISK_WARN_BYTES:
        return Check(name, WARN, f"{where}: a 7B run needs ~{DISK_WARN_BYTES / GB:g} GB (a merged model is ~15 GB)", fix)
    return Check(name, OK, where)


# -------------------------------------------------------------------------------------------------
# All of them


def run_checks(
    out: Path | None = None,
    *,
    versions: Mapping[str, str | None] | None = None,
    gpu: GpuInfo | None = None,
    hub_probe: Callable[[str], tuple[bool, str]] | None = None,
    disk_usage: Callable | None = None,
    matrix: Matrix | None = None,
) -> list[Check]:
    """Every check, in display order. Each keyword replaces a real probe (for tests); None means look it up."""
    v = dict(installed_versions()) if versions is None else dict(versions)
    gpu = probe_gpu() if gpu is None else gpu
    disk_usage = disk_usage or shutil.disk_usage
    matrix = supported_matrix() if matrix is None else matrix
    libraries = matrix.libraries
    checks = [check_python(matrix=matrix), check_version(libraries["torch"], v.get("torch")), check_cuda(gpu)]
    if gpu.available and not gpu.error:
        checks.append(check_bf16(gpu))
    for dist, req in libraries.items():
        if dist == "trl":
            checks.append(check_trl(v.get(dist), gpu.available, req))
        elif dist != "torch":  # torch is checked above, before cuda
            checks.append(check_version(req, v.get(dist)))
    checks += [
        check_unsloth(v.get("unsloth"), v, gpu.available),
        check_kernels(v.get("kernels")),
        check_hub(hub_probe),
        check_writable_dir("write: runs", out if out is not None else default_runs_dir(),
                           "pick a folder you can write to (--out), or fix its permissions"),
        check_disk("disk: runs", out if out is not None else default_runs_dir(),
                   "free some space, or point --out at a larger disk", disk_usage),
        check_disk("disk: HF cache", hf_cache_dir(),
                   "free some space (huggingface-cli delete-cache), or set HF_HOME to a larger disk", disk_usage),
    ]
    return checks


def render_table(checks: list[Check]):
    """A Rich table: check, status (coloured), detail, fix."""
    from rich.table import Table
    from rich.text import Text

    style = {OK: "green", WARN: "yellow", FAIL: "bold red"}
    table = Table(title="selfie-lite doctor", title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail", overflow="fold")
    table.add_column("fix", overflow="fold")
    for c in checks:
        # Text, not markup: details and fixes hold brackets ("selfie-lite[quant]", "[Errno -2]")
        table.add_row(c.name, Text(c.status, style=style[c.status]), Text(c.detail), Text(c.fix))
    return table


@friendly_errors
def doctor_cmd(
    out: Annotated[Path | None, typer.Option(
        "--out", help="Where runs will go: whether it can be written and its disk's free space. Default: ./runs, else the current folder.",
    )] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON to stdout (the table goes to stderr).")] = False,
):
    """Check this machine: Python, torch, CUDA and GPU memory, library versions, hub access and free disk.

    One line per check, OK / WARN / FAIL, with the fix. Exits 1 if any check FAILs; warnings are fine.

    Example:

      selfie-lite doctor --out /data/runs
    """
    checks = run_checks(out)
    warns = [c.name for c in checks if c.status == WARN]
    fails = [c.name for c in checks if c.status == FAIL]
    with json_output(as_json) as emit:
        console.print(render_table(checks), soft_wrap=False)
        console.print(f"{len(checks)} checks: {len(checks) - len(warns) - len(fails)} OK, {len(warns)} WARN, "
                      f"{len(fails)} FAIL", highlight=False)
        emit({"ok": not fails, "checks": [dataclasses.asdict(c) for c in checks]})
    if fails:
        raise RunError(f"{len(fails)} check{'s' if len(fails) > 1 else ''} failed: {', '.join(fails)}",
                       hint="apply the fixes in the table, then run selfie-lite doctor again")
