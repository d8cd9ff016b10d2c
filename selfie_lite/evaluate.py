"""Evaluation: how much better than a baseline (the SFT model by default) is each model of a run?

Per model, on held-out prompts, one response per prompt (or n) sampled with a fixed seed, then:
- win rate against the baseline's response to the same prompt under a judge (win = 1, tie = 1/2, loss = 0), and
  the judge's mean score. Judges: `oracle` (the tiny preset's exact scorer), `reward-model:PATH` (any local
  sequence-classification reward model, e.g. the Skywork or RLHFlow ones, through transformers) or
  `python:MODULE:FUNCTION` (a scorer of your own, f(prompt, response) -> float: a unit-test runner, a math checker);
- always, at no extra cost: seed-pair accuracy (how often the implicit reward beta * (log pi - log pi_sft) ranks
  held-out human-labelled pairs correctly; ties count 1/2, so the SFT model itself scores exactly 0.5), the mean
  response length (tokens and words: the paper's raw win rate grew much faster than its length-controlled one),
  and, for a run folder, the agreement of each round's self-labels with gold labels where gold exists (tiny).

Every model is sampled with the same seed, so two models differ only by their weights (common random numbers:
less noise in the comparison). Reads: model folders, prompt files, labelled pairs. Writes nothing itself; the
CLI (cli_eval.py) writes <run>/eval.json and <run>/eval/outputs/<model>.jsonl.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from selfie_lite.errors import UserError, describe
from selfie_lite.rundir import read_jsonl, round_dirs

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


def implicit_rewards(policy_logps: list[float], reference_logps: list[float], beta: float) -> list[float]:
    """r(x, y) for lists of sequence log-probs (docs/method.md (E2); the formula is loss.implicit_reward)."""
    from selfie_lite.loss import implicit_reward

    return [implicit_reward(p, r, beta) for p, r in zip(policy_logps, reference_logps, strict=True)]


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
# Judges


class Judge(Protocol):
    name: str

    def check(self, prompts: list[str]) -> None:
        """Raise UserError before any weights load if this judge cannot score these prompts."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One score per (prompt, response); higher is better."""

    def close(self) -> None: ...


class AnchorJudge:
    """The seed-DPO judge as a scorer: r_0(x, y) = beta * (log pi_0(y|x) - log pi_init(y|x)) (docs/method.md (E2),
    with pi_0 as the policy). Every run has it (pi_0 learnt from the human seed pairs only), so `run` can compare its
    rounds without an external judge (guard.select = anchor). Responses are re-tokenised with the chat template;
    pi_0 and pi_init are loaded one after the other, never together."""

    name = "anchor"

    def __init__(self, backend, anchor_dir: Path, init_dir: Path, beta: float, batch_size: int = 32):
        self.backend, self.anchor_dir, self.init_dir = backend, Path(anchor_dir), Path(init_dir)
        self.beta, self.batch_size = beta, batch_size

    def check(self, prompts: list[str]) -> None:
        pass

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from selfie_lite.chat import chat_prompt_ids, chat_response_ids

        tok = self.backend.load_tokenizer(self.init_dir)
        seqs = [(chat_prompt_ids(tok, p), chat_response_ids(tok, p, r)) for p, r in zip(prompts, responses, strict=True)]
        logps = {}
        for name, folder in (("anchor", self.anchor_dir), ("init", self.init_dir)):
            model, _ = self.backend.load(folder)
            logps[name] = self.backend.sequence_logps(model, seqs, batch_size=self.batch_size)
            self.backend.free(model)
        return implicit_rewards(logps["anchor"], logps["init"], self.beta)

    def close(self) -> None:
        pass


class OracleJudge:
    """The tiny preset's programmatic oracle (tiny/task.py): exact, free, only for tiny-preset prompts."""

    name = "oracle"

    @property
    def good_score(self) -> float:  # "good" = correct and formatted (tiny/task.py)
        from selfie_lite.tiny.task import GOOD_SCORE

        return GOOD_SCORE

    def check(self, prompts: list[str]) -> None:
        from selfie_lite.tiny.task import parse_prompt

        for p in prompts:
            try:
                parse_prompt(p)
            except ValueError:
                raise UserError(
                    f"the oracle judge scores only the tiny preset's prompts, not {p[:60]!r}",
                    hint="use --judge reward-model:PATH for other prompts",
                ) from None

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from selfie_lite.tiny.task import score

        return [score(p, r) for p, r in zip(prompts, responses, strict=True)]

    def close(self) -> None:
        pass


