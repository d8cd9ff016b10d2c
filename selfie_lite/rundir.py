"""The run directory: atomic writes, done-markers and a lock, so that no kill ever leaves half a file.

Layout (see README): config.json, summary.json, round-<i>/{samples/, judged.jsonl, pairs.jsonl, adapter/, model/,
metrics.json, done/<stage>.json}. A stage counts as finished only once its done-marker exists; the marker is the
last thing the stage writes, after its outputs were renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
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


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
    rounds = [d for d in Path(run_dir).glob("round-*") if d.name[6:].isdigit()]
    for d in sorted(rounds, key=lambda d: int(d.name[6:])):
        for name, m in stage_metrics(d).items():
            out.setdefault(int(m.get("config_rev", 0)), []).append(f"{d.name} {name}")
    return dict(sorted(out.items()))


# -- disk space ---------------------------------------------------------------------------------


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise RunError(
            f"not enough disk space to {what}: need {needed_bytes / 1e9:.2f} GB in {probe}, {free / 1e9:.2f} GB free",
            hint="free some space or point --out at a larger disk, then add --resume",
        )


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# -- lock ---------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One run per directory. A lock left by a dead process (kill -9, lost Colab VM) is taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    info = json.loads(self.path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    info = {}
                pid = int(info.get("pid", 0))
                if info.get("host") == host and pid and not _alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise UserError(
                    f"{self.path.parent} is in use by another run (pid {pid or '?'} on {info.get('host', '?')})",
                    hint=f"wait for it to finish, or delete {self.path} if you are sure it is gone",
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": host, "started": time.time()}, f)
            return self
        raise UserError(f"could not take the lock {self.path}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        return False


# -- Ctrl-C that is never lost ------------------------------------------------------------------------

_interrupted = False


@contextmanager
def ctrl_c_noted():
    """Ctrl-C raises KeyboardInterrupt at once, as usual, and is also noted, so that maybe_kill (called after every
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


def maybe_kill(stage: str, items_done: int) -> None:
    """Simulate a crash (SIGKILL, no clean-up) once `items_done` items of `stage` are finished.

    Used by the resume tests to prove that a kill at any point loses no work and changes no result. Also the place
    where a Ctrl-C that Python swallowed (see ctrl_c_noted) stops the run, at the next item boundary.
    """
    if _interrupted:
        raise KeyboardInterrupt
    spec = os.environ.get("SELFIE_LITE_KILL_AT", "")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name == stage and items_done >= int(n or 0):
        os.kill(os.getpid(), signal.SIGKILL)
