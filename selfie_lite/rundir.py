"""The run directory: atomic writes, done-markers and a lock, so that no kill ever leaves half a file.

Layout (see README): config.json, summary.json, round-<i>/{samples/, judged.jsonl, pairs.jsonl, adapter/, model/,
metrics.json, done/<stage>.json}. A stage counts as finished only once its done-marker exists; the marker is the
last thing the stage writes, after its outputs were renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from selfie_lite.errors import RunError, UserError


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path, user_file: bool = False) -> list:
    """Every non-blank line of a JSON Lines file. user_file=True: a file the user gave, so a line that is not JSON is
    a one-line UserError naming it (our own files are written whole by atomic_write_jsonl)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if not user_file:
                    raise
                raise UserError(f"{path} line {n} is not JSON") from None
    return rows


def is_run_dir(path: Path) -> bool:
    """A folder `selfie-lite run` made: config.json and its data split or a round folder."""
    path = Path(path)
    return (path / "config.json").is_file() and ((path / "data").is_dir() or any(path.glob("round-*")))


def round_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(i, round-<i>/) for every round folder of a run, in round order."""
    found = [(int(d.name[6:]), d) for d in Path(run_dir).glob("round-*") if d.name[6:].isdigit()]
    return sorted(found)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place; whatever stood there before is dropped."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def fresh_tmp_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a killed attempt
    tmp.mkdir(parents=True)
    return tmp


# -- done markers -------------------------------------------------------------------------------


def marker(round_dir: Path, stage: str) -> Path:
    return round_dir / "done" / f"{stage}.json"


def is_done(round_dir: Path, stage: str) -> bool:
    return marker(round_dir, stage).is_file()


def mark_done(round_dir: Path, stage: str, metrics: dict) -> None:
    """The stage's metrics plus the config revision it ran under (round_dir's parent is the run folder), so that
    after a `--resume --force` every finished stage still names the settings that made it."""
    atomic_write_json(marker(round_dir, stage), {**metrics, "config_rev": config_rev(Path(round_dir).parent)})


def stage_metrics(round_dir: Path) -> dict:
    """All finished stages' metrics of a round, keyed by stage, in the order they finished."""
    done = round_dir / "done"
    if not done.is_dir():
        return {}
    files = sorted(done.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    return {p.stem: read_json(p) for p in files}


# -- config revisions ----------------------------------------------------------------------------
# config.json always holds the settings in force now. A `--resume --force` that changes them first keeps the old
# file as config.<rev>.json and appends a line to config-history.jsonl, so stages finished under old settings can
# still be traced to them (their done-markers carry "config_rev").

HISTORY = "config-history.jsonl"


def config_rev(run_dir: Path) -> int:
    """The revision of run_dir/config.json: 0 as first written, +1 per forced resume that changed it."""
    p = Path(run_dir) / HISTORY
    return len(read_jsonl(p)) if p.is_file() else 0


def save_config_revision(run_dir: Path, old: dict, changes: list[str]) -> int:
    """Keep the settings about to be replaced (as config.<rev>.json) and log what changed; returns the new revision.
    Called before config.json is overwritten, so a kill in between loses nothing (the old file is still there)."""
    run_dir = Path(run_dir)
    rev = config_rev(run_dir)
    atomic_write_json(run_dir / f"config.{rev}.json", old)
    rows = read_jsonl(run_dir / HISTORY) if (run_dir / HISTORY).is_file() else []
    rows.append({"rev": rev + 1, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "previous": f"config.{rev}.json",
                 "changes": changes})
    atomic_write_jsonl(run_dir / HISTORY, rows)
    return rev + 1


def stages_by_rev(run_dir: Path) -> dict[int, list[str]]:
    """Finished stages grouped by the config revision they ran under ("round-0 train", ...); markers written
    before revisions were recorded count as revision 0."""
    out: dict[int, list[str]] = {}
    for _, d in round_dirs(run_dir):
        for name, m in stage_metrics(d).items():
            out.setdefault(int(m.get("config_rev", 0)), []).append(f"{d.name} {name}")
    return dict(sorted(out.items()))


# -- disk space ---------------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    """1.9 MB, 14.2 GB: a tiny-preset model must not read as 0.00 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def free_bytes(folder: Path) -> tuple[int, Path]:
    """Free space on the disk that holds `folder` (or its nearest existing parent), and that parent."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free, probe


def check_free_space(folder: Path, needed_bytes: int | None, what: str, parts: str = "") -> None:
    """Refuse to start `what` when the disk under `folder` has less than needed_bytes free. None: the need is not
    known (no local weights to measure), so nothing is checked rather than a made-up number."""
    if not needed_bytes:
        return
    free, probe = free_bytes(folder)
    if free < needed_bytes:
        raise RunError(
            f"not enough disk space to {what}: need {format_bytes(needed_bytes)}{f' ({parts})' if parts else ''} "
            f"in {probe}, {format_bytes(free)} free",
            hint="free some space or point --out at a larger disk, then add --resume",
        )


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
                            "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def local_model_dir(model) -> Path | None:
    """A model's local folder: the folder itself, or a hub id's snapshot in the Hugging Face cache (no download);
    None when neither is there."""
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:
        return None


def model_params(model) -> int | None:
    """Parameters stored in a model's *.safetensors files, from their headers (a few kB read, no weights loaded).
    A 4-bit checkpoint counts its packed bytes, so it reads low: merges load it in 16 bit anyway."""
    folder = local_model_dir(model)
    if folder is None:
        return None
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")) or b"{}")
        for name, t in header.items():
            if name != "__metadata__":
                n = 1
                for d in t.get("shape", []):
                    n *= d
                total += n
    return total or None


def merged_model_bytes(base_model, device: str = "cpu") -> int | None:
    """What merging an adapter into `base_model` writes: every parameter at the merge's precision (fp32 on a CPU,
    16 bit on a GPU: merge.py), plus 10% for the tokenizer and headroom. None: unknown (no local weights)."""
    n = model_params(base_model)
    return None if n is None else int(n * (2 if device == "cuda" else 4) * 1.1)


def adapter_bytes(model) -> int:
    """Bytes of a PEFT model's trainable (LoRA) parameters, as save_adapter writes them, plus 10%."""
    return int(1.1 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))


