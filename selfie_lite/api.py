"""The Python API: what `selfie-lite run` does, for notebooks, scripts and the benchmarks. The CLI is one client of it
(it adds flag parsing, resume-with-other-settings checks and printing).

    from selfie_lite import api
    from selfie_lite.config import load_config

    cfg = load_config("tiny", overrides=[{"rounds": 2}])     # or a TOML file, or RunConfig() for the defaults
    summary = api.run(cfg, "runs/tiny")                       # the whole loop; summary["final_model"] ships
    summary = api.run(None, "runs/tiny", resume=True)         # continue a run where it stopped

`prepare` checks everything (model, chat template, data rows, split sizes) before a file is written; `execute` takes
the run folder's lock, writes config.json and runs the rounds. Errors are selfie_lite.errors.UserError (bad input,
nothing written) and RunError (the run stopped; finished stages are kept, resume continues them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from selfie_lite.config import RunConfig
from selfie_lite.errors import UserError


@dataclass
class Prepared:
    """A run that passed every check and has not written anything yet."""

    cfg: RunConfig
    run_dir: Path
    resume: bool
    backend: Any
    backend_why: str  # why this backend (auto: which packages and devices were found)
    sampler_why: str
    inputs: Any  # inputs.Inputs: pi_init's folder, the data source, the oracle where one exists
    split: Any  # data.Split of a new run (None on resume: the run folder holds its split)


def prepare(cfg: RunConfig | None, run_dir: str | Path, *, resume: bool = False, console: Console | None = None,
            unique: bool = False) -> Prepared:
    """Everything that can be wrong with the input, checked before a weight loads or a file is written: the
    settings, the model folder (or hub id while offline), its chat template, every data row, the split sizes; on
    resume, that the SFT model is the one the run started from. cfg None on resume: the run's saved settings.
    unique=True: run_dir is a default name (runs/<timestamp>) that the caller claims afresh (rundir.claim_run_dir)
    once this has passed, so an existing run there is not an error."""
    from selfie_lite.backends import get_backend
    from selfie_lite.config import from_dict, validate
    from selfie_lite.inputs import check_resume_sft, preflight, resolve_inputs
    from selfie_lite.rundir import read_json
    from selfie_lite.sampler_vllm import get_sampler

    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir} is not a selfie-lite run folder (no config.json)")
        cfg = cfg or from_dict(read_json(run_dir / "config.json"))
    elif cfg is None:
        from selfie_lite.config import load_config

        cfg = load_config("tiny")
    elif (run_dir / "config.json").is_file() and not unique:
        raise UserError(f"{run_dir} already holds a run", hint=f"continue it with resume (--resume {run_dir})")
    validate(cfg)
    backend, backend_why = get_backend(cfg)
    _, sampler_why = get_sampler(cfg.sample.sampler, backend, cfg)
    if resume:
        check_resume_sft(run_dir, cfg.model or None)  # the SFT model the run started from, before anything resolves
    inputs = resolve_inputs(cfg, console)
    if resume and not cfg.model:
        check_resume_sft(run_dir, inputs.model_dir)  # the tiny preset's model, known once resolved
    split = None if resume else preflight(cfg, backend, inputs)
    return Prepared(cfg, run_dir, resume, backend, backend_why, sampler_why, inputs, split)


def execute(p: Prepared, *, console=None, progress=None, before=None, on_takeover=None) -> dict:
    """Take the run folder's lock, write config.json, run the rounds (loop.run_rounds), return summary.json's
    content. console: anything with .print (the round tables and verdicts; default: the progress reporter, else
    nowhere). progress: a progress reporter, or a callable returning a context manager that yields one (entered
    once config.json is written, as the CLI's live display is). before(): called once the lock is held, before
    config.json is written (the CLI keeps the settings a --force resume replaces, and prints its start lines)."""
    import contextlib

    from selfie_lite.config import to_dict
    from selfie_lite.loop import run_rounds
    from selfie_lite.rundir import RunLock, atomic_write_json, ctrl_c_noted

    with RunLock(p.run_dir, on_takeover=on_takeover), ctrl_c_noted():
        if before is not None:
            before()
        atomic_write_json(p.run_dir / "config.json", to_dict(p.cfg))
        reporting = progress() if callable(progress) else contextlib.nullcontext(progress)
        with reporting as reporter:
            out = console or reporter or Console(quiet=True)
            return run_rounds(p.cfg, p.run_dir, p.backend, p.inputs, out, reporter, p.split)


def run(cfg: RunConfig | None = None, run_dir: str | Path = "runs/api", *, resume: bool = False,
        console: Console | None = None) -> dict:
    """The whole SPA loop (docs/method.md, "The loop") in run_dir, or its continuation with resume=True; returns
    summary.json's content (final_model, final_round, final_why, per_round metrics). console: where the round
    tables go (default: nowhere)."""
    return execute(prepare(cfg, run_dir, resume=resume, console=console), console=console)
