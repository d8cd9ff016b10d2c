"""`selfie-lite judge`, `eval` and `report`: Typer command functions, registered in cli.COMMANDS. torch loads inside
the commands, so `selfie-lite --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfie_lite.console import console, err_console, esc, friendly_errors, json_output
from selfie_lite.errors import UserError


def _parse_rounds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--rounds {text!r}: expected round numbers separated by commas, e.g. 0,3") from None


@friendly_errors
def eval_cmd(
    targets: Annotated[list[Path], typer.Argument(help="A run folder (evaluates the SFT model and every round's model) or one or more model folders.")],
    scorer: Annotated[str | None, typer.Option("--scorer", help="What scores the responses: oracle (tiny preset), ifeval (smol preset: instructions met), reward-model:PATH (a local sequence-classification reward model) or python:MODULE:FUNCTION (your scorer f(prompt, response) -> float; MODULE: a dotted module or a .py file). Default: oracle on tiny-preset prompts, else none (no win rates).")] = None,
    baseline: Annotated[Path | None, typer.Option("--baseline", help="Model folder to compare against. Default: the run's SFT model (the tiny preset's for model folders).")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="Prompts (.jsonl or .json; a \"prompt\" or \"instruction\" field). Default: the tiny preset's held-out eval prompts, else the run's test-split prompts.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N prompts.")] = None,
    samples_per_prompt: Annotated[int, typer.Option("--samples-per-prompt", help="Responses per prompt and model.")] = 1,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Sampling temperature. Default: the run's sample.temperature (0.7).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Default: the run's sample.max_new_tokens.")] = None,
    random_seed: Annotated[int, typer.Option("--random-seed", help="Sampling seed, the same for every model.")] = 0,
    rounds: Annotated[str | None, typer.Option("--rounds", help="Only these rounds of a run, e.g. 0,3.")] = None,
    pairs: Annotated[Path | None, typer.Option("--pairs", help="Held-out labelled pairs (JSONL prompt/chosen/rejected) for seed-pair accuracy. Default: the run's data/test.jsonl.")] = None,
    export: Annotated[str | None, typer.Option("--export", help="alpaca-eval: also write each model's outputs in AlpacaEval's model_outputs JSON format.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where eval.json and outputs go. Default: the run folder, or eval/ for model folders.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Prompts per generate() call and sequences per scoring pass.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print eval.json to stdout (the table goes to stderr).")] = False,
):
    """Compare models against a baseline on held-out prompts: win rate (ties count half) and mean score under an
    external scorer, seed-pair accuracy of the implicit reward, self-label gold agreement per round, mean response length.

    Examples:

      selfie-lite eval runs/tiny                    # every round of a tiny-preset run, oracle scorer

      selfie-lite eval runs/zephyr --scorer reward-model:./Skywork-Reward-Llama-3.1-8B-v0.2 --limit 500

      selfie-lite eval runs/zephyr --export alpaca-eval --prompts alpaca_eval.json

      selfie-lite eval runs/math --scorer python:./checks.py:score   # checks.py: def score(prompt, response) -> float
    """
    from selfie_lite import api
    from selfie_lite.progress import Reporter
    from selfie_lite.validate import check_range

    if temperature is not None:  # inf passes plan_eval's "> 0" and would sample from a flat distribution
        check_range("sample.temperature", temperature, "temperature")
    with err_console.status("checking the inputs (and building the tiny preset if it is not cached: 1-2 minutes, once)"):
        plan = api.plan_evaluation(
            targets, scorer=scorer, baseline=baseline, prompts=prompts, limit=limit,
            samples_per_prompt=samples_per_prompt, temperature=temperature, max_new_tokens=max_new_tokens,
            random_seed=random_seed, rounds=_parse_rounds(rounds), pairs=pairs, export=export, out=out,
            batch_size=batch_size)
    err_console.print(esc(plan.describe()), highlight=False, soft_wrap=True)
    with Reporter(err_console) as progress:
        done = api.evaluate(plan, progress=progress)
    from selfie_lite.report import eval_table

    with json_output(as_json) as emit:
        console.print(eval_table(_escaped_eval(done.result)))
        if done.export_files:
            paths = done.export_files
            console.print(f"AlpacaEval outputs: {esc(paths[0].parent)}/ ({len(paths)} files). Score one with:\n"
                          f"  alpaca_eval --model_outputs {esc(paths[-1])}", highlight=False, soft_wrap=True)
        console.print(f"wrote {esc(done.eval_file)}", highlight=False, soft_wrap=True)
        emit(done.result)


def _escaped_eval(result: dict) -> dict:
    """eval.json with the user's strings (model folder names, baseline path, scorer spec) escaped for the Rich table."""
    s = result["settings"]
    return {**result, "settings": {**s, "baseline": esc(s["baseline"]), "scorer": esc(s["scorer"]) if s["scorer"] else s["scorer"]},
            "models": {esc(k): v for k, v in result["models"].items()}}