# -- output paths -------------------------------------------------------------------------------


def writable_problem(path: Path, kind: str = "folder") -> str | None:
    """Why `path` (a folder, or a file to be made) cannot be written, or None. Nothing is created to find out."""
    path = Path(path).expanduser()
    if path.exists():
        if kind == "folder" and not path.is_dir():
            return "a file is in the way (need a folder)"
        if kind == "file" and path.is_dir():
            return "is a folder (need a file name)"
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"cannot write to {probe} (permission denied or a read-only disk)"
    return None


def check_writable(path: Path, flag: str, kind: str = "folder") -> None:
    """Bad input, not a failed run: `path` cannot be written. Checked before any work, so `--out /read-only/x`
    stops at once with the path named instead of failing after the first stage."""
    problem = writable_problem(path, kind)
    if problem:
        raise UserError(f"{flag} {path}: {problem}", hint="pick a place you can write to, or fix its permissions")


def claim_run_dir(base: Path) -> Path:
    """A new run folder at `base`, or base-2, base-3, ... when it is taken: mkdir is atomic, so two runs started in
    the same second (same runs/<timestamp>) still get a folder each."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        candidate = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"could not make a new run folder next to {base}", hint="pass --out DIR")


# -- lock ---------------------------------------------------------------------------------------
# .lock holds {"pid", "host", "boot_id", "pid_start", "started", "beat"}; a thread rewrites "beat" every HEARTBEAT_S
# while the run lives. A lock is taken over, with one line saying why, when its run is certainly gone:
#   - same host and boot: its pid is dead, or alive but started at another time (a reused pid);
#   - same host, another boot id: the machine restarted since;
#   - another host (a lost Colab VM, a cluster node): no heartbeat for STALE_AFTER_S;
#   - empty or unreadable (the VM died while writing it) and older than a few seconds.

HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0  # 6 missed heartbeats
EMPTY_LOCK_GRACE_S = 10.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the command name
    except (OSError, IndexError):
        return None


def _ago(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def stale_lock_reason(info: dict, lock_age_s: float, host: str, boot_id: str | None, now: float) -> str | None:
    """Why a lock's run is certainly gone (it may be taken over), or None (it may be alive: refuse)."""
    if not info:
        return "the lock file is empty or unreadable" if lock_age_s > EMPTY_LOCK_GRACE_S else None
    pid = int(info.get("pid", 0) or 0)
    if info.get("host") != host:
        beat = float(info.get("beat") or info.get("started") or 0)
        silent = now - beat if beat else lock_age_s
        if silent > STALE_AFTER_S:
            return f"no sign of life from {info.get('host', '?')} for {_ago(silent)}"
        return None
    if boot_id and info.get("boot_id") and info["boot_id"] != boot_id:
        return "this machine has restarted since"
    if not pid or not _alive(pid):
        return f"its process {pid or '?'} is gone"
    if info.get("pid_start") and _pid_start(pid) not in (None, info["pid_start"]):
        return f"pid {pid} now belongs to another process"
    return None