class RewardModelJudge:
    """A local sequence-classification reward model (one logit per sequence), run through transformers.

    The conversation is laid out with the reward model's own chat template (as the Skywork and RLHFlow model
    cards do); a tokenizer without one gets "prompt\\n\\nresponse". Batches are right-padded; transformers pools
    at the last non-pad token, so a model without a pad token is given its tokenizer's (or eos), and the score
    is the same whatever the batch. Safetensors only, no remote code.
    """

    def __init__(self, path: str | Path, batch_size: int = 8, max_length: int = 4096):
        self.path = Path(path).expanduser()
        self.name = f"reward-model:{path}"
        self.batch_size = batch_size
        self.max_length = max_length
        self._model = None
        self._tok = None
        if not self.path.is_dir():
            raise UserError(f"reward model folder {path} does not exist",
                            hint="download it once (huggingface-cli download ORG/NAME --local-dir DIR), then pass DIR")
        if not (self.path / "config.json").is_file():
            raise UserError(f"{path} is not a model folder (no config.json)")
        if not any(self.path.glob("*.safetensors")):
            raise UserError(f"{path} has no *.safetensors weights", hint="selfie-lite loads safetensors only")

    def check(self, prompts: list[str]) -> None:
        pass

    def _load(self):
        if self._model is not None:
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from selfie_lite.numerics import pick_device, pick_dtype

        device = pick_device()
        dtype = pick_dtype("auto", device)
        tok = AutoTokenizer.from_pretrained(str(self.path))
        model = AutoModelForSequenceClassification.from_pretrained(str(self.path), dtype=dtype, use_safetensors=True)
        if model.config.num_labels != 1:
            raise UserError(
                f"{self.path} has {model.config.num_labels} output labels; a reward model has one (a scalar score)"
            )
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        tok.padding_side = "right"
        self._model, self._tok = model.to(device).eval(), tok

    def format(self, prompt: str, response: str) -> str:
        tok = self._tok
        if tok.chat_template:
            conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return tok.apply_chat_template(conv, tokenize=False)
        return f"{prompt}\n\n{response}"

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        import torch

        self._load()
        tok, model = self._tok, self._model
        texts = [self.format(p, r) for p, r in zip(prompts, responses, strict=True)]
        # The template already holds the special tokens (BOS): do not add them twice.
        encoded = [tok(t, add_special_tokens=not tok.chat_template, truncation=True, max_length=self.max_length)["input_ids"]
                   for t in texts]
        out = [0.0] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits  # [B, 1]
            for row, i in enumerate(idx):
                out[i] = float(logits[row, 0])
        return out

    def close(self) -> None:
        self._model = self._tok = None
        import gc

        gc.collect()


class PythonJudge:
    """A scorer function of your own, `f(prompt: str, response: str) -> float` (higher is better): a unit-test runner,
    a math checker, an exact-match grader. Spec: python:MODULE:FUNCTION, where MODULE is a dotted module importable
    from sys.path or the current folder, or a path to a .py file. Every problem (bad spec, no such module or
    function, a scorer that raises or returns something that is not a number) is a one-line UserError."""

    def __init__(self, target: str):
        self.name = f"python:{target}"
        module, sep, func = target.rpartition(":")  # rpartition: a Windows path may hold a colon
        if not sep or not module or not func:
            raise UserError(f"--judge python:{target}: expected python:MODULE:FUNCTION",
                            hint="e.g. --judge python:checks.py:score or --judge python:mypkg.grading:score")
        mod = _import_scorer_module(module)
        fn = getattr(mod, func, None)
        if fn is None:
            raise UserError(f"--judge {self.name}: {module} has no function {func!r}")
        if not callable(fn):
            raise UserError(f"--judge {self.name}: {module}.{func} is not callable (a {type(fn).__name__})")
        self._fn = fn

    def check(self, prompts: list[str]) -> None:
        pass  # nothing to check before the responses exist; score() names the first prompt that fails

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self._one(i, p, r) for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]

    def _one(self, i: int, prompt: str, response: str) -> float:
        where = f"the python judge {self.name.split(':', 1)[1]} on prompt {i + 1} ({prompt[:60]!r})"
        try:
            value = self._fn(prompt, response)
        except Exception as e:  # the scorer is user code: any failure is reported, with the prompt it failed on
            raise UserError(f"{where} raised {describe(e)}") from None
        # bool is an int: a pass/fail checker returning True/False scores 1/0, which is what it means.
        if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
            raise UserError(f"{where} returned {value!r}; a scorer returns a finite number (higher is better)")
        return float(value)

    def close(self) -> None:
        pass


