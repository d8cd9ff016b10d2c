"""The SPA rounds, top to bottom (docs/method.md, "The loop"; arXiv 2406.04412).

    round 0:      train (DPO on the seed pairs, reference = pi_init) -> merge                        => pi_0
    round i>=1:   sample (pi_{i-1}) -> judge (pi_{i-1} vs pi_init) [-> guard] [-> consistency] [-> reference]
                  -> train (LoRA DPO from pi_{i-1}) -> merge                                         => pi_i

Every stage has one shape (stage.py: `stage(Round) -> metrics`) and lives in its own module; this file only orders
them (round_stages), skips finished ones, stops where the round guard says so, and names the model that ships. Each
stage writes its outputs atomically, then the loop marks it done, so a run killed anywhere resumes with `--resume` at
the first unfinished stage and reaches the same result.

Resume checks before it skips (docs/method.md, "Resume"): a finished stage counts only while its outputs
(STAGE_OUTPUTS) are there and whole; a round whose model/ is finished and whole needs nothing else of its folder, so
only an unfinished round is looked into stage by stage. A stage whose outputs or done-marker are missing or damaged
is redone, saying so; its marker keeps a digest of its outputs, and when the redone stage makes other bytes than
before (or the old ones are unknown), every later stage of the round is redone, and when that changes the round's
model, every later round too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from selfie_lite import rss
from selfie_lite.config import RunConfig
from selfie_lite.distributed import barrier, is_main, on_main
from selfie_lite.errors import RunError
from selfie_lite.guard import guard_stage, select_by_scorer, verdict
from selfie_lite.inputs import Inputs, prepare_data
from selfie_lite.judge import judge_stage
from selfie_lite.merge import merge_stage
from selfie_lite.numerics import resolve_threads, torch_threads
from selfie_lite.reference import reference_stage
from selfie_lite.report import round_table
from selfie_lite.robust import anchor_stage, consistency_stage
from selfie_lite.rundir import (
    atomic_write_json,
    config_rev,
    file_problem,
    is_done,
    mark_done,
    marker,
    outputs_digest,
    outputs_problem,
    read_marker,
    remove_outputs,
    remove_stale_tmp_files,
    stage_metrics,
)
from selfie_lite.sample import sample_stage
from selfie_lite.stage import NULL_PROGRESS, Round
from selfie_lite.train import train_stage


def run_rounds(cfg: RunConfig, run_dir: Path, backend, inputs: Inputs, console: Console, progress=None,
               split=None) -> dict:
    threads = resolve_threads(cfg.threads, inputs.model_dir, backend.device)
    with torch_threads(threads) as n_threads:
        return _run_rounds(cfg, run_dir, backend, inputs, console, progress, split, n_threads)


def round_stages(cfg: RunConfig, i: int) -> list[tuple[str, Callable[[Round], dict]]]:
    """Round i's stages, in order (docs/method.md, "The loop"). Each takes the Round and returns its metrics."""
    if i == 0:
        return [("train", train_stage), ("merge", merge_stage)]  # the seed DPO
    stages = [("sample", sample_stage)]
    if cfg.robust.anchor_rejected and i >= 2:
        stages.append(("anchor", anchor_stage))  # pi_0's samples: the rejected side (robust.anchor_rejected)
    stages.append(("judge", judge_stage))
    if cfg.guard.select == "guard" and i >= cfg.guard.from_round:
        stages.append(("guard", guard_stage))
    if cfg.robust.consistency != "off" and i >= 2:
        stages.append(("consistency", consistency_stage))
    if cfg.robust.train_reference == "sft":
        stages.append(("reference", reference_stage))
    return stages + [("train", train_stage), ("merge", merge_stage)]


# What each stage leaves in round-<i>/ for the stages after it (and the next rounds: model/), as glob patterns: each
# must match, and every file must parse (rundir.outputs_problem); their digest goes into the done-marker.
STAGE_OUTPUTS = {
    "sample": ("samples/chunk-*.jsonl",),
    "anchor": ("anchor/samples/chunk-*.jsonl",),
    "judge": ("judged.jsonl", "reference_logps.json"),
    "guard": (),  # its measurement is the marker itself
    "consistency": ("consistency.json",),
    "reference": ("train_reference_logps.json",),
    "train": ("adapter/adapter_config.json", "adapter/*.safetensors", "pairs.jsonl"),
    "merge": ("model/config.json", "model/tokenizer_config.json", "model/*.safetensors"),
}
# Work a stage keeps while it runs, reused by a resumed stage: a damaged file is deleted (saying so) and made again.
STAGE_CACHES = {
    "sample": ("samples/chunk-*.jsonl",),
    "anchor": ("anchor/samples/chunk-*.jsonl",),
    "judge": ("policy_logps.json", "reference_logps.json"),
    "guard": ("logps-round-0.json",),
    "consistency": ("logps-round-*.json",),
}


