"""Folders built once into selfie-lite's cache and then reused: the tiny preset (tiny/build.py) and models converted
from GGUF files (gguf.py).

Where: $SELFIE_LITE_CACHE, else ($XDG_CACHE_HOME or ~/.cache)/selfie-lite. How: build_once builds into a temp folder
beside the target and renames it into place, so an interrupted build never leaves a half-built folder; a marker file
written last (manifest.json) says the build finished; an flock beside the target makes a second process (two first
runs at once, parallel test workers) wait for the first builder and use its folder instead of building again.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

DONE = "manifest.json"  # written last by every builder: its presence means the folder is complete


def cache_home() -> Path:
    """$SELFIE_LITE_CACHE, else the XDG cache folder ($XDG_CACHE_HOME or ~/.cache)/selfie-lite."""
    base = os.environ.get("SELFIE_LITE_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "selfie-lite"


def is_built(root: Path) -> bool:
    return (Path(root) / DONE).is_file()


def build_once(root: Path, build_into: Callable[[Path], None], *, force: bool = False,
               on_wait: Callable[[], None] | None = None) -> None:
    """Make `root` by build_into(temp folder), unless it is built already (or another process builds it meanwhile:
    then wait for it and keep its folder). build_into must write DONE last. force: build again and replace it.
    OSError (disk full, unwritable cache) propagates: the caller says what could not be built."""
    root = Path(root)
    if not force and is_built(root):
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with one_builder(root, on_wait):
        if not force and is_built(root):
            return  # built by the process we waited for
        remove_stale_temps(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-{os.getpid()}-", dir=root.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder is ordinary cache data
        try:
            build_into(tmp)
            move_into_place(tmp, root, force)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed


@contextmanager
def one_builder(root: Path, on_wait: Callable[[], None] | None = None):
    """One build at a time per cache folder. The lock is an flock on .<name>.lock beside the folder, released by the
    kernel if the builder dies; on_wait() is called when another process holds it. Without fcntl (Windows)
    concurrent builds stay correct (move_into_place keeps the first), only slower."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(root.parent / f".{root.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_temps(root: Path) -> None:
    """Delete temp folders left by builds whose process is gone (killed, power cut)."""
    pattern = re.compile(rf"\.{re.escape(root.name)}\.(?:tmp|old)-(\d+)-")
    for path in root.parent.iterdir():
        m = pattern.match(path.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass  # alive under another user, or not a pid: leave it


def move_into_place(tmp: Path, root: Path, force: bool) -> None:
    old = None
    if root.exists():
        if is_built(root) and not force:
            return  # another process finished first: keep its folder
        old = root.parent / f".{root.name}.old-{os.getpid()}-{time.time_ns()}"
        root.rename(old)
    try:
        tmp.rename(root)
    except OSError:
        if not is_built(root):  # lost a race to a concurrent builder: fine if it finished
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
