"""An eval, planned then run: `plan_eval` resolves what an eval of a run folder or of model folders means (models,
baseline, prompts, scorer, settings) and checks all of it before a weight loads; `run_eval` runs it (evaluate.py)
and writes <out>/eval.json and <out>/eval/outputs/<model>.jsonl. api.evaluate is the two in a row; `selfie-lite
eval` prints what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from selfie_lite.alpaca import export_alpaca_eval
from selfie_lite.errors import UserError
from selfie_lite.evaluate import (
    EvalSettings,
    evaluate_models,
    load_pairs,
    load_prompts,
    merge_eval,
    run_models,
    self_label_agreement,
    settings_record,
)

if TYPE_CHECKING:
    from selfie_lite.scorers import Scorer


@dataclass
class EvalPlan:
    """What an eval will do, resolved and checked before any weights load."""

    models: dict[str, Path]  # name -> model folder ("sft", "round-<i>" for a run folder)
    baseline: Path  # win rates are against its responses
    reference: Path  # seed-pair accuracy's implicit reward is taken against it (a run's SFT model)
    prompt_rows: list[dict]  # {"prompt", ...extra fields AlpacaEval's export keeps}
    scorer: Scorer | None  # None: no win rates
    settings: EvalSettings
    pairs: list[dict] | None  # held-out labelled pairs for seed-pair accuracy
    out_dir: Path  # where eval.json and eval/ go
    record: dict  # the settings eval.json records
    cfg: object  # the run's RunConfig (or the tiny preset's / the defaults): backend, threads
    run_dir: Path | None = None
    gold: object = None  # the oracle's score(prompt, response) where the run's data has gold labels
    previous: dict | None = None  # the eval.json a partial eval (rounds=...) merges into
    export: str | None = None  # "alpaca-eval"

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.prompt_rows]

    def describe(self) -> str:
        s = self.settings
        return (f"evaluating {len(self.models)} model(s) against {self.baseline} on {len(self.prompt_rows)} prompts "
                f"(temperature {s.temperature}, {s.samples_per_prompt} sample(s) per prompt, seed {s.random_seed}); "
                f"scorer: {self.scorer.name if self.scorer else 'none'}")


@dataclass
class Evaluation:
    """What run_eval wrote: eval.json's content and where, and the AlpacaEval files if asked for."""

    result: dict
    eval_file: Path
    export_files: list[Path]