def _problem(r: Round, name: str, m: dict) -> str | None:
    """Why finished stage `name` of round r cannot be skipped (its outputs are missing or damaged), or None."""
    why = outputs_problem(r.dir, STAGE_OUTPUTS[name])
    if why is None and name == "sample":
        # Every chunk is whole; are they all there? The marker counts the prompts the stage sampled.
        rows = sum(1 for f in r.dir.glob("samples/chunk-*.jsonl") for line in f.open() if line.strip())
        if rows != m.get("prompts", rows):
            why = f"samples/ holds {rows} of {m['prompts']} prompts"
    return why


def _drop_damaged_caches(r: Round, name: str, say) -> None:
    """Delete what a stage kept of an earlier attempt that does not parse, so that the stage makes it again.
    say: None when the redo was announced already."""
    for pattern in STAGE_CACHES.get(name, ()):
        for f in sorted(r.dir.glob(pattern)):
            why = file_problem(f)
            if why:
                if say is not None:
                    say(f"{r.dir.name} {name}: {f.relative_to(r.dir)} {why}; making it again")
                f.unlink()


def _invalidate(r: Round, name: str) -> None:
    """Stage `name` of round r will be redone from inputs that changed: its marker, outputs and caches go."""
    marker(r.dir, name).unlink(missing_ok=True)
    remove_outputs(r.dir, STAGE_OUTPUTS[name] + STAGE_CACHES.get(name, ()))


def _run_round(r: Round, stages, inputs_changed: bool, say) -> tuple[bool, str | None]:
    """Run round r's unfinished stages, and the finished ones whose outputs are gone or damaged. inputs_changed: an
    earlier round's model was made again with other weights, so the whole round is redone. Returns (whether the
    round's model was made anew with other bytes than before, the guard's verdict when it stops the run).

    Under a launcher (distributed.py) every process runs every stage (each does its share of the work), but only the
    main process reads the run folder to decide what runs and writes the markers; the others are told its decisions
    (on_main), which also holds them until the main process's writes are done."""
    names = [n for n, _ in stages]

    def redo_from(k: int, why: str) -> None:
        if any(marker(r.dir, n).exists() for n in names[k:]):
            say(why)
        for n in names[k:]:
            _invalidate(r, n)

    def stop() -> str | None:
        return verdict(r) if "guard" in names and is_done(r.dir, "guard") else None

    def finished() -> bool:
        if inputs_changed:
            redo_from(0, f"{r.dir.name}: it starts from a model that was made again with other weights; redoing the round")
            return False
        m = read_marker(r.dir, names[-1])
        whole = all(read_marker(r.dir, n) is not None for n in names if marker(r.dir, n).exists())
        # A finished round (every marker readable, the model whole): its model is all that later rounds and the
        # user need of it, so its other outputs are not checked (deleted adapters do not retrain a round).
        return m is not None and whole and _problem(r, names[-1], m) is None

    if on_main(finished):
        return False, on_main(stop)
    changed = inputs_changed
    for k, (name, stage) in enumerate(stages):

        def decide(k=k, name=name) -> tuple[bool, bool, str | None]:
            m = read_marker(r.dir, name)
            redo, old = False, None  # a finished stage redone; the digest of what it made before (None: unknown)
            if m is not None:
                why = _problem(r, name, m)
                run = redo = why is not None
                old = m.get("outputs_sha256")
            elif marker(r.dir, name).exists():
                why = f"done/{name}.json " + (file_problem(marker(r.dir, name)) or "is not a stage's record")
                run = redo = True
                if outputs_problem(r.dir, STAGE_OUTPUTS[name]) is None:
                    old = outputs_digest(r.dir, STAGE_OUTPUTS[name])  # the outputs are whole: the redo must make them
            else:
                # Not finished: it runs, unless a later stage has finished (a stage added by a --force change of
                # settings does not re-open a round already trained).
                run = not any(is_done(r.dir, later) for later in names[k + 1 :])
            if redo:
                say(f"{r.dir.name} {name}: {why}; redoing the stage")
            if run:
                _drop_damaged_caches(r, name, None if redo else say)
            return run, redo, old

        run, redo, old = on_main(decide)
        if run:
            measured = rss.reset_peak()
            metrics = stage(r)  # every process: its share of the work (distributed.py); the main process writes
            metrics["peak_rss_mb"] = rss.peak_mb() if measured else None  # this stage's own peak (rss.py)

            def record(k=k, name=name, metrics=metrics, redo=redo, old=old) -> bool:
                digest = outputs_digest(r.dir, STAGE_OUTPUTS[name])
                mark_done(r.dir, name, metrics, digest)
                if redo and old != digest:
                    # Other bytes than before (or the old ones are unknown): what was made from them is stale.
                    redo_from(k + 1, f"{r.dir.name} {name}: redone with other results than before; redoing the "
                                     "stages after it")
                    return True
                return False

            changed = on_main(record) or changed
        stopped = on_main(stop) if name == "guard" else None
        if stopped:
            return False, stopped
    return changed, None