class RunLock:
    """One run per directory. A lock whose run is certainly gone (kill -9, a lost Colab VM, a reboot) is taken
    over, and on_takeover(line) is told why."""

    def __init__(self, run_dir: Path, on_takeover=None):
        self.path = Path(run_dir) / ".lock"
        self.on_takeover = on_takeover
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info: dict = {}

    def _read(self) -> tuple[dict, float]:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return {}, 0.0
        try:
            info = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            info = {}
        return (info if isinstance(info, dict) else {}), age

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host, boot = socket.gethostname(), _boot_id()
        now = time.time()
        self.info = {"pid": os.getpid(), "host": host, "boot_id": boot, "pid_start": _pid_start(os.getpid()),
                     "started": now, "beat": now}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                info, age = self._read()
                why = stale_lock_reason(info, age, host, boot, time.time())
                if why is None:
                    beat = info.get("beat")
                    seen = f", last sign of life {_ago(time.time() - float(beat))} ago" if beat else ""
                    raise UserError(
                        f"{self.path.parent} is in use by another run (pid {info.get('pid') or '?'} on "
                        f"{info.get('host', '?')}{seen})",
                        hint=f"wait for it to finish; a lock from another machine is taken over after "
                        f"{_ago(STALE_AFTER_S)} without a heartbeat, or delete {self.path} if you are sure it is gone",
                    ) from None
                self.path.unlink(missing_ok=True)
                if self.on_takeover is not None:
                    who = f"pid {info['pid']} on {info.get('host', '?')}" if info.get("pid") else "an unknown run"
                    self.on_takeover(f"taking over the lock of {who}: {why}")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            self._thread = threading.Thread(target=self._heartbeat, name="selfie-lite-lock", daemon=True)
            self._thread.start()
            return self
        raise UserError(f"could not take the lock {self.path}")

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_S):
            self.info["beat"] = time.time()
            with contextlib.suppress(OSError):
                atomic_write_text(self.path, json.dumps(self.info))

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)
        return False


# -- Ctrl-C that is never lost ------------------------------------------------------------------------

_interrupted = False


@contextmanager
def ctrl_c_noted():
    """Ctrl-C raises KeyboardInterrupt at once, as usual, and is also noted, so that safe_point (called after every
    finished item of every stage) raises it again. Python drops a KeyboardInterrupt that lands in a weakref callback
    or a __del__ (e.g. inside a lazy import: "Exception ignored in ... _get_module_lock"); without the note the run
    would carry on to the end as if nothing was pressed."""
    global _interrupted

    def handler(signum, frame):
        global _interrupted
        _interrupted = True
        raise KeyboardInterrupt

    def unraisable(args):
        # Python prints "Exception ignored in ... Traceback ... KeyboardInterrupt" when Ctrl-C lands in a __del__ or a
        # weakref callback (seen inside the regex package's clean-up). The press is noted above and stops the run at
        # the next item: the user should see our one line, not a traceback.
        if issubclass(args.exc_type, KeyboardInterrupt):
            global _interrupted
            _interrupted = True
            return
        previous_hook(args)

    # Keep SIGINT ignored where the parent ignored it (a shell's background job); signal() only works in the main thread.
    install = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    try:
        old = signal.signal(signal.SIGINT, handler) if install else None
    except ValueError:
        old = None
    previous_hook = sys.unraisablehook
    sys.unraisablehook = unraisable
    _interrupted = False
    try:
        yield
    finally:
        _interrupted = False
        sys.unraisablehook = previous_hook
        if old is not None:
            signal.signal(signal.SIGINT, old)


# -- fault injection (tests and the curious): SELFIE_LITE_KILL_AT="<stage>:<items>" ------------------


def safe_point(stage: str, items_done: int) -> None:
    """A point between two finished items of `stage` (a sampling chunk, a scoring pass, an optimizer step), where
    stopping loses nothing: a Ctrl-C that Python swallowed (see ctrl_c_noted) stops the run here, and with
    SELFIE_LITE_KILL_AT=stage:n the process kills itself (SIGKILL, no clean-up) once n items are done, which the
    resume tests use to prove that a kill at any point loses no work and changes no result."""
    if _interrupted:
        raise KeyboardInterrupt
    spec = os.environ.get("SELFIE_LITE_KILL_AT", "")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name == stage and items_done >= int(n or 0):
        os.kill(os.getpid(), signal.SIGKILL)
