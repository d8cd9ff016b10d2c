"""Evaluation: how much better than a baseline (the SFT model by default) is each model of a run?

Per model, on held-out prompts, one response per prompt (or n) sampled with a fixed seed, then:
- win rate against the baseline's response to the same prompt under an external scorer (scorers.py: the tiny
  preset's oracle, the smol preset's instruction checker, a reward model, or a Python function of yours; win = 1,
  tie = 1/2, loss = 0), the scorer's mean score, and the scorer's own figures where it has some (ifeval: IFEval's
  instruction-level and prompt-level strict accuracy, and the share met per instruction kind);
- always, at no extra cost: seed-pair accuracy (how often the implicit reward beta * (log pi - log pi_sft) ranks
  held-out human-labelled pairs correctly; ties count 1/2, so the SFT model itself scores exactly 0.5), the mean
  response length (tokens and words: the paper's raw win rate grew much faster than its length-controlled one),
  and, for a run folder, the agreement of each round's self-labels with gold labels where gold exists (the tiny and
  smol presets).

Every model is sampled with the same seed, so two models differ only by their weights (common random numbers:
less noise in the comparison).

`plan_eval` resolves what an eval of a run folder or of model folders means (models, baseline, prompts, scorer,
settings) and checks all of it before a weight loads; `run_eval` runs it and writes <out>/eval.json and
<out>/eval/outputs/<model>.jsonl. api.evaluate is the two in a row; `selfie-lite eval` prints what it returns.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from selfie_lite.errors import UserError
from selfie_lite.rundir import read_jsonl, round_dirs

if TYPE_CHECKING:
    from selfie_lite.scorers import Scorer

# ---------------------------------------------------------------------------------------------
# Arithmetic


def win_rate(scores: list[float], baseline_scores: list[float]) -> dict:
    """Paired comparison, item by item: win = 1, tie = 1/2, loss = 0; win_rate in [0, 1]."""
    if len(scores) != len(baseline_scores):
        raise ValueError(f"{len(scores)} scores against {len(baseline_scores)} baseline scores")
    wins = sum(s > b for s, b in zip(scores, baseline_scores, strict=True))
    ties = sum(s == b for s, b in zip(scores, baseline_scores, strict=True))
    n = len(scores)
    return {
        "win_rate": (wins + 0.5 * ties) / n if n else math.nan,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "n": n,
    }


def pair_accuracy(chosen_rewards: list[float], rejected_rewards: list[float]) -> float:
    """Share of labelled pairs whose chosen response gets the higher reward; an exact tie counts 1/2."""
    n = len(chosen_rewards)
    if n != len(rejected_rewards):
        raise ValueError("chosen and rejected rewards differ in length")
    if n == 0:
        return math.nan
    right = sum(c > r for c, r in zip(chosen_rewards, rejected_rewards, strict=True))
    ties = sum(c == r for c, r in zip(chosen_rewards, rejected_rewards, strict=True))
    return (right + 0.5 * ties) / n


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------------------------
# Prompts and labelled pairs


def load_prompts(path: Path) -> list[dict]:
    """Rows with a "prompt" (or AlpacaEval's "instruction") field, from .jsonl or a .json list. Extra fields are kept
    (AlpacaEval's "dataset" goes back into the export)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            rows = json.loads(text)
            if isinstance(rows, dict):  # {"column": [values...]} as pandas writes it
                rows = [dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)]
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON/JSONL: {e}") from None
    out = []
    for n, r in enumerate(rows):
        prompt = r.get("prompt", r.get("instruction")) if isinstance(r, dict) else r if isinstance(r, str) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{path} row {n + 1}: need a non-empty \"prompt\" or \"instruction\" field")
        out.append({**(r if isinstance(r, dict) else {}), "prompt": prompt})
    if not out:
        raise UserError(f"{path} holds no prompts")
    return out