def plan_eval(
    targets: list[str | Path],
    *,
    scorer: str | None = None,
    baseline: str | Path | None = None,
    prompts: str | Path | None = None,
    limit: int | None = None,
    samples_per_prompt: int = 1,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    random_seed: int = 0,
    rounds: list[int] | None = None,
    pairs: str | Path | None = None,
    export: str | None = None,
    out: str | Path | None = None,
    batch_size: int | None = None,
) -> EvalPlan:
    """Resolve and check an eval (every error is a UserError, nothing loaded or written yet).

    targets: one run folder (its SFT model and every finished round, or only `rounds`) or model folders. Defaults
    follow the run: baseline and reference = its SFT model, prompts = the tiny (or smol) preset's held-out eval
    prompts (else the run's test split), scorer = the preset's oracle where the prompts are the preset's (tiny:
    oracle, smol: ifeval), sampling = the run's temperature and max_new_tokens. Model folders without a baseline compare against the tiny preset's SFT model."""
    from selfie_lite.config import from_dict, load_config
    from selfie_lite.paths import check_writable
    from selfie_lite.rundir import is_run_dir, read_json
    from selfie_lite.scorers import OracleScorer, parse_scorer
    from selfie_lite.validate import check_range

    targets = [Path(t) for t in targets]
    if not targets:
        raise UserError("nothing to evaluate: give a run folder or model folders")
    if export not in (None, "alpaca-eval"):
        raise UserError(f"{export!r}: the only export format is alpaca-eval", key="export")
    if samples_per_prompt < 1:
        raise UserError("must be at least 1", key="samples_per_prompt")
    if temperature is not None and temperature <= 0:
        raise UserError(f"must be > 0 (evaluation samples), got {temperature}", key="temperature")
    if limit is not None and limit < 1:
        raise UserError("must be at least 1", key="limit")
    # 0 would silently fall back to the run's setting (`or` below); negative values reach the sampler.
    if max_new_tokens is not None:
        check_range("sample.max_new_tokens", max_new_tokens, "max_new_tokens")
    if batch_size is not None:
        check_range("sample.batch_size", batch_size, "batch_size")
    check_range("random_seed", random_seed)
    for t in targets:
        if not t.exists():
            raise UserError(f"{t} does not exist")
    if out is not None:
        out = Path(out)
        check_writable(out, "out")
    run_dir = targets[0] if len(targets) == 1 and is_run_dir(targets[0]) else None
    if run_dir is None:
        for t in targets:
            if is_run_dir(t):
                raise UserError(f"{t} is a run folder: evaluate it on its own", hint=f"selfie-lite eval {t}")
            if not (t / "config.json").is_file():
                raise UserError(f"{t} is neither a run folder nor a model folder (no config.json)")
    if rounds is not None:
        if run_dir is None:
            raise UserError("applies to a run folder only", key="rounds")
        rounds = sorted(set(rounds))
        _check_rounds_exist(run_dir, rounds)

    # The settings the models were made with, and the tiny preset where the defaults come from it. A smol-preset run
    # (data.source = builtin:smol) takes its defaults from the smol preset: its eval prompts and its checker.
    from selfie_lite.smol.build import SOURCE as SMOL_SOURCE

    tiny = gold = None
    smol = False
    if run_dir is not None:
        cfg = from_dict(read_json(run_dir / "config.json"))
        smol = cfg.data.source == SMOL_SOURCE
        uses_tiny = (not cfg.model or not cfg.data.source) and not smol
    else:
        cfg = None
        uses_tiny = baseline is None or prompts is None
    if uses_tiny:
        from selfie_lite.tiny.build import build_tiny
        from selfie_lite.tiny.task import score

        tiny = build_tiny()
        gold = score if (run_dir is None or not cfg.data.source) else None
    if smol:
        from selfie_lite.smol.checker import score as gold
    if cfg is None:
        cfg = load_config("tiny") if baseline is None else from_dict({})
    sft = Path(cfg.model) if (run_dir is not None and cfg.model) else (tiny.model_dir if tiny else None)
    if run_dir is not None:
        from selfie_lite.inputs import sft_model_of

        started_from = sft_model_of(run_dir)
        if started_from is not None and Path(started_from).exists():
            sft = Path(started_from)
    base = Path(baseline) if baseline is not None else sft
    if base is None:
        raise UserError("no baseline to compare against", hint="give a baseline model folder (usually the SFT model)")

    if prompts is not None:
        prompt_rows, prompts_from = load_prompts(Path(prompts)), str(prompts)
    elif smol:  # a pure function of the preset's seed: no build, no model needed
        from selfie_lite.smol.build import generate_prompts

        prompt_rows, prompts_from = [{"prompt": p} for p in generate_prompts()["eval"]], "smol eval prompts"
    elif tiny is not None and (run_dir is None or not cfg.data.source):
        prompt_rows, prompts_from = load_prompts(tiny.eval_prompts), "tiny eval prompts"
    elif run_dir is not None and (run_dir / "data" / "test.jsonl").is_file():
        prompt_rows = [{"prompt": r["prompt"]} for r in load_pairs(run_dir / "data" / "test.jsonl")]
        prompts_from = "test split"
    else:
        raise UserError("no prompts to evaluate on", hint="give a prompt file (.jsonl or .json)")
    prompt_rows = prompt_rows[:limit] if limit else prompt_rows
    prompt_texts = [r["prompt"] for r in prompt_rows]

    if scorer is None and gold is not None:  # the preset's oracle by default, where it can score every prompt
        from selfie_lite.smol.checker import IFEvalScorer

        scorer_obj = IFEvalScorer() if smol else OracleScorer()
        try:
            scorer_obj.check(prompt_texts)
        except UserError:
            scorer_obj = None
    else:
        scorer_obj = parse_scorer(scorer)
        if scorer_obj is not None:
            scorer_obj.check(prompt_texts)

    pair_file = Path(pairs) if pairs is not None else (run_dir / "data" / "test.jsonl" if run_dir is not None else None)
    labelled = load_pairs(pair_file) if pair_file is not None and (pairs is not None or pair_file.is_file()) else None

    if run_dir is not None:
        models = {"sft": sft} if sft is not None else {}
        models.update(run_models(run_dir, rounds))
        if len(models) <= 1 and not rounds:
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
        check_writable(out_dir, None if run_dir is not None else "out", what="the run folder" if run_dir is not None else "")
    reference = sft if run_dir is not None and sft is not None else base
    record = settings_record(settings, scorer_obj, len(prompt_texts), base, reference, len(labelled or []))
    record["prompts_file"] = prompts_from
    partial = run_dir is not None and rounds is not None
    previous = _previous_eval(out_dir / "eval.json", record) if partial else None
    return EvalPlan(models=models, baseline=base, reference=reference, prompt_rows=prompt_rows, scorer=scorer_obj,
                    settings=settings, pairs=labelled, out_dir=out_dir, record=record, cfg=cfg, run_dir=run_dir,
                    gold=gold, previous=previous, export=export)


