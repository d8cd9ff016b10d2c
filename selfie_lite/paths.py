"""Paths a command will write, checked before any work (a read-only --out stops at once, naming the path), and a
fresh run folder claimed atomically."""

from __future__ import annotations

import os
from pathlib import Path

from selfie_lite.errors import UserError


def writable_problem(path: Path, kind: str = "folder") -> str | None:
    """Why `path` (a folder, or a file to be made) cannot be written, or None. Nothing is created to find out."""
    path = Path(path).expanduser()
    if path.exists():
        if kind == "folder" and not path.is_dir():
            return "a file is in the way (need a folder)"
        if kind == "file" and path.is_dir():
            return "is a folder (need a file name)"
    probe = path.absolute()
    if kind == "file" and probe.is_file():
        probe = probe.parent  # a file to be replaced: it is written beside and renamed over, so its folder counts
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"cannot write to {probe} (permission denied or a read-only disk)"
    return None


def check_writable(path: Path, key: str | None = None, kind: str = "folder", what: str = "") -> None:
    """Bad input, not a failed run: `path` cannot be written. Checked before any work, so an out folder on a
    read-only disk stops at once with the path named instead of failing after the first stage. key: the setting
    that named the path (UserError.key); what: how to name a path that no setting gave."""
    problem = writable_problem(path, kind)
    if problem:
        raise UserError(f"{what + ' ' if what else ''}{path}: {problem}",
                        hint="pick a place you can write to, or fix its permissions", key=key)


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
