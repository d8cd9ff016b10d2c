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

eval_plan.py resolves and checks what an eval means, then calls evaluate_models.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from selfie_lite.errors import UserError
from selfie_lite.metrics import gold_agreement, mean, pair_accuracy, per_prompt, response_counts, win_rate
from selfie_lite.rundir import read_jsonl, round_dirs

if TYPE_CHECKING:
    from selfie_lite.scorers import Scorer

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
        if key in scores:
            for r, s in zip(rows, per_prompt(scores[key], response_counts(rows)), strict=True):
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


# ---------------------------------------------------------------------------------------------
# Run folders


def run_models(run_dir: Path, rounds: list[int] | None = None) -> dict[str, Path]:
    """round-<i>/model for every round whose merge finished (optionally only the listed rounds), in order."""
    return {d.name: d / "model" for i, d in round_dirs(run_dir)
            if (d / "done" / "merge.json").is_file() and (rounds is None or i in rounds)}


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