def load_pairs(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labelled pair file {path} does not exist")
    rows = read_jsonl(path, user_file=True)
    for n, r in enumerate(rows):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise UserError(f"{path} row {n + 1}: need string fields prompt, chosen and rejected")
    return rows


# ---------------------------------------------------------------------------------------------
# Sampling and scoring with a backend


@dataclass(frozen=True)
class EvalSettings:
    temperature: float = 0.7  # sampling temperature for every model (the run's sample.temperature by default)
    top_p: float = 1.0
    max_new_tokens: int = 300
    samples_per_prompt: int = 1  # n responses per prompt; win rate compares sample k with the baseline's sample k
    random_seed: int = 0  # the same for every model
    batch_size: int = 32  # prompts per generate() call and sequences per scoring pass
    beta: float = 0.1  # for the implicit reward of seed-pair accuracy


def generate_outputs(backend, model, tok, prompts: list[str], s: EvalSettings) -> list[dict]:
    """One row per prompt: {"prompt", "responses": [str]*n, "response_tokens": [int]*n}."""
    rows = backend.generate(
        model, tok, prompts, num_samples=s.samples_per_prompt, temperature=s.temperature, top_p=s.top_p,
        max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, seed=s.random_seed,
    )
    return [{"prompt": r["prompt"], "responses": r["responses"], "response_tokens": [len(x) for x in r["response_ids"]]}
            for r in rows]


def pair_sequences(tok, pairs: list[dict]) -> list[tuple[list[int], list[int]]]:
    """[(prompt_ids, chosen_ids)]*N + [(prompt_ids, rejected_ids)]*N, laid out by the chat template."""
    from selfie_lite.chat import chat_prompt_ids, chat_response_ids

    prompt_ids = [chat_prompt_ids(tok, p["prompt"]) for p in pairs]
    chosen = [(pi, chat_response_ids(tok, p["prompt"], p["chosen"])) for pi, p in zip(prompt_ids, pairs, strict=True)]
    rejected = [(pi, chat_response_ids(tok, p["prompt"], p["rejected"])) for pi, p in zip(prompt_ids, pairs, strict=True)]
    return chosen + rejected


def _pair_logps(backend, model, sequences, batch_size) -> tuple[list[float], list[float]]:
    logps = backend.sequence_logps(model, sequences, batch_size=batch_size)
    half = len(logps) // 2
    return logps[:half], logps[half:]


def settings_record(settings: EvalSettings, scorer, n_prompts: int, baseline, reference, n_pairs: int) -> dict:
    """The settings eval.json records; a partial eval (--rounds) must match them to merge into that file."""
    return {**asdict(settings), "scorer": scorer.name if scorer else None, "prompts": n_prompts,
            "baseline": str(baseline), "reference": str(reference), "labelled_pairs": n_pairs}


def _model_order(name: str) -> tuple:
    if name == "sft":
        return (0, 0, "")
    idx = name.split("-", 1)[1] if name.startswith("round-") else ""
    return (1, int(idx), "") if idx.isdigit() else (2, 0, name)


def merge_eval(old: dict, new: dict) -> dict:
    """A partial eval folded into the run's eval.json: its models replace their old rows, every other row stays
    (sft first, then rounds in order), so `eval RUN --rounds 3` never clobbers the other rounds' results."""
    models = {**old.get("models", {}), **new["models"]}
    return {**old, **new, "models": {k: models[k] for k in sorted(models, key=_model_order)}}


def evaluate_models(
    backend,
    models: dict[str, Path],
    baseline: Path,
    prompts: list[str],
    scorer: Scorer | None,
    settings: EvalSettings,
    *,
    pairs: list[dict] | None = None,
    reference: Path | None = None,
    progress=None,
) -> dict:
    """Sample, score and compare every model (and the baseline) on the same prompts.

    models: name -> model folder (the baseline may be among them). reference: the model the implicit reward of
    seed-pair accuracy is taken against (default: the baseline). Returns {"settings", "models": {name: metrics},
    "outputs": {name: rows}}; the baseline's metrics are under the key "baseline" unless a model shares its folder.
    """
    if scorer is not None:
        scorer.check(prompts)
    reference = Path(reference or baseline)
    order = [("baseline", Path(baseline))] + [(n, Path(d)) for n, d in models.items()]
    # One pass per distinct folder: key -> (folder, needs samples). The reference only needs pair log-probs.
    todo: dict[str, tuple[Path, bool]] = {}
    for _, d in order:
        todo.setdefault(_key(d), (d, True))
    if pairs:
        todo.setdefault(_key(reference), (reference, False))
    outputs: dict[str, list[dict]] = {}
    pair_logps: dict[str, tuple[list[float], list[float]]] = {}
    seconds: dict[str, float] = {}
    sequences = None
    from selfie_lite.stage import NULL_PROGRESS

    progress = progress or NULL_PROGRESS
    task = progress.start("eval (sample)", total=len(todo), unit="models")
    for key, (d, sample) in todo.items():
        t0 = time.perf_counter()
        model, tok = backend.load(d)
        if sample:
            outputs[key] = generate_outputs(backend, model, tok, prompts, settings)
        if pairs:
            if sequences is None:
                sequences = pair_sequences(tok, pairs)
            pair_logps[key] = _pair_logps(backend, model, sequences, settings.batch_size)
        backend.free(model)
        seconds[key] = time.perf_counter() - t0
        progress.advance(task, 1)
    progress.finish(task)

    # Score every response once, with the scorer loaded once.
    scores: dict[str, list[float]] = {}
    extra: dict[str, dict] = {}
    if scorer is not None:
        flat_p, flat_r, spans = [], [], {}
        for key, rows in outputs.items():
            start = len(flat_r)
            for r in rows:
                flat_p += [r["prompt"]] * len(r["responses"])
                flat_r += r["responses"]
            spans[key] = (start, len(flat_r))
        t0 = time.perf_counter()
        all_scores = scorer.score(flat_p, flat_r)
        scorer_seconds = time.perf_counter() - t0
        scorer.close()
        scores = {k: all_scores[a:b] for k, (a, b) in spans.items()}
        if hasattr(scorer, "metrics"):  # a scorer with figures of its own (ifeval: strict and per-instruction accuracy)
            extra = {k: scorer.metrics(flat_p[a:b], flat_r[a:b]) for k, (a, b) in spans.items()}
    else:
        scorer_seconds = 0.0

    base_key, ref_key = _key(Path(baseline)), _key(reference)
    results: dict[str, dict] = {}
    for name, d in order:
        key = _key(d)
        rows = outputs[key]
        tokens = [t for r in rows for t in r["response_tokens"]]
        words = [len(x.split()) for r in rows for x in r["responses"]]
        m: dict = {"model": str(d), "mean_response_tokens": mean(tokens), "mean_response_words": mean(words)}
        if scorer is not None:
            m.update(win_rate(scores[key], scores[base_key]))
            m["mean_score"] = mean(scores[key])
            if getattr(scorer, "good_score", None) is not None:  # scorers with a notion of "good" (the oracle)
                m["frac_good"] = mean([float(x >= scorer.good_score) for x in scores[key]])
            m["baseline_mean_score"] = mean(scores[base_key])
            m.update(extra.get(key, {}))
        if pairs:
            from selfie_lite.loss import implicit_rewards

            (pc, pr), (rc, rr) = pair_logps[key], pair_logps[ref_key]
            m["seed_pair_accuracy"] = pair_accuracy(
                implicit_rewards(pc, rc, settings.beta), implicit_rewards(pr, rr, settings.beta)
            )
        m["seconds"] = round(seconds.get(key, 0.0), 2)
        for r, s in zip(rows, _chunks(scores.get(key), [len(r["responses"]) for r in rows]), strict=True):
            if s is not None:
                r["scores"] = s
        results[name] = m
    if any(_key(d) == base_key for d in models.values()):
        results.pop("baseline")  # the baseline is also one of the named models: one row, under its name
    return {
        "settings": {**settings_record(settings, scorer, len(prompts), baseline, reference, len(pairs or [])),
                     "scorer_seconds": round(scorer_seconds, 2)},
        "models": results,
        "outputs": {name: outputs[_key(d)] for name, d in order if name in results},
    }


def _key(d: Path) -> str:
    d = Path(d)
    return str(d.resolve()) if d.exists() else str(d)


def _chunks(values, sizes):
    if values is None:
        return [None] * len(sizes)
    out, k = [], 0
    for n in sizes:
        out.append(values[k : k + n])
        k += n
    return out


# ---------------------------------------------------------------------------------------------
# Run folders


def run_models(run_dir: Path, rounds: list[int] | None = None) -> dict[str, Path]:
    """round-<i>/model for every round whose merge finished (optionally only the listed rounds), in order."""
    return {d.name: d / "model" for i, d in round_dirs(run_dir)
            if (d / "done" / "merge.json").is_file() and (rounds is None or i in rounds)}


def gold_agreement(pairs: list[dict], gold) -> dict:
    """docs/method.md (E11): how often the self-labels agree with the oracle, over all pairs (ties count half), and
    over the pairs the oracle does not tie (the judge's accuracy where there is something to get right)."""
    agree = tie = 0
    for p in pairs:
        c, r = gold(p["prompt"], p["chosen"]), gold(p["prompt"], p["rejected"])
        agree += c > r
        tie += c == r
    n = max(1, len(pairs))
    return {"gold_agreement": (agree + 0.5 * tie) / n, "gold_ties": tie / n,
            "gold_agreement_untied": agree / (n - tie) if n > tie else None}


def self_label_agreement(run_dir: Path, gold=None) -> dict[str, float]:
    """Per self-labelled round: the share of its judged pairs whose chosen response the gold scorer also prefers
    (ties count 1/2). Read from the judge stage's metrics; computed from judged.jsonl when they lack it."""
    out = {}
    for i, d in round_dirs(run_dir):
        if i == 0:
            continue
        marker = d / "done" / "judge.json"
        if not marker.is_file():
            continue
        m = json.loads(marker.read_text())
        if "gold_agreement" in m:
            out[d.name] = m["gold_agreement"]
        elif gold is not None and (d / "judged.jsonl").is_file():
            rows = read_jsonl(d / "judged.jsonl")
            if rows:
                out[d.name] = gold_agreement(rows, gold)["gold_agreement"]
    return out


# ---------------------------------------------------------------------------------------------
# AlpacaEval export


def alpaca_eval_rows(rows: list[dict], generator: str) -> list[dict]:
    """AlpacaEval's model_outputs format: a JSON list of {"instruction", "output", "generator"} (+ "dataset" when
    the prompt file had one), one per prompt, in the prompt file's order. Only the first sample of each prompt."""
    out = []
    for r in rows:
        item = {"instruction": r["prompt"], "output": r["responses"][0], "generator": generator}
        if "dataset" in r:
            item["dataset"] = r["dataset"]
        out.append(item)
    return out


def export_alpaca_eval(outputs: dict[str, list[dict]], prompt_rows: list[dict], folder: Path, prefix: str = "") -> list[Path]:
    """One <folder>/<name>.json per model; pass it to `alpaca_eval --model_outputs FILE`."""
    from selfie_lite.rundir import atomic_write_text

    paths = []
    for name, rows in outputs.items():
        merged = [{**pr, **r} for pr, r in zip(prompt_rows, rows, strict=True)]
        path = Path(folder) / f"{name}.json"
        atomic_write_text(path, json.dumps(alpaca_eval_rows(merged, f"{prefix}{name}"), indent=2, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# An eval, planned then run (api.evaluate; `selfie-lite eval` prints what it returns)


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
    from selfie_lite.config import check_range, from_dict, load_config, migrate
    from selfie_lite.rundir import check_writable, is_run_dir, read_json
    from selfie_lite.scorers import OracleScorer, parse_scorer

    targets = [Path(t) for t in targets]
    if not targets:
        raise UserError("nothing to evaluate: give a run folder or model folders")
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
    if out is not None:
        out = Path(out)
        check_writable(out, "--out")
    run_dir = targets[0] if len(targets) == 1 and is_run_dir(targets[0]) else None
    if run_dir is None:
        for t in targets:
            if is_run_dir(t):
                raise UserError(f"{t} is a run folder: evaluate it on its own", hint=f"selfie-lite eval {t}")
            if not (t / "config.json").is_file():
                raise UserError(f"{t} is neither a run folder nor a model folder (no config.json)")
    if rounds is not None:
        if run_dir is None:
            raise UserError("--rounds applies to a run folder only")
        rounds = sorted(set(rounds))
        _check_rounds_exist(run_dir, rounds)

    # The settings the models were made with, and the tiny preset where the defaults come from it. A smol-preset run
    # (data.source = builtin:smol) takes its defaults from the smol preset: its eval prompts and its checker.
    from selfie_lite.smol.build import SOURCE as SMOL_SOURCE

    tiny = gold = None
    smol = False
    if run_dir is not None:
        cfg = from_dict(migrate(read_json(run_dir / "config.json")))
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
        raise UserError("no baseline to compare against", hint="pass --baseline MODEL_DIR (usually the SFT model)")

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
        raise UserError("no prompts to evaluate on", hint="pass --prompts FILE")
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
        check_writable(out_dir, "the run folder" if run_dir is not None else "--out (default eval/)")
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
        raise UserError(f"--rounds {','.join(map(str, rounds))}: {run_dir} has no finished round "
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
    was = eval_settings(old)
    differs = [f"{k}: {was[k]!r} -> {v!r}" for k, v in record.items() if k in was and was[k] != v]
    if differs:
        raise UserError(f"{path} holds an eval made with other settings ({'; '.join(differs)}); "
                        "--rounds would mix them in one table",
                        hint="evaluate every round again (drop --rounds), or write elsewhere with --out")
    return {**old, "settings": was}


def eval_settings(ev: dict) -> dict:
    """eval.json's settings, with the names of older files brought up to date (their scorer was called "judge")."""
    s = dict(ev.get("settings", {}))
    if "judge" in s and "scorer" not in s:
        s["scorer"] = s.pop("judge")
        if "judge_seconds" in s:
            s["scorer_seconds"] = s.pop("judge_seconds")
    return s