def run_eval(plan: EvalPlan, backend, progress=None) -> Evaluation:
    """Sample, score and compare (evaluate_models) on the plan's models, add each round's self-label agreement with
    gold labels (run folders), merge into the previous eval.json for a partial eval, write eval.json, every model's
    outputs and the AlpacaEval files if asked for."""
    from selfie_lite.numerics import resolve_threads, torch_threads
    from selfie_lite.rundir import atomic_write_json, atomic_write_jsonl

    with torch_threads(resolve_threads(plan.cfg.threads, plan.baseline, backend.device)):
        result = evaluate_models(backend, plan.models, plan.baseline, plan.prompts, plan.scorer, plan.settings,
                                 pairs=plan.pairs, reference=plan.reference, progress=progress)
    outputs = result.pop("outputs")
    if plan.run_dir is not None:
        agreement = self_label_agreement(plan.run_dir, plan.gold)
        result["self_label_gold_agreement"] = agreement
        for name, m in result["models"].items():
            if name in agreement:
                m["self_label_gold_agreement"] = agreement[name]
    result["settings"]["prompts_file"] = plan.record["prompts_file"]
    if plan.previous is not None:
        result = merge_eval(plan.previous, result)
    for name, rows in outputs.items():
        atomic_write_jsonl(plan.out_dir / "eval" / "outputs" / f"{name}.jsonl", rows)
    atomic_write_json(plan.out_dir / "eval.json", result)
    if plan.run_dir is not None:  # the shipped model's card shows these figures (card.py)
        import contextlib

        from selfie_lite.card import write_card

        with contextlib.suppress(OSError):  # eval.json is written; a card that cannot be is written by the next eval
            write_card(plan.run_dir, eval_result=result)
    exported = []
    if plan.export == "alpaca-eval":
        exported = export_alpaca_eval(outputs, plan.prompt_rows, plan.out_dir / "eval" / "alpaca-eval",
                                      prefix=f"{plan.run_dir.name}-" if plan.run_dir is not None else "")
    return Evaluation(result, plan.out_dir / "eval.json", exported)


def _model_names(folders: list[Path]) -> dict[str, Path]:
    """Model folders named by their folder name ("parent-name" where two share one, or one is called baseline)."""
    names: dict[str, Path] = {}
    for f in folders:
        name = f.name or str(f)
        if name in names or name == "baseline":
            name = f"{f.parent.name}-{f.name}"
        names[name] = f
    return names


def _check_rounds_exist(run_dir: Path, rounds: list[int]) -> None:
    """A round with no merged model is a typo, not a request for an SFT-only eval."""
    finished = [int(name.split("-")[1]) for name in run_models(run_dir)]
    missing = [r for r in rounds if r not in finished]
    if missing:
        have = ", ".join(map(str, finished)) if finished else "none yet"
        raise UserError(f"{','.join(map(str, rounds))}: {run_dir} has no finished round "
                        f"{', '.join(map(str, missing))} (finished rounds: {have})",
                        hint=f"pick from {have}" if finished else f"finish it first: selfie-lite run --resume {run_dir}")


def _previous_eval(path: Path, record: dict) -> dict | None:
    """The eval.json a partial eval merges into, checked before any model loads: rows made with other settings
    (prompts, scorer, temperature, baseline...) are not comparable, so mixing them into one table is refused."""
    from selfie_lite.rundir import read_json

    if not path.is_file():
        return None
    try:
        old = read_json(path)
    except (OSError, ValueError):
        raise UserError(f"{path} is not readable JSON, so a partial eval cannot merge into it",
                        hint="move it away, or evaluate every round (drop --rounds)") from None
    was = dict(old.get("settings", {}))
    differs = [f"{k}: {was[k]!r} -> {v!r}" for k, v in record.items() if k in was and was[k] != v]
    if differs:
        raise UserError(f"{path} holds an eval made with other settings ({'; '.join(differs)}); "
                        "--rounds would mix them in one table",
                        hint="evaluate every round again (drop --rounds), or write elsewhere with --out")
    return {**old, "settings": was}

