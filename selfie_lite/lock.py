"""One run per run folder: a lock file with a heartbeat, taken over (with one line saying why) when its run is
certainly gone."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from selfie_lite.errors import UserError
from selfie_lite.rundir import atomic_write_text, pid_alive

# .lock holds {"pid", "host", "boot_id", "pid_start", "started", "beat"}; a thread rewrites "beat" every HEARTBEAT_S
# while the run lives. A lock is taken over, with one line saying why, when its run is certainly gone:
#   - same host and boot: its pid is dead, or alive but started at another time (a reused pid);
#   - same host, another boot id: the machine restarted since;
#   - another host (a lost Colab VM, a cluster node): no heartbeat for STALE_AFTER_S;
#   - empty or unreadable (the VM died while writing it) and older than a few seconds.

HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0  # 6 missed heartbeats
EMPTY_LOCK_GRACE_S = 10.0


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
    if not pid or not pid_alive(pid):
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
