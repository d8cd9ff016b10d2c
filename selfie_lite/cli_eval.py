"""`selfie-lite eval` and `selfie-lite report`: Typer command functions, registered by cli.py as
app.command("eval")(cli_eval.eval_cmd) and app.command("report")(cli_eval.report_cmd). torch loads inside the
commands, so `selfie-lite --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfie_lite.console import console, err_console, esc, friendly_errors, json_output
from selfie_lite.errors import UserError


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / "data").is_dir() or any(path.glob("round-*")))


def _parse_rounds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--rounds {text!r}: expected round numbers separated by commas, e.g. 0,3") from None


def _model_names(folders: list[Path]) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for f in folders:
        name = f.name or str(f)
        if name in names or name == "baseline":
            name = f"{f.parent.name}-{f.name}"
        names[name] = f
    return names


def _check_rounds_exist(run_dir: Path, round_list: list[int], text: str) -> None:
    """--rounds naming a round that has no merged model is a typo, not a request for an SFT-only eval."""
    from selfie_lite.evaluate import run_models

    finished = [int(name.split("-")[1]) for name in run_models(run_dir)]
    missing = [r for r in round_list if r not in finished]
    if missing:
        have = ", ".join(map(str, finished)) if finished else "none yet"
        raise UserError(f"--rounds {text}: {run_dir} has no finished round {', '.join(map(str, missing))} "
                        f"(finished rounds: {have})",
                        hint=f"pick from {have}" if finished else f"finish it first: selfie-lite run --resume {run_dir}")


def _previous_eval(path: Path, record: dict) -> dict | None:
    """The eval.json a partial eval merges into, checked before any model loads: rows made with other settings
    (prompts, judge, temperature, baseline...) are not comparable, so mixing them into one table is refused."""
    from selfie_lite.rundir import read_json

    if not path.is_file():
        return None
    try:
        old = read_json(path)
    except (OSError, ValueError):
        raise UserError(f"{path} is not readable JSON, so a partial eval cannot merge into it",
                        hint="move it away, or evaluate every round (drop --rounds)") from None
    was = old.get("settings", {})
    differs = [f"{k}: {was[k]!r} -> {v!r}" for k, v in record.items() if k in was and was[k] != v]
    if differs:
        raise UserError(f"{path} holds an eval made with other settings ({'; '.join(differs)}); "
                        "--rounds would mix them in one table",
                        hint="evaluate every round again (drop --rounds), or write elsewhere with --out")
    return old


@friendly_errors
def eval_cmd(
    targets: Annotated[list[Path], typer.Argument(help="A run folder (evaluates the SFT model and every round's model) or one or more model folders.")],
    judge: Annotated[str | None, typer.Option("--judge", help="oracle (tiny preset), reward-model:PATH (a local sequence-classification reward model) or python:MODULE:FUNCTION (your scorer f(prompt, response) -> float; MODULE: a dotted module or a .py file). Default: oracle on tiny-preset prompts, else none (no win rates).")] = None,
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
    """Compare models against a baseline on held-out prompts: win rate (ties count half) and mean score under a
    judge, seed-pair accuracy of the implicit reward, self-label gold agreement per round, mean response length.

    Examples:

      selfie-lite eval runs/tiny                    # every round of a tiny-preset run, oracle judge

      selfie-lite eval runs/zephyr --judge reward-model:./Skywork-Reward-Llama-3.1-8B-v0.2 --limit 500

      selfie-lite eval runs/zephyr --export alpaca-eval --prompts alpaca_eval.json

      selfie-lite eval runs/math --judge python:./checks.py:score   # checks.py: def score(prompt, response) -> float
    """
    from selfie_lite.config import check_range, from_dict, load_config
    from selfie_lite.evaluate import (
        EvalSettings,
        export_alpaca_eval,
        load_pairs,
        load_prompts,
        merge_eval,
        parse_judge,
        run_models,
        self_label_agreement,
        settings_record,
    )
    from selfie_lite.rundir import atomic_write_json, atomic_write_jsonl, read_json

    if export not in (None, "alpaca-eval"):
        raise UserError(f"--export {export!r}: the only export format is alpaca-eval")
    if samples_per_prompt < 1:
        raise UserError("--samples-per-prompt must be at least 1")
    if temperature is not None and temperature <= 0:
        raise UserError(f"--temperature must be > 0 (evaluation samples), got {temperature}")
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1")
    # 0 would silently fall back to the run's setting (`or` below); negative values reach the sampler.
    if max_new_tokens is not None:
        check_range("sample.max_new_tokens", max_new_tokens, "--max-new-tokens")
    if batch_size is not None:
        check_range("sample.batch_size", batch_size, "--batch-size")
    check_range("random_seed", random_seed, "--random-seed")
    for t in targets:
        if not t.exists():
            raise UserError(f"{t} does not exist")
    from selfie_lite.rundir import check_writable

    if out is not None:
        check_writable(out, "--out")
    run_dir = targets[0] if len(targets) == 1 and is_run_dir(targets[0]) else None
    if run_dir is None:
        for t in targets:
            if is_run_dir(t):
                raise UserError(f"{t} is a run folder: evaluate it on its own", hint=f"selfie-lite eval {t}")
            if not (t / "config.json").is_file():
                raise UserError(f"{t} is neither a run folder nor a model folder (no config.json)")
    round_list = _parse_rounds(rounds)
    if round_list is not None and run_dir is None:
        raise UserError("--rounds applies to a run folder only")
    if round_list is not None:
        _check_rounds_exist(run_dir, round_list, rounds)

    # Settings and models, all before any weights load.
    tiny = None
    gold = None
    if run_dir is not None:
        cfg = from_dict(read_json(run_dir / "config.json"))
        uses_tiny = not cfg.model or not cfg.data.source
    else:
        cfg = None
        uses_tiny = baseline is None or prompts is None
    if uses_tiny:
        from selfie_lite.tiny.build import build_tiny
        from selfie_lite.tiny.task import score

        with err_console.status("loading the tiny preset"):
            tiny = build_tiny()
        gold = score if (run_dir is None or not cfg.data.source) else None
    if cfg is None:
        cfg = load_config("tiny") if baseline is None else from_dict({})
    sft = Path(cfg.model) if (run_dir is not None and cfg.model) else (tiny.model_dir if tiny else None)
    if run_dir is not None:
        from selfie_lite.inputs import sft_model_of

        started_from = sft_model_of(run_dir)
        if started_from is not None and Path(started_from).exists():
            sft = Path(started_from)
    base = baseline or sft
    if base is None:
        raise UserError("no baseline to compare against", hint="pass --baseline MODEL_DIR (usually the SFT model)")

    if prompts is not None:
        prompt_rows = load_prompts(prompts)
    elif tiny is not None and (run_dir is None or not cfg.data.source):
        prompt_rows = load_prompts(tiny.eval_prompts)
    elif run_dir is not None and (run_dir / "data" / "test.jsonl").is_file():
        prompt_rows = [{"prompt": r["prompt"]} for r in load_pairs(run_dir / "data" / "test.jsonl")]
    else:
        raise UserError("no prompts to evaluate on", hint="pass --prompts FILE")
    prompt_rows = prompt_rows[:limit] if limit else prompt_rows
    prompt_texts = [r["prompt"] for r in prompt_rows]

    if judge is None and gold is not None:
        from selfie_lite.evaluate import OracleJudge

        try:
            OracleJudge().check(prompt_texts)
            judge = "oracle"
        except UserError:
            judge = None
    judge_obj = parse_judge(judge)
    if judge_obj is not None:
        judge_obj.check(prompt_texts)

    pair_file = pairs or (run_dir / "data" / "test.jsonl" if run_dir is not None else None)
    labelled = load_pairs(pair_file) if pair_file is not None and (pairs is not None or pair_file.is_file()) else None

    if run_dir is not None:
        models = {"sft": Path(sft)} if sft is not None else {}
        models.update(run_models(run_dir, round_list))
        if len(models) <= 1 and not round_list:
            raise UserError(f"{run_dir} has no finished round yet", hint=f"finish it first: selfie-lite run --resume {run_dir}")
    else:
        models = _model_names(targets)
    settings = EvalSettings(
        temperature=temperature if temperature is not None else cfg.sample.temperature,
        top_p=cfg.sample.top_p,
        max_new_tokens=max_new_tokens or cfg.sample.max_new_tokens,
        samples_per_prompt=samples_per_prompt,
        random_seed=random_seed,
        batch_size=batch_size or cfg.sample.batch_size,
        beta=cfg.beta,
    )
    out_dir = out or (run_dir if run_dir is not None else Path("eval"))
    if out is None:
        check_writable(out_dir, "the run folder" if run_dir is not None else "--out (default eval/)")
    reference = sft if run_dir is not None and sft is not None else base
    record = settings_record(settings, judge_obj, len(prompt_texts), base, reference, len(labelled or []))
    record["prompts_file"] = str(prompts) if prompts else ("tiny eval prompts" if tiny else "test split")
    partial = run_dir is not None and round_list is not None
    previous = _previous_eval(out_dir / "eval.json", record) if partial else None

    from selfie_lite.backends import get_backend
    from selfie_lite.evaluate import evaluate_models
    from selfie_lite.progress import Reporter

    backend, _ = get_backend(cfg)
    err_console.print(
        f"evaluating {len(models)} model(s) against {esc(base)} on {len(prompt_texts)} prompts "
        f"(temperature {settings.temperature}, {settings.samples_per_prompt} sample(s) per prompt, seed "
        f"{settings.random_seed}); judge: {esc(judge_obj.name) if judge_obj else 'none'}", highlight=False, soft_wrap=True
    )
    from selfie_lite.numerics import resolve_threads, torch_threads

    with Reporter(err_console) as progress, torch_threads(resolve_threads(cfg.threads, base, backend.device)):
        result = evaluate_models(backend, models, base, prompt_texts, judge_obj, settings, pairs=labelled,
                                 reference=reference, progress=progress)
    outputs = result.pop("outputs")
    if run_dir is not None:
        agreement = self_label_agreement(run_dir, gold)
        result["self_label_gold_agreement"] = agreement
        for name, m in result["models"].items():
            if name in agreement:
                m["self_label_gold_agreement"] = agreement[name]
    result["settings"]["prompts_file"] = record["prompts_file"]
    if previous is not None:
        result = merge_eval(previous, result)
    for name, rows in outputs.items():
        atomic_write_jsonl(out_dir / "eval" / "outputs" / f"{name}.jsonl", rows)
    atomic_write_json(out_dir / "eval.json", result)
    from selfie_lite.report import eval_table

    with json_output(as_json) as emit:
        console.print(eval_table(_escaped_eval(result)))
        if export == "alpaca-eval":
            paths = export_alpaca_eval(outputs, prompt_rows, out_dir / "eval" / "alpaca-eval",
                                       prefix=f"{run_dir.name}-" if run_dir is not None else "")
            console.print(f"AlpacaEval outputs: {esc(paths[0].parent)}/ ({len(paths)} files). Score one with:\n"
                          f"  alpaca_eval --model_outputs {esc(paths[-1])}", highlight=False, soft_wrap=True)
        console.print(f"wrote {esc(out_dir / 'eval.json')}", highlight=False, soft_wrap=True)
        emit(result)


def _escaped_eval(result: dict) -> dict:
    """eval.json with the user's strings (model folder names, baseline path, judge spec) escaped for the Rich table."""
    s = result["settings"]
    return {**result, "settings": {**s, "baseline": esc(s["baseline"]), "judge": esc(s["judge"]) if s["judge"] else s["judge"]},
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

    if not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist")
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a selfie-lite run folder (no config.json and round-* folders)")
    if not no_plot:
        from selfie_lite.rundir import check_writable

        check_writable(png or run_dir / "report.png", "--png" if png else "the figure (or pass --png)", kind="file")
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
