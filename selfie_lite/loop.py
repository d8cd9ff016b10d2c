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
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from selfie_lite.config import RunConfig
from selfie_lite.guard import guard_stage, select_by_scorer, verdict
from selfie_lite.inputs import Inputs, prepare_data
from selfie_lite.judge import judge_stage
from selfie_lite.merge import merge_stage
from selfie_lite.numerics import resolve_threads, torch_threads
from selfie_lite.report import round_table
from selfie_lite.robust import consistency_stage
from selfie_lite.rundir import (
    atomic_write_json,
    config_rev,
    is_done,
    mark_done,
    stage_metrics,
)
from selfie_lite.sample import sample_stage
from selfie_lite.stage import NULL_PROGRESS, Round
from selfie_lite.train import reference_stage, train_stage


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
        selection = select_by_scorer(cfg, run_dir, backend, Path(inputs.model_dir), last, progress)
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