def _import_scorer_module(module: str):
    """A .py path (or anything with a path separator) is loaded from that file; else a dotted module name, looked
    up on sys.path with the current folder first (as `python -m` would), so a checks.py next to the run is found."""
    import importlib
    import importlib.util
    import os
    import sys

    is_path = module.endswith(".py") or os.sep in module or "/" in module
    try:
        if is_path:
            path = Path(module).expanduser()
            if not path.is_file():
                raise UserError(f"--judge python:{module}:...: scorer file {module} does not exist")
            spec = importlib.util.spec_from_file_location(f"selfie_lite_scorer_{path.stem}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            return importlib.import_module(module)
        finally:
            if added:
                sys.path.remove(os.getcwd())
    except UserError:
        raise
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name) and not is_path:
            raise UserError(f"--judge python:{module}:...: module {module!r} not found on sys.path or in the "
                            "current folder", hint="pass a path to the .py file instead, e.g. python:./checks.py:score") from None
        raise UserError(f"--judge python:{module}:...: importing it failed: {describe(e)}") from None
    except Exception as e:  # a syntax error or an exception at import time, in user code
        raise UserError(f"--judge python:{module}:...: importing it failed: {describe(e)}") from None


def parse_judge(spec: str | None, batch_size: int = 8) -> Judge | None:
    """"oracle" | "reward-model:PATH" | "python:MODULE:FUNCTION" | None/"none" (no win rates). Fails before any weights load."""
    if spec is None or spec == "none":
        return None
    if spec == "oracle":
        return OracleJudge()
    if spec.startswith("reward-model:"):
        path = spec.split(":", 1)[1]
        if not path:
            raise UserError("--judge reward-model: needs a folder, e.g. --judge reward-model:./Skywork-Reward-V2")
        return RewardModelJudge(path, batch_size=batch_size)
    if spec.startswith("python:"):
        return PythonJudge(spec.split(":", 1)[1])
    raise UserError(f"unknown judge {spec!r}", hint="use oracle (tiny preset), reward-model:PATH or python:MODULE:FUNCTION")


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


def settings_record(settings: EvalSettings, judge, n_prompts: int, baseline, reference, n_pairs: int) -> dict:
    """The settings eval.json records; a partial eval (--rounds) must match them to merge into that file."""
    return {**asdict(settings), "judge": judge.name if judge else None, "prompts": n_prompts,
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
    judge: Judge | None,
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
    if judge is not None:
        judge.check(prompts)
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
    task = progress.start("eval (sample)", total=len(todo), unit="models") if progress else None
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
        if progress:
            progress.advance(task, 1)
    if progress:
        progress.finish(task)

    # Score every response once, with the judge loaded once.
    scores: dict[str, list[float]] = {}
    if judge is not None:
        flat_p, flat_r, spans = [], [], {}
        for key, rows in outputs.items():
            start = len(flat_r)
            for r in rows:
                flat_p += [r["prompt"]] * len(r["responses"])
                flat_r += r["responses"]
            spans[key] = (start, len(flat_r))
        t0 = time.perf_counter()
        all_scores = judge.score(flat_p, flat_r)
        judge_seconds = time.perf_counter() - t0
        judge.close()
        scores = {k: all_scores[a:b] for k, (a, b) in spans.items()}
    else:
        judge_seconds = 0.0

    base_key, ref_key = _key(Path(baseline)), _key(reference)
    results: dict[str, dict] = {}
    for name, d in order:
        key = _key(d)
        rows = outputs[key]
        tokens = [t for r in rows for t in r["response_tokens"]]
        words = [len(x.split()) for r in rows for x in r["responses"]]
        m: dict = {"model": str(d), "mean_response_tokens": mean(tokens), "mean_response_words": mean(words)}
        if judge is not None:
            m.update(win_rate(scores[key], scores[base_key]))
            m["mean_score"] = mean(scores[key])
            if getattr(judge, "good_score", None) is not None:  # judges with a notion of "good" (the oracle)
                m["frac_good"] = mean([float(x >= judge.good_score) for x in scores[key]])
            m["baseline_mean_score"] = mean(scores[base_key])
        if pairs:
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
        "settings": {**settings_record(settings, judge, len(prompts), baseline, reference, len(pairs or [])),
                     "judge_seconds": round(judge_seconds, 2)},
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
