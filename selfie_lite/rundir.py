"""The run folder: atomic writes, done-markers, config revisions and output-path checks, so that no kill ever leaves
half a file. The lock is in lock.py, disk estimates in disk.py, Ctrl-C and fault injection in interrupt.py.

Layout (see README): config.json, summary.json, round-<i>/{samples/, judged.jsonl, pairs.jsonl, adapter/, model/,
metrics.json, done/<stage>.json}. A stage counts as finished only once its done-marker exists; the marker is the
last thing the stage writes, after its outputs were renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from selfie_lite.errors import UserError


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it into place: `path` is either the old file or
    the whole new one. A failed write (a full disk) removes the temporary file and names `path` in the error."""
    path = Path(path)
    only_main_writes(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if e.filename is None or str(e.filename) == str(tmp):
            e.filename = str(path)  # a write() or fsync() error names no file; the user knows `path`, not tmp
        raise


def only_main_writes(path: Path) -> None:
    """Under a launcher (`accelerate launch`, distributed.py) only the main process writes the run folder; a write
    from another process is a bug in selfie-lite, stopped here before it can race the main process's."""
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        from selfie_lite import distributed

        if not distributed.is_main():
            raise RuntimeError(f"process {distributed.rank()} tried to write {path}: only the main process writes "
                               "the run folder (a bug in selfie-lite)")


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class DamagedFile(UserError, ValueError):
    """A file of a run folder that exists but does not parse (a disk error, an editor, a copy cut short): exit 2
    with one line naming it and how to recover (damaged_hint). A ValueError too, as json's own error is."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} is damaged ({why})", hint=damaged_hint(path))
        self.path, self.why = Path(path), why


def damaged_hint(path: Path) -> str:
    """How to recover from a damaged run file, by what the file is."""
    path = Path(path)
    parent = path.parent
    if path.name == "config.json" and ((parent / "data").is_dir() or any(parent.glob("round-*"))):
        revs = sorted((int(p.name.split(".")[1]), p) for p in parent.glob("config.*.json") if p.name.split(".")[1].isdigit())
        if revs:
            return (f"{revs[-1][1]} holds the settings before the last --force change ({HISTORY} lists it): copy it "
                    "over config.json and resume, repeating that change with --force if you still want it")
        return "it held the run's only copy of its settings, so the run cannot be resumed: start a new run"
    if path.name == "split.json" and parent.name == "data":
        return ("it records the run's data split and the SFT model's content hash that a resume checks, and cannot "
                "be rebuilt from what is left: restore it from a backup, or start a new run")
    for folder in (parent, parent.parent):  # round-<i>/, or its done/ or samples/
        if folder.name.startswith("round-"):
            return (f"delete it: selfie-lite run --resume {folder.parent} redoes the stage that wrote it where the "
                    "run still needs it")
    if path.name == "summary.json":
        return f"delete it: selfie-lite run --resume {parent} writes it again"
    return "restore it from a backup, or delete it"


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DamagedFile(path, "not valid JSON") from None


def read_jsonl(path: Path, user_file: bool = False) -> list:
    """Every non-blank line of a JSON Lines file. A line that is not JSON is a one-line UserError naming the file:
    user_file=True, a file the user gave; else one of the run's own files, which atomic_write_jsonl writes whole,
    so a bad line means it was damaged since (DamagedFile, with how to recover)."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if user_file:
                        raise UserError(f"{path} line {n} is not JSON") from None
                    raise DamagedFile(path, f"line {n} is not JSON") from None
    except UnicodeDecodeError:
        if user_file:
            raise UserError(f"{path} is not UTF-8 text") from None
        raise DamagedFile(path, "not UTF-8 text") from None
    return rows


def read_if_intact(path: Path):
    """A run file's content (JSON, or JSON Lines for *.jsonl), or None when it is missing or damaged: for the
    files a stage can make again (done-markers, sample chunks, cached log-probs), which are then redone."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return read_jsonl(path) if path.suffix == ".jsonl" else read_json(path)
    except (DamagedFile, OSError):
        return None


def is_run_dir(path: Path) -> bool:
    """A folder `selfie-lite run` made: config.json and its data split or a round folder."""
    path = Path(path)
    return (path / "config.json").is_file() and ((path / "data").is_dir() or any(path.glob("round-*")))


def round_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(i, round-<i>/) for every round folder of a run, in round order."""
    found = [(int(d.name[6:]), d) for d in Path(run_dir).glob("round-*") if d.name[6:].isdigit()]
    return sorted(found)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place; whatever stood there before is dropped. Its files get the
    permissions of every other file of the run (safetensors writes weights 0600)."""
    only_main_writes(final)
    follow_umask(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets as it reads, a race with the lock's heartbeat thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Files under `folder` readable as the umask allows (0644 under the usual 022), as open() would have made them:
    safetensors' writer creates its files 0600, so merged weights were private while the rest of the run was not."""
    mode = 0o666 & ~_umask()
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink():
            p.chmod(mode)


def fresh_tmp_dir(final: Path) -> Path:
    only_main_writes(final)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a killed attempt
    tmp.mkdir(parents=True)
    return tmp


def remove_stale_tmp_files(folder: Path) -> None:
    """Temporary files that a killed writer left behind (.<name>.tmp-<pid> whose process is gone): a live writer's
    (this run's lock heartbeat, an eval writing into the run folder) is left alone."""
    for p in Path(folder).rglob(".*.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if p.is_file() and pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()


# -- done markers -------------------------------------------------------------------------------


def marker(round_dir: Path, stage: str) -> Path:
    return round_dir / "done" / f"{stage}.json"


def read_marker(round_dir: Path, stage: str) -> dict | None:
    """The stage's done-marker, or None when it is missing or damaged (the stage then counts as not finished)."""
    m = read_if_intact(marker(round_dir, stage))
    return m if isinstance(m, dict) else None


def is_done(round_dir: Path, stage: str) -> bool:
    return read_marker(round_dir, stage) is not None


def mark_done(round_dir: Path, stage: str, metrics: dict, outputs: str | None = None) -> None:
    """The stage's metrics plus the config revision it ran under (round_dir's parent is the run folder), so that
    after a `--resume --force` every finished stage still names the settings that made it; and the digest of its
    outputs (outputs_digest), so that a stage redone on resume can tell whether it made the same files."""
    extra = {"outputs_sha256": outputs} if outputs else {}
    atomic_write_json(marker(round_dir, stage), {**metrics, "config_rev": config_rev(Path(round_dir).parent), **extra})


def stage_metrics(round_dir: Path) -> dict:
    """All finished stages' metrics of a round, keyed by stage, in the order they finished (a damaged marker counts
    as not finished)."""
    done = round_dir / "done"
    if not done.is_dir():
        return {}
    files = sorted(done.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    markers = {p.stem: read_marker(round_dir, p.stem) for p in files}
    return {k: v for k, v in markers.items() if v is not None}


# -- a stage's outputs --------------------------------------------------------------------------
# Each stage declares its outputs as patterns relative to its round folder (loop.STAGE_OUTPUTS). Before a finished
# stage is skipped on resume they are checked here: each pattern must match, and every file must be whole (JSON and
# JSON Lines parse; a safetensors file's header reads and its size is what the header says). Cheap: no weight loads.


def _safetensors_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                return "is damaged (cut short)"
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "is damaged (its safetensors header does not read)"
    return None if size == 8 + n + end else f"is damaged ({size:,} bytes where its header says {8 + n + end:,})"


def file_problem(path: Path) -> str | None:
    """Why one output file is not whole, or None."""
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in (".json", ".jsonl"):
        try:
            rows = read_jsonl(path) if path.suffix == ".jsonl" else [read_json(path)]
        except DamagedFile as e:
            return f"is damaged ({e.why})"
        except OSError as e:
            return f"cannot be read ({e.strerror})"
        return None if rows else "is empty"
    return None


def outputs_problem(round_dir: Path, patterns: Iterable[str]) -> str | None:
    """Why a finished stage's outputs are not usable ("model/ is missing", "judged.jsonl is damaged (line 3 is not
    JSON)"), or None when every declared output is there and whole."""
    for pattern in patterns:
        found = sorted(round_dir.glob(pattern))
        if not found:
            top = pattern.split("/")[0]
            if "/" in pattern and not (round_dir / top).is_dir():
                return f"{top}/ is missing"
            return f"{pattern} is missing"
        for f in found:
            why = file_problem(f)
            if why:
                return f"{f.relative_to(round_dir)} {why}"
        if pattern.endswith("*.safetensors"):  # sharded weights: every shard the index names
            for index in found[0].parent.glob("*.safetensors.index.json"):
                try:
                    shards = set(read_json(index)["weight_map"].values())
                except (DamagedFile, OSError, KeyError, TypeError, AttributeError):
                    return f"{index.relative_to(round_dir)} is damaged (no weight_map)"
                missing = sorted(s for s in shards if not (index.parent / s).is_file())
                if missing:
                    return f"{(index.parent / missing[0]).relative_to(round_dir)} is missing"
    return None


def outputs_digest(round_dir: Path, patterns: Iterable[str]) -> str:
    """A content hash of a stage's outputs (names, sizes and bytes; a 7B model's weights sampled, fingerprint.py)."""
    import hashlib

    from selfie_lite.fingerprint import update_with_file

    h = hashlib.sha256()
    for pattern in patterns:
        for f in sorted(round_dir.glob(pattern)):
            update_with_file(h, f, str(f.relative_to(round_dir)))
    return "sha256:" + h.hexdigest()


def remove_outputs(round_dir: Path, patterns: Iterable[str]) -> None:
    """Delete a stage's outputs (before it is redone from inputs that changed), folders included."""
    for pattern in patterns:
        top = round_dir / pattern.split("/")[0]
        if "/" in pattern and top.is_dir():
            shutil.rmtree(top)
            continue
        for f in round_dir.glob(pattern):
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()


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
