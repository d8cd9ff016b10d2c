"""What a run starts from, checked and fixed before anything trains: the SFT model (pi_init) and the data split.

resolve_inputs picks the model and data (the built-in tiny preset when none is given), preflight checks them before a
weight loads or a file is written, prepare_data splits the preference set once into the run folder (data/), and
check_resume_sft refuses a resume whose SFT model is not the one the run started from (model_fingerprint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from selfie_lite.config import RunConfig
from selfie_lite.data import load_split
from selfie_lite.errors import UserError
from selfie_lite.rundir import atomic_write_json, atomic_write_jsonl, read_json


@dataclass
class Inputs:
    model_dir: Path  # pi_init
    data_source: str
    gold: Callable[[str, str], float] | None  # an oracle scorer where one exists (the tiny preset)
    tiny: bool


def resolve_inputs(cfg: RunConfig, console: Console | None = None) -> Inputs:
    """No --model / no data source means the built-in tiny preset (built on first use, then cached)."""
    from selfie_lite.backends.hf import check_model_source

    model_dir, source, gold, tiny = cfg.model, cfg.data.source, None, False
    if model_dir:
        check_model_source(model_dir)  # before building anything
    if not model_dir or not source:
        from selfie_lite.tiny.build import build_tiny
        from selfie_lite.tiny.task import score

        preset = build_tiny(progress=_build_progress(console))
        model_dir = model_dir or str(preset.model_dir)
        if not source:
            source, gold, tiny = str(preset.preferences), score, True
    return Inputs(Path(model_dir) if Path(model_dir).exists() else model_dir, source, gold, tiny)


def _build_progress(console):
    if console is None:
        return None
    state = {"last": None}

    def report(stage: str, fraction: float):
        if stage != state["last"]:
            console.print(f"[dim]building the tiny preset: {stage}[/dim]")
            state["last"] = stage

    return report


def preflight(cfg: RunConfig, backend, inputs: Inputs):
    """Everything that can be wrong with the input, checked before a single weight loads or a file is written:
    the model folder (or hub id while offline), its chat template, every data row, the split sizes."""
    from selfie_lite.backends.hf import check_model_source

    check_model_source(inputs.model_dir)
    if Path(inputs.model_dir).exists():
        backend.load_tokenizer(inputs.model_dir)
    return load_split(cfg.data, cfg.rounds, cfg.random_seed, inputs.data_source)


def prepare_data(cfg: RunConfig, run_dir: Path, inputs: Inputs, split=None) -> dict:
    """Split once and keep the split in the run folder: a resume never re-reads (or re-shuffles) the dataset.
    split.json also names the SFT model the run started from, for `selfie-lite eval` to compare against."""
    folder = run_dir / "data"
    if (folder / "split.json").is_file():
        return read_json(folder / "split.json")
    source = inputs.data_source
    split = split or load_split(cfg.data, cfg.rounds, cfg.random_seed, source)
    atomic_write_jsonl(folder / "seed.jsonl", [dict(r, pair_id=i) for i, r in enumerate(split.seed_pairs)])
    atomic_write_jsonl(folder / "test.jsonl", split.test_pairs)
    for i, pool in enumerate(split.pools, start=1):
        atomic_write_jsonl(folder / f"pool-{i}.jsonl", [{"prompt": p} for p in pool])
    info = {
        "source": source,
        "sft_model": str(inputs.model_dir),
        "sft_model_hash": model_fingerprint(inputs.model_dir),
        "valid_rows": split.n_rows,
        "skipped_bad_rows": split.n_bad,
        "dropped_identical_pairs": split.n_identical,
        "seed_pairs": len(split.seed_pairs),
        "pools": [len(p) for p in split.pools],
        "test_pairs": len(split.test_pairs),
    }
    atomic_write_json(folder / "split.json", info)  # last: its presence means the split is complete
    return info


def sft_model_of(run_dir: Path) -> str | None:
    """The SFT model (pi_init) a run started from. The tiny preset's cache can be rebuilt or moved (its SFT weights
    are not bit-identical across builds), so a run is compared with the model it really started from."""
    p = run_dir / "data" / "split.json"
    return read_json(p).get("sft_model") if p.is_file() else None


FULL_HASH_BYTES = 64 * 2**20  # weight files up to this size are hashed whole
SAMPLE_BLOCKS, BLOCK_BYTES = 64, 64 * 2**10


def model_fingerprint(model_dir) -> str | None:
    """A content hash of a local model folder: config.json plus every *.safetensors file; None for a hub id.

    Small files (the tiny preset, test models) are hashed whole. A 7B model is ~15 GB: reading it all would add
    a minute to every resume, so for files over FULL_HASH_BYTES we hash the safetensors header (names, dtypes,
    shapes, offsets) and 64 blocks of 64 KiB spread evenly over the file (4 MB read per file). Two fine-tunes of
    one base differ in nearly every weight, so a sampled block tells them apart; sizes and mtimes would not do,
    since a plain `cp` changes mtimes and a fine-tune keeps the sizes."""
    import hashlib

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        if not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= FULL_HASH_BYTES:
                for block in iter(lambda: fh.read(2**20), b""):
                    h.update(block)
                continue
            header_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header_len, size - 8)))
            for k in range(SAMPLE_BLOCKS):
                fh.seek(k * (size - BLOCK_BYTES) // (SAMPLE_BLOCKS - 1))
                h.update(fh.read(BLOCK_BYTES))
    return "sha256:" + h.hexdigest()


def check_resume_sft(run_dir: Path, model_dir=None) -> None:
    """On --resume: the SFT model must be the one the run started from (data/split.json), or the resumed rounds
    would train and judge against another pi_init without a word. model_dir is the model this resume would use
    (None: not known yet, the tiny preset's); the same weights moved elsewhere (--force --model NEW) pass, since
    the content hash is compared, not the path."""
    p = Path(run_dir) / "data" / "split.json"
    info = read_json(p) if p.is_file() else {}
    recorded, want = info.get("sft_model"), info.get("sft_model_hash")
    if not recorded:
        return  # no split yet: nothing has trained, any model is fine
    # A hash means it was a local folder. Checked before the model resolves, so the message names the run's model
    # rather than only "model folder ... does not exist".
    if want and not Path(recorded).exists() and not (model_dir and Path(model_dir).expanduser().exists()):
        raise UserError(
            f"{run_dir} started from the SFT model {recorded}, which is missing now"
            + (f" (this resume would use {model_dir})" if model_dir else ""),
            hint="put that model back where it was, or pass a copy of it with --model PATH --force; "
            "a different SFT model would mix two runs",
        )
    if model_dir is None or not want:
        return  # a hub model, or a run made before hashes were recorded: nothing to compare
    have = model_fingerprint(model_dir)
    if have != want:
        raise UserError(
            f"{run_dir} started from the SFT model {recorded} ({want[:19]}...), but this resume would use "
            f"{model_dir} ({(have or 'no local folder')[:19]}...)",
            hint="resume from the folder the run was started in, or restore that model; "
            "a different SFT model would mix two runs",
        )
