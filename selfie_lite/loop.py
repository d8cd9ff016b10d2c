"""The SPA rounds, top to bottom (docs/method.md, "The loop"; arXiv 2406.04412).

    round 0:      train (DPO on the seed pairs, reference = pi_init) -> merge                        => pi_0
    round i>=1:   sample (pi_{i-1}) -> judge (pi_{i-1} vs pi_init) [-> guard] [-> consistency] [-> reference]
                  -> train (LoRA DPO from pi_{i-1}) -> merge                                         => pi_i

Every stage has one shape (stage.py: `stage(Round) -> metrics`) and lives in its own module; this file only orders
them (round_stages), skips finished ones, stops where the round guard says so, and names the model that ships. Each
stage writes its outputs atomically, then the loop marks it done, so a run killed anywhere resumes with `--resume` at
the first unfinished stage and reaches the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from selfie_lite.config import RunConfig
from selfie_lite.data import load_split
from selfie_lite.errors import UserError
from selfie_lite.guard import guard_stage, select_by_judge, verdict
from selfie_lite.judge import judge_stage
from selfie_lite.merge import merge_stage
from selfie_lite.numerics import resolve_threads, torch_threads
from selfie_lite.robust import consistency_stage, reference_stage
from selfie_lite.rundir import (
    atomic_write_json,
    atomic_write_jsonl,
    config_rev,
    is_done,
    mark_done,
    read_json,
    stage_metrics,
)
from selfie_lite.sample import sample_stage
from selfie_lite.stage import NULL_PROGRESS, Round
from selfie_lite.train import train_stage


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


def run_rounds(cfg: RunConfig, run_dir: Path, backend, inputs: Inputs, console: Console, progress=None,
               split=None) -> dict:
    threads = resolve_threads(cfg.threads, inputs.model_dir, getattr(backend, "device", "cpu"))
    with torch_threads(threads) as n_threads:
        return _run_rounds(cfg, run_dir, backend, inputs, console, progress, split, n_threads)


def round_stages(cfg: RunConfig, i: int) -> list[tuple[str, Callable[[Round], dict]]]:
    """Round i's stages, in order (docs/method.md, "The loop"). Each takes the Round and returns its metrics."""
    if i == 0:
        return [("train", train_stage), ("merge", merge_stage)]  # the seed DPO
    stages = [("sample", sample_stage), ("judge", judge_stage)]
    if cfg.guard.select == "guard" and i >= cfg.guard.from_round:
        stages.append(("guard", guard_stage))
    if cfg.robust.consistency != "off" and i >= 2:
        stages.append(("consistency", consistency_stage))
    if cfg.robust.train_reference == "sft":
        stages.append(("reference", reference_stage))
    return stages + [("train", train_stage), ("merge", merge_stage)]