@friendly_errors
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder made by `selfie-lite run`.")],
    png: Annotated[Path | None, typer.Option("--png", help="Where to write the figure. Default: RUN_DIR/report.png.")] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Only the table, no figure.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every round's metrics and the eval as JSON to stdout (the tables go to stderr).")] = False,
):
    """A table per round (pairs, gold agreement, smoothing, loss, margins, length, eval win rate) and a PNG: win
    rate per round, fraction smoothed, margins of smoothed vs kept pairs, response length.

    Examples:

      selfie-lite report runs/tiny

      selfie-lite report runs/tiny --png report.png
    """
    from selfie_lite.report import collect, eval_table, report_table
    from selfie_lite.rundir import is_run_dir

    if run_dir.is_file():
        raise UserError(f"{run_dir} is a file, expected a run folder")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist")
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a selfie-lite run folder (no config.json and round-* folders)")
    if not no_plot:
        from selfie_lite.paths import check_writable

        check_writable(png or run_dir / "report.png", "png" if png else None, kind="file", what="" if png else "the figure (or pass --png)")
    data = collect(run_dir)
    if not data["rounds"]:
        raise UserError(f"{run_dir} has no round with metrics yet", hint=f"continue it: selfie-lite run --resume {run_dir}")
    with json_output(as_json) as emit:
        console.print(report_table({**data, "run_dir": esc(data["run_dir"])}))
        if data.get("eval") is not None:
            console.print(eval_table(_escaped_eval(data["eval"])))
        else:
            console.print(f"[dim]no eval.json: run `selfie-lite eval {esc(run_dir)}` for win rates[/dim]", highlight=False)
        png_path = None if no_plot else _plot(data, png, run_dir)
        emit({"run_dir": str(run_dir.resolve()), "config": data["config"], "eval": data["eval"],
              "rounds": [{"round": r["round"], "metrics": r["metrics"]} for r in data["rounds"]],
              "png": str(png_path.resolve()) if png_path else None})


def _plot(data: dict, png: Path | None, run_dir: Path) -> Path | None:
    from selfie_lite.report import plot_report

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        # A default install has it (pyproject); a broken or trimmed environment may not.
        if png is not None:
            raise UserError("--png needs matplotlib, which is not installed", hint="pip install matplotlib") from None
        console.print("[dim]no figure: matplotlib is not installed (pip install matplotlib)[/dim]")
        return None
    path = plot_report(data, png or run_dir / "report.png")
    console.print(f"wrote {esc(path)}", highlight=False, soft_wrap=True)
    return path



@friendly_errors
def judge_cmd(
    input_file: Annotated[Path, typer.Argument(help="JSONL: {\"prompt\": str, \"responses\": [str, str, ...]} per line.")],
    policy: Annotated[str, typer.Option("--policy", help="Policy model folder (the model that judges).")],
    reference: Annotated[str, typer.Option("--reference", help="Reference model folder (the SFT model in SPA).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the labelled pairs (JSONL).")] = Path("pairs.jsonl"),
    beta: Annotated[float, typer.Option("--beta", help="DPO temperature (paper 0.1).")] = 0.1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")] = 32,
    chat_template: Annotated[str | None, typer.Option("--chat-template", help="Jinja chat template file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts and the output path as JSON to stdout.")] = False,
):
    """Label responses with a model's implicit DPO reward against a reference: r = beta * (log pi - log ref).

    Example:

      selfie-lite judge responses.jsonl --policy runs/x/round-1/model --reference my-sft-model -o pairs.jsonl
    """
    from selfie_lite import api
    from selfie_lite.paths import check_writable
    from selfie_lite.progress import Reporter
    from selfie_lite.rundir import atomic_write_jsonl

    check_writable(output, "output", kind="file")
    with Reporter(err_console) as progress:
        pairs, drops = api.judge(input_file, policy, reference, beta=beta, batch_size=batch_size,
                                 chat_template=chat_template, progress=progress)
    atomic_write_jsonl(output, pairs)
    with json_output(as_json) as emit:
        console.print(f"wrote {len(pairs)} pairs to {esc(output)} (dropped {drops['dropped_identical']} identical or "
                      f"tied, {drops['dropped_empty_chosen']} with an empty chosen response)", highlight=False)
        emit({"output": str(output.resolve()), "pairs": len(pairs), **drops})