def _run_rounds(cfg: RunConfig, run_dir: Path, backend, inputs: Inputs, console: Console, progress, split,
                n_threads: int) -> dict:
    t_start = time.perf_counter()

    def setup():
        remove_stale_tmp_files(run_dir)  # what a writer killed mid-write left (kill -9 runs no clean-up)
        return prepare_data(cfg, run_dir, inputs, split)

    split = on_main(setup)

    def say(line: str) -> None:
        console.print(f"[yellow]resume:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)

    history = []
    stopped = None
    model_changed = False  # an earlier round's model was made again with other weights: later rounds are redone
    for i in range(cfg.rounds + 1):
        r = Round(cfg, run_dir, i, backend, Path(inputs.model_dir), inputs.gold, progress or NULL_PROGRESS)
        on_main(lambda r=r: r.dir.mkdir(parents=True, exist_ok=True))
        changed, stopped = _run_round(r, round_stages(cfg, i), model_changed, say)
        model_changed = model_changed or changed
        if stopped:
            console.print(f"[yellow]guard:[/yellow] {escape(stopped)}")
            break
        metrics = stage_metrics(r.dir)
        if is_main():
            atomic_write_json(r.dir / "metrics.json", metrics)
        history.append({"round": i, **metrics})
        console.print(round_table(i, metrics))
        if hasattr(r.progress, "round_done"):
            r.progress.round_done(i, metrics)  # --report-to
    last = len(history) - 1
    final, why = last, "the last round (guard.select = last: the paper's loop)"
    if stopped:
        why = stopped
    elif cfg.guard.select == "guard":
        why = "the last round: every round's self-labels passed the guard"
    selection = None
    if cfg.guard.select not in ("last", "guard"):
        selection = on_main(lambda: select_by_scorer(cfg, run_dir, backend, Path(inputs.model_dir), last, progress))
        final = selection["round"]
        why = (f"round {final} scored best under {cfg.guard.select} on {selection['prompts']} held-out prompts ("
               + ", ".join(f"round {k}: {v:.3f}" for k, v in selection["scores"].items()) + ")")
    # Never name a model that is not there (the loop has just checked or made every round's model).
    why_missing = outputs_problem(run_dir / f"round-{final}", STAGE_OUTPUTS["merge"])
    if why_missing:
        raise RunError(f"round {final}'s model cannot be shipped: round-{final}/{why_missing}",
                       hint=f"selfie-lite run --resume {run_dir} makes it again")
    # The guard's verdict was printed once above; here only which round ships.
    console.print(f"final model: round {final}" + (" (the round guard stopped the run)" if stopped else f", {escape(why)}"))
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
    if is_main():
        atomic_write_json(run_dir / "summary.json", summary)
        _write_card(run_dir, cfg, summary, console)
    barrier()
    return summary


def _write_card(run_dir: Path, cfg: RunConfig, summary: dict, console: Console) -> None:
    """The shipped model's README.md (card.py). Not a stage: the run has finished when it is written, so a failure
    to write it (a full disk) is a warning, and the next --resume or eval writes it."""
    from selfie_lite.card import write_card
    from selfie_lite.config import to_dict

    try:
        write_card(run_dir, to_dict(cfg), summary)
    except OSError as e:
        console.print(f"[yellow]warning:[/yellow] the model card was not written: {escape(str(e))}")
