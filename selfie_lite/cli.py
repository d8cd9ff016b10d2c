"""The `selfie-lite` command. Flags become a config, the config becomes a run; this is the only place where
errors become exit codes (2: bad input, 1: the run failed, 130: interrupted). torch loads inside commands, so
`selfie-lite --help` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from selfie_lite import __version__, cli_eval, cli_export, cli_tiny, compat, doctor
from selfie_lite.config import Backend, Sampler, choices
from selfie_lite.console import (
    STATE,
    console,
    err_console,
    esc,
    friendly_errors,
    json_output,
    one_line_usage_errors,
    quiet_unless_main,
)
from selfie_lite.errors import RunError, UserError
from selfie_lite.tracking import KINDS

# The only place that knows flags: an error about a setting (UserError.key, a config key or an api option) names the
# flag that sets it. Settings without a flag of their own are named by their key (--set KEY=VALUE sets them).
FLAGS = {
    "data.labelled_share": "--seed", "model": "--model", "data.source": "--data", "rounds": "--rounds",
    "random_seed": "--random-seed", "backend": "--backend", "sample.sampler": "--sampler", "guard.select": "--select-by",
    "load_in_4bit": "--load-in-4bit", "beta": "--beta", "chat_template": "--chat-template",
    "trust_remote_code": "--trust-remote-code",
    # `eval` and `judge` (api.evaluate / api.judge options)
    "scorer": "--scorer", "baseline": "--baseline", "prompts": "--prompts", "limit": "--limit",
    "samples_per_prompt": "--samples-per-prompt", "temperature": "--temperature", "max_new_tokens": "--max-new-tokens",
    "pairs": "--pairs", "export": "--export", "out": "--out", "batch_size": "--batch-size", "resume": "--resume",
    "output": "--output", "gguf": "--gguf", "modelfile": "--modelfile", "png": "--png", "outtype": "--outtype", "repo": "--repo",
}
STATE["flags"] = FLAGS


class _Commands(TyperGroup):
    """`--debug` belongs to the app, but the error hint tells users to append it ("run again with --debug"): accept
    it after the command too, by moving it to the front (never past a `--`). Usage errors (a bad flag value, a
    misspelt flag or command) are one `error:` line like every other error, not Typer's box: the app's own parsing
    happens in make_context, a command's (and a sub-app's) inside invoke."""

    def parse_args(self, ctx, args):
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[1:end]:
            args = ["--debug", *(a for i, a in enumerate(args) if not (a == "--debug" and i < end))]
        return super().parse_args(ctx, args)

    def make_context(self, *args, **kwargs):
        with one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        # Some parser errors ("Option '--seed' requires an argument.") carry no context: name the command here.
        rest = [*(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", None) or []), *ctx.args]
        sub = rest[0] if rest and self.get_command(ctx, rest[0]) is not None else None
        with one_line_usage_errors(f"{ctx.command_path} {sub}" if sub else ctx.command_path):
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Commands,
    name="selfie-lite",
    help="Align a chat model from a small labelled preference set with Spread Preference Annotation (SPA).\n\n"
    "Examples:\n\n"
    "  selfie-lite run --seed 3.3pct                  # the built-in tiny preset, on a CPU, in minutes\n\n"
    "  selfie-lite run --preset zephyr-7b --seed 3.3pct   # the paper's setting on one GPU\n\n"
    "  selfie-lite run --resume runs/20261126-120000  # continue an interrupted run",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)

def _version(value: bool):
    if value:
        console.print(f"selfie-lite {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
):
    STATE["debug"] = debug
    compat.silence_is_gradient_checkpointing_warning()


# -------------------------------------------------------------------------------------------------
# run


def build_config(preset, config_file, seed, model, data, rounds, random_seed, backend, load_in_4bit, beta,
                 chat_template, trust_remote_code, sets, sampler=None, base: dict | None = None):
    """The run's settings from the flags. base: the saved config.json of a resumed run, which the flags then change
    (so `--resume DIR --set k=v --force` changes k alone, not every setting that the flags do not repeat)."""
    from selfie_lite.config import absolute_paths, load_config, parse_override, preset_for

    overrides = [parse_override(s) for s in sets or []]
    flat = {
        "model": model, "rounds": rounds, "random_seed": random_seed, "backend": backend, "beta": beta,
        "chat_template": chat_template,
    }
    direct: dict = {k: v for k, v in flat.items() if v is not None}
    if load_in_4bit:
        direct["load_in_4bit"] = True
    if trust_remote_code:
        direct["trust_remote_code"] = True
    data_over = {k: v for k, v in {"labelled_share": seed, "source": data}.items() if v is not None}
    if data_over:
        direct["data"] = data_over
    if sampler is not None:
        direct["sample"] = {"sampler": sampler}
    if chat_template and Path(chat_template).is_dir():
        raise UserError(f"--chat-template {chat_template} is a folder, expected a Jinja template file")
    if chat_template and not Path(chat_template).is_file():
        raise UserError(f"--chat-template {chat_template}: no such file")
    overrides.append(direct)
    preset = preset_for(preset, config_file, overrides, base)
    return absolute_paths(load_config(preset, config_file, overrides, base=base)), preset


ReportTo = StrEnum("ReportTo", {kind: kind for kind in KINDS})  # tracking.ReportTo's words, as Typer's choices


@friendly_errors
def run(
    seed: Annotated[str | None, typer.Option("--seed", help="Labelled share of the preference set kept as human pairs: 3.3pct, 3.3% or a count (2000).")] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="A preset from examples/: tiny, smol (SmolLM2-135M-Instruct on a CPU), zephyr-7b, qwen-colab.")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="A TOML file of settings (see examples/).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="SFT model: local folder, hub id, .gguf file (converted once, cached) or builtin:smollm2. Default: the tiny preset.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Preference set: hub name, .jsonl/.parquet or save_to_disk folder.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder. Default: runs/\\<timestamp>.")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this folder where it stopped.")] = None,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept settings that differ from the saved ones.")] = False,
    rounds: Annotated[int | None, typer.Option("--rounds", help="Self-labelling rounds T (paper 3).")] = None,
    random_seed: Annotated[int | None, typer.Option("--random-seed", help="Random seed for shuffling, sampling and training.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help=f"{', '.join(choices(Backend))}.")] = None,
    sampler: Annotated[str | None, typer.Option("--sampler", help=f"{', '.join(choices(Sampler))} (default generate).")] = None,
    select_by: Annotated[str | None, typer.Option("--select-by", help="Which round ships: guard (default), last (the paper), or an external scorer: oracle (tiny), ifeval (smol), python:MODULE:FUNCTION, reward-model:PATH (the round it scores best on held-out prompts). Same as --set guard.select=...")] = None,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="QLoRA: load weights in 4-bit (bitsandbytes).")] = False,
    beta: Annotated[float | None, typer.Option("--beta", help="DPO temperature for judge and loss (paper 0.1).")] = None,
    chat_template: Annotated[str | None, typer.Option("--chat-template", help="Jinja chat template file for models without one.")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model folder. Off unless asked.")] = False,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Any setting as KEY=VALUE, e.g. --set train.learning_rate=1e-5 (repeatable).")] = None,
    report_to: Annotated[ReportTo, typer.Option("--report-to", help="Experiment tracking: the training steps (TRL) and each round's metrics go to tensorboard (RUN/tensorboard, RUN/round-*/trainer/runs) or wandb.")] = ReportTo.none,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json to stdout at the end (everything else goes to stderr).")] = False,
):
    """Run SPA: seed DPO, then sample -> self-judge -> refine + LoRA DPO -> merge, round after round.

    Examples:

      selfie-lite run --seed 3.3pct

      selfie-lite run --preset zephyr-7b --seed 3.3pct --out runs/zephyr

      selfie-lite run --resume runs/zephyr
    """
    # Flags -> settings (build_config), every check before anything is written (api.prepare), the run (api.execute);
    # what this function adds is printing.
    from selfie_lite import api
    from selfie_lite.config import to_dict
    from selfie_lite.progress import Reporter
    from selfie_lite.tracking import Tracker, check_available
    from selfie_lite.validate import canonical_labelled_share

    t0 = time.perf_counter()
    quiet_unless_main()  # under `accelerate launch`: one process speaks (distributed.py)
    check_available(report_to.value)
    if resume is not None and out is not None:
        raise UserError("--resume and --out both name a run folder; give one", hint="--resume DIR continues DIR")
    if select_by is not None:
        sets = [*(sets or []), f"guard.select={json.dumps(select_by)}"]
    if seed is not None:
        seed = canonical_labelled_share(seed)
    given = any(v is not None for v in (seed, preset, config_file, model, data, rounds, random_seed, backend, beta,
                                        chat_template, sampler)) \
        or load_in_4bit or trust_remote_code or bool(sets)
    saved = api.saved_settings(resume) if resume is not None else None
    cfg = None  # on resume without flags: the saved settings (a change needs --force: api.prepare)
    if resume is None or given:
        cfg, preset = build_config(preset, config_file, seed, model, data, rounds, random_seed, backend, load_in_4bit,
                                   beta, chat_template, trust_remote_code, sets, sampler, base=saved)
    if not (cfg.model if cfg is not None else saved.get("model")):
        err_console.print("[cyan]No --model given: using the built-in tiny preset (a small model, task and oracle "
                          "that run on a CPU).[/cyan]")
    prepared = api.prepare(cfg, resume if resume is not None else out, resume=resume is not None, force=force,
                           console=err_console)
    cfg, run_dir = prepared.cfg, prepared.run_dir  # run_dir: the default runs/<timestamp> once claimed
    if prepared.split is not None:
        _say_data(prepared.split, prepared.inputs.data_source)
    tracker = None

    def start():
        if prepared.changes:
            _say_forced_settings(run_dir, prepared.changes, prepared.config_rev)
        _print_start(cfg, prepared.run_dir, preset, resumed=resume is not None, split=prepared.split)
        err_console.print(f"backend: [bold]{prepared.backend.name}[/bold] ({esc(prepared.backend_why)}), device: "
                          f"{prepared.backend.device}; sampler: [bold]{cfg.sample.sampler}[/bold] "
                          f"({esc(prepared.sampler_why)})")

    def reporter():
        # The loop prints its tables and verdicts through the reporter: above the live bars.
        nonlocal tracker
        tracker = None if report_to == ReportTo.none else Tracker(report_to.value, run_dir, to_dict(cfg))
        return Reporter(err_console, out=console, tracker=tracker)

    with json_output(as_json) as emit:
        try:
            summary = api.execute(prepared, progress=reporter, before=start, on_takeover=_say_takeover)
        except KeyboardInterrupt:
            err_console.print(f"[yellow]interrupted.[/yellow] Finished stages are kept. Resume with:\n"
                              f"  selfie-lite run --resume {esc(run_dir)}", highlight=False)
            raise typer.Exit(130) from None
        except (RunError, UserError) as e:
            e.hint = (e.hint + "; " if e.hint else "") + f"finished stages are kept: selfie-lite run --resume {run_dir}"
            raise
        finally:
            if tracker is not None:
                tracker.close()
        seconds = time.perf_counter() - t0
        console.print(f"[bold green]done[/bold green] in {_duration(seconds)}"
                      + (" (this session)" if resume is not None else "")
                      + (f". Final model (round {summary['final_round']})" if "final_round" in summary else ". Final model")
                      + f": {esc(summary['final_model'])}\n"
                      f"next: selfie-lite eval {esc(run_dir)}   (win rate against the SFT model; then "
                      f"selfie-lite report {esc(run_dir)})", highlight=False, soft_wrap=True)
        emit({**summary, "run_dir": str(Path(run_dir).resolve()), "seconds": round(seconds, 1)})


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _say_takeover(line: str) -> None:
    err_console.print(f"[yellow]lock:[/yellow] {esc(line)}", highlight=False, soft_wrap=True)


def _say_data(split, source: str) -> None:
    """What the preflight found in the data, before anything trains: rows skipped or dropped."""
    total = split.n_rows + split.n_bad + split.n_identical
    if split.n_bad:
        err_console.print(f"[yellow]warning:[/yellow] skipped {split.n_bad:,} invalid row(s) of {total:,} in "
                          f"{esc(source)} (within data.max_bad_rows; recorded as skipped_bad_rows in data/split.json)",
                          highlight=False, soft_wrap=True)
    if split.n_identical:
        err_console.print(f"[yellow]warning:[/yellow] {split.n_identical} of {split.n_rows + split.n_identical} rows "
                          "have chosen identical to rejected (no preference): dropped", highlight=False)


def _seed_line(cfg, run_dir: Path, split) -> str | None:
    """`labelled seed: 42 pairs (0.7% of 6,000); the random seed is --random-seed 42`: --seed is the labelled share
    (the paper's meaning), which a bare number reads as a pair count; this line says which it was."""
    if split is not None:
        n_seed, n_rows = len(split.seed_pairs), split.n_rows
    else:
        p = run_dir / "data" / "split.json"
        if not p.is_file():
            return None
        from selfie_lite.rundir import read_json

        info = read_json(p)
        n_seed, n_rows = info.get("seed_pairs"), info.get("valid_rows")
        if not n_seed or not n_rows:
            return None
    spelled = "" if str(cfg.data.labelled_share) == str(n_seed) else f", --seed {cfg.data.labelled_share}"
    return (f"labelled seed: {n_seed:,} pairs ({100 * n_seed / n_rows:.1f}% of {n_rows:,}{spelled}); "
            f"the random seed is --random-seed {cfg.random_seed}")


def _reused(run_dir: Path) -> str:
    """What a resume finds finished and will not redo."""
    from selfie_lite.rundir import round_dirs, stage_metrics

    parts = []
    if (run_dir / "data" / "split.json").is_file():
        parts.append("the data split")
    for _, d in round_dirs(run_dir):
        stages = list(stage_metrics(d))
        chunks = len(list((d / "samples").glob("chunk-*.jsonl"))) if "sample" not in stages else 0
        if chunks:
            stages.append(f"{chunks} sample chunk{'s' if chunks > 1 else ''}")
        if stages:
            parts.append(f"{d.name} ({', '.join(stages)})")
    return ("reusing " + "; ".join(parts) + "; the rest runs now") if parts else "nothing finished yet: starting over"


def _print_start(cfg, run_dir: Path, preset: str | None, resumed: bool, split=None) -> None:
    """The run folder, the settings that differ from the defaults (all of them are in config.json), the labelled
    seed, and on a resume what is reused."""
    from selfie_lite.config import RunConfig, diff_configs, to_dict

    head = f"{'resuming' if resumed else 'run'} [bold]{esc(run_dir)}[/bold]" + (f" (preset {esc(preset)})" if preset else "")
    err_console.print(head, highlight=False, soft_wrap=True)
    changed = diff_configs(to_dict(RunConfig()), to_dict(cfg))
    if changed:
        err_console.print("  settings other than the defaults:", highlight=False)
        for d in changed:
            key, _, change = d.partition(": ")
            err_console.print(f"    {esc(key)} = {esc(change.split(' -> ', 1)[-1])}", highlight=False, soft_wrap=True)
    err_console.print(f"  all settings: {esc(run_dir / 'config.json')}", highlight=False, soft_wrap=True)
    line = _seed_line(cfg, run_dir, split)
    if line:
        err_console.print(f"  {line}", highlight=False, soft_wrap=True)
    if resumed:
        err_console.print(f"  {esc(_reused(run_dir))}", highlight=False, soft_wrap=True)


def _say_forced_settings(run_dir: Path, changes: list[str], rev: int) -> None:
    """--resume --force with other settings (api.execute kept the old config as config.<rev - 1>.json): say which
    finished stages ran under which settings, since from here on the run mixes them."""
    from selfie_lite.rundir import stages_by_rev

    err_console.print(f"[yellow]settings changed (--force):[/yellow] config rev {rev - 1} -> {rev}: "
                      f"{esc('; '.join(changes))}. The old settings are kept in {esc(run_dir / f'config.{rev - 1}.json')}.",
                      highlight=False, soft_wrap=True)
    for r, stages in stages_by_rev(run_dir).items():
        err_console.print(f"  ran under config rev {r}: {', '.join(stages)}", highlight=False, soft_wrap=True)
    err_console.print(f"  unfinished stages run under config rev {rev}", highlight=False)



# Every command is a Typer function decorated with @friendly_errors, in cli.py (run) or a cli_<topic>.py module, and
# registered in this table, in the order --help lists them (docs: README, "Adding a command"). `tiny` is a group of
# its own (cli_tiny.app). Adding a command: write its function, add its line here, add a test driving it with
# CliRunner (tests/conftest.py: invoke).
COMMANDS = [
    ("run", run), ("judge", cli_eval.judge_cmd), ("eval", cli_eval.eval_cmd), ("report", cli_eval.report_cmd),
    ("export", cli_export.export_cmd), ("push", cli_export.push_cmd), ("doctor", doctor.doctor_cmd),
]
for _name, _fn in COMMANDS:
    app.command(_name)(_fn)
app.add_typer(cli_tiny.app, name="tiny")


def main():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except KeyboardInterrupt:  # outside a command (e.g. while importing torch)
        sys.exit(130)


if __name__ == "__main__":
    main()