def _run_rounds(cfg: RunConfig, run_dir: Path, backend, inputs: Inputs, console: Console, progress, split,
                n_threads: int) -> dict:
    t_start = time.perf_counter()
    split = prepare_data(cfg, run_dir, inputs, split)
    history = []
    stopped = None
    for i in range(cfg.rounds + 1):
        r = Round(cfg, run_dir, i, backend, Path(inputs.model_dir), inputs.gold, progress or NULL_PROGRESS)
        r.dir.mkdir(parents=True, exist_ok=True)
        stages = round_stages(cfg, i)
        for k, (name, stage) in enumerate(stages):
            # A stage runs when it has not finished and no stage after it has (a resumed round picks up where it
            # stopped; a stage added by a --force change of settings does not re-open a round already trained).
            if not is_done(r.dir, name) and not any(is_done(r.dir, later) for later, _ in stages[k + 1 :]):
                mark_done(r.dir, name, stage(r))
            if name == "guard" and is_done(r.dir, "guard"):
                stopped = verdict(r)
                if stopped:
                    break
        if stopped:
            console.print(f"[yellow]guard:[/yellow] {escape(stopped)}")
            break
        metrics = stage_metrics(r.dir)
        atomic_write_json(r.dir / "metrics.json", metrics)
        history.append({"round": i, **metrics})
        console.print(round_table(i, metrics))
    last = len(history) - 1
    final, why = last, "the last round (guard.select = last: the paper's loop)"
    if stopped:
        why = stopped
    elif cfg.guard.select == "guard":
        why = "the last round: every round's self-labels passed the guard"
    selection = None
    if cfg.guard.select not in ("last", "guard"):
        selection = select_by_judge(cfg, run_dir, backend, Path(inputs.model_dir), last, progress)
        final = selection["round"]
        why = (f"round {final} scored best under {cfg.guard.select} on {selection['prompts']} held-out prompts ("
               + ", ".join(f"round {k}: {v:.3f}" for k, v in selection["scores"].items()) + ")")
    console.print(f"final model: round {final}, {escape(why)}")
    summary = {
        "final_model": str((run_dir / f"round-{final}" / "model").resolve()),
        "final_round": final,
        "final_why": why,
        "selection": selection,
        "rounds": cfg.rounds,
        "config_rev": config_rev(run_dir),  # each stage's own revision is in per_round (see config-history.jsonl)
        "data": split,
        "seconds_this_session": round(time.perf_counter() - t_start, 1),
        "torch_threads": n_threads,
        "per_round": history,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def round_table(i: int, m: dict) -> Table:
    t = Table(title=f"round {i}" + (" (seed DPO)" if i == 0 else ""), title_justify="left", show_header=True)
    for col in ("stage", "items", "seconds", "throughput", "details"):
        t.add_column(col)
    sampled, judged, trained, merged = (m.get(k, {}) for k in ("sample", "judge", "train", "merge"))
    guard, consistency = m.get("guard", {}), m.get("consistency", {})
    if sampled:
        t.add_row("sample", f"{sampled['prompts']} prompts", _fmt(sampled.get("seconds"), ".1f"), f"{_fmt(sampled.get('tokens_per_s'), '.0f')} tok/s",
                  f"mean length {sampled['mean_response_tokens']:.1f} tokens")
    if judged:
        extra = f", gold agreement {judged['gold_agreement']:.2f}" if "gold_agreement" in judged else ""
        signals = f", p(chosen) {_fmt(judged.get('mean_p_chosen'), '.2f')}, distinct {_fmt(judged.get('distinct_samples'), '.2f')}"
        t.add_row("judge", f"{judged['pairs']} pairs", _fmt(judged.get("seconds"), ".1f"), f"{_fmt(judged.get('sequences_per_s'), '.0f')} seq/s",
                  f"dropped {judged['dropped_identical']} identical or tied{signals}{extra}")
    if guard:
        t.add_row("guard", f"{judged.get('pairs', '-')} pairs", _fmt(guard.get("seconds"), ".1f"), "",
                  f"anchor agreement {guard['anchor_agreement']:.2f} (stop below {guard['threshold']:.2f})")
    if consistency:
        t.add_row("consistency", f"{consistency['pairs']} pairs", _fmt(consistency.get("seconds"), ".1f"), "",
                  f"judges agree {consistency['mean_consistency']:.2f} (CREAM, {consistency['mode']}), mean smoothing {consistency['mean_smoothing']:.3f}")
    if trained:
        t.add_row("train", f"{trained.get('pairs', '-')} pairs", _fmt(trained.get("seconds"), ".1f"), f"{_fmt(trained.get('pairs_per_s'), '.1f')} pairs/s",
                  f"loss {_fmt(trained.get('loss_start'))} -> {_fmt(trained.get('loss_end'))}, margin {_fmt(trained.get('mean_margin'))}, "
                  f"smoothed {_fmt(trained.get('frac_smoothed'), '.2f')}")
    if merged:
        t.add_row("merge", "1 model", _fmt(merged.get("seconds"), ".1f"), "", f"{merged['model_bytes'] / 1e6:.1f} MB")
    return t
