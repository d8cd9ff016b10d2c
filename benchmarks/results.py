"""The results table: SPA against its baselines and ablations on the tiny preset, over several random seeds.

    python benchmarks/results.py                      # 3 seeds, writes docs/results.md (about 20 min on 2 cores)
    python benchmarks/results.py --seeds 1 --quick    # a smoke run of the whole pipeline in a few minutes
    python benchmarks/results.py --seeds 1 --split val --ablations --md /tmp/tune.md --out /tmp/tune \
        --set train.learning_rate=1e-3                # one tuning point, on the validation prompts

For each random seed (data shuffle, sampling, LoRA init) it trains, on the tiny preset:
  1. SFT: the preset's SFT model, untouched;
  2. DPO on the seed pairs only (3.3% of the gold set): round 0 of the SPA run;
  3. DPO on 100% of the gold pairs (every pair but the held-out test split), same LoRA settings, and the
     paper's epoch rule: 3 epochs for a seed of <= 2K pairs (3.3%), 1 epoch on the full set;
  4. SPA: rounds 1, 2, 3 of the paper's loop (every robust.* counter-measure off), each round's guard verdict
     recorded but never acted on, so that every round exists;
  5. ablations (ABLATIONS), each a copy of the SPA run's data/ and round-0/ (identical for the same seed) continued
     with one change: the paper's own (no smoothing, lambda = 0, judge reference = previous round) and the
     counter-measures against drift (gold replay, learning-rate decay, length-debiased judge, SFT reference,
     consistency weighting, and the default combination). Round 1 is copied up to what the change touches (FORK_ROUND_1).
For every run, the round that `selfie-lite run` would ship with the round guard as configured is read off its
guard verdicts ("shipped" rows).
Then every model answers the preset's 300 held-out eval prompts (--split val: the 300 validation prompts, the
only split to tune on), sampled at temperature 0.7 (--temperature) with the same seed for every model, and the oracle
scores the answers: win rate against SFT's answer to the same prompt (ties 1/2) and the mean oracle score.
Also seed-pair accuracy on the run's held-out labelled pairs and each round's self-label gold agreement.

Runs are resumable (finished stages are skipped), so an interrupted benchmark continues where it stopped.
The tables go between the markers in the markdown file; the hand-written text around them is kept.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BEGIN, END = "<!-- results:begin (written by benchmarks/results.py) -->", "<!-- results:end -->"
ABLATIONS = {
    "no-smoothing": ({"refine": {"alpha": 0.0}}, "no smoothing (refine.alpha = 0)"),
    "lambda-0": ({"refine": {"lambdas": [0.0, 0.0, 0.0]}}, "smoothing with lambda = 0 (refine.lambdas = [0,0,0])"),
    "ref-previous": ({"judge": {"reference": "previous"}}, "judge reference = previous round"),
    # Counter-measures against late-round drift (docs/method.md); each alone, on top of the paper's loop.
    "gold-replay": ({"robust": {"gold_replay": 0.5}}, "gold replay 0.5 (DICE)"),
    "lr-decay": ({"robust": {"lr_decay": 0.5}}, "learning rate x0.5 per round"),
    "length-debias": ({"robust": {"length_debias": True}}, "length-debiased judge (DICE)"),
    "sft-reference": ({"robust": {"train_reference": "sft"}}, "DPO reference = SFT model"),
    "cream-pair": ({"robust": {"consistency": "pair"}}, "consistency weighting per pair (CREAM)"),
    "cream-round": ({"robust": {"consistency": "round"}}, "consistency weighting per round (CREAM)"),
    "replay+sft-ref": ({"robust": {"gold_replay": 0.5, "train_reference": "sft"}},
                       "gold replay 0.5 + DPO reference = SFT model (the default until 2026-12-02)"),
    # = the default (method = "selfie"), picked on the validation prompts; its "shipped" row is what `run` ships.
    "default+cream": ({"robust": {"gold_replay": 0.5, "train_reference": "sft", "consistency": "pair"}},
                      "**selfie-lite default**: gold replay 0.5 + SFT reference + consistency per pair (CREAM)"),
}
# Issue 21's levers, each on top of the default (DEFAULT: the robust.* settings of method = "selfie").
DEFAULT = {"gold_replay": 0.5, "train_reference": "sft", "consistency": "pair"}
ABLATIONS |= {
    "d+step-cap": ({"robust": DEFAULT | {"max_steps": 26}},
                   "default + step budget: at most 26 optimizer steps per round (round 1's count, seed 1)"),
    "d+eq-pools": ({"robust": DEFAULT, "rounds": 5, "data": {"pool_sizes": [400], "extra_pools": "last"}},
                   "default + equal pools (400 prompts per round), 5 rounds"),
    "d+margin": ({"robust": DEFAULT | {"margin_keep": 0.5}},
                 "default + margin selection: the half of the self-labelled pairs with the largest margin (SeRA)"),
    "d+k4": ({"robust": DEFAULT, "sample": {"num_samples": 4}}, "default + K = 4 samples, best vs worst"),
    "d+sdpo": ({"robust": DEFAULT | {"train_reference": "previous"}},
               "default with the DPO reference moved forward each round (pi_{i-1}, sDPO)"),
    "d+anchored": ({"robust": DEFAULT | {"anchor_rejected": True}},
                   "default + anchored rejected: rejected = the worst of pi_0's samples (Temporal Self-Rewarding)"),
    "d+r5-rest": ({"robust": DEFAULT, "rounds": 5, "data": {"extra_pools": "rest"}},
                  "default, 5 rounds (rounds 4-5 share the prompts left over: 1,201 each)"),
    # Combinations with anchored rejected, the best single lever on seed 1's validation prompts.
    "d+anch+r5": ({"robust": DEFAULT | {"anchor_rejected": True}, "rounds": 5, "data": {"extra_pools": "rest"}},
                  "default + anchored rejected, 5 rounds (rounds 4-5: the prompts left over, 1,201 each)"),
    "d+anch+eq": ({"robust": DEFAULT | {"anchor_rejected": True}, "rounds": 5,
                   "data": {"pool_sizes": [400], "extra_pools": "last"}},
                  "default + anchored rejected + equal pools (400 prompts per round), 5 rounds"),
    "d+anch+cap": ({"robust": DEFAULT | {"anchor_rejected": True, "max_steps": 26}},
                   "default + anchored rejected + step budget 26"),
}
# An ablation forked from another ablation's run (its rounds 0..3, whole), not from the paper's loop: the runs agree
# up to there, so only the rounds after are trained. Its data/ is split again (more pools).
FORK_FROM = {"d+r5-rest": "default+cream", "d+anch+r5": "d+anchored"}
# How much of the SPA run's round 1 an ablation may copy: "judge" = up to its judge stage (the default: the ablation
# changes training only), "all" = the whole round, "none" = only data/ and round-0/ (it changes the judge).
FORK_ROUND_1 = {"ref-previous": "all", "length-debias": "none", "cream-pair": "all", "cream-round": "all",
                "d+eq-pools": "round-0", "d+k4": "none", "d+r5-rest": "rounds",
                "d+anch+r5": "rounds", "d+anch+eq": "round-0"}
# Round-1 files an ablation may copy from the SPA run: everything before training.
TRAIN_OUTPUTS = {"adapter", "model", "trainer", "pairs.jsonl", "metrics.json", "train.json", "merge.json"}


class Timings(dict):
    """Seconds per part, kept on disk: a resumed benchmark that finds a part done (and takes seconds over it) keeps
    the time the part took when it really ran, so the table always states what a fresh run costs."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.stored = json.loads(path.read_text()) if path.is_file() else {}

    def __setitem__(self, key, seconds):
        if seconds < 5 and key in self.stored:
            seconds = self.stored[key]
        super().__setitem__(key, seconds)
        self.stored[key] = seconds
        self.path.write_text(json.dumps(self.stored, indent=2))


def per_part(timings: dict) -> str:
    kinds: dict[str, list[float]] = {}
    for key, v in timings.items():
        kinds.setdefault(key.split(": ", 1)[1], []).append(v)
    return ", ".join(f"{k} {statistics.mean(v) / 60:.1f} min" for k, v in kinds.items())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_config(overrides: list[dict]):
    from selfie_lite.config import load_config

    return load_config("tiny", None, overrides)


def run(cfg, run_dir: Path, quiet: Console):
    """Continue (or start) a run in run_dir with cfg, as `selfie-lite run --resume DIR --force` would: through the
    Python API, so with the CLI's checks and lock."""
    from selfie_lite import api

    resume = (run_dir / "config.json").is_file()
    t0 = time.perf_counter()
    api.execute(api.prepare(cfg, run_dir, resume=resume, console=quiet), console=quiet)
    return time.perf_counter() - t0


def fork(src: Path, dst: Path, round_1: str) -> None:
    """dst starts as a copy of src's data/ and round-0/, and of round 1 up to its judge stage ("judge"), all of it
    ("all") or none of it ("none"); "round-0": round-0/ alone (the ablation splits the data again, into other pools,
    from the same shuffle: the same seed pairs); "rounds": every round of src, no data/ (more pools than src's)."""
    if dst.exists():
        return  # resumed benchmark: the fork was made before
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if round_1 == "rounds":
        for d in sorted(src.glob("round-*")):
            shutil.copytree(d, tmp / d.name)
        os.replace(tmp, dst)
        return
    if round_1 != "round-0":
        shutil.copytree(src / "data", tmp / "data")
    shutil.copytree(src / "round-0", tmp / "round-0")
    if round_1 == "all":
        shutil.copytree(src / "round-1", tmp / "round-1")
    elif round_1 == "judge":
        shutil.copytree(src / "round-1", tmp / "round-1", ignore=lambda d, names: [n for n in names if n in TRAIN_OUTPUTS])
    os.replace(tmp, dst)


def gold_pair_count(preferences: Path) -> int:
    return sum(1 for line in preferences.read_text().splitlines() if line.strip())


def train_all(seed: int, out: Path, args, quiet: Console, timings: dict) -> dict[str, Path]:
    """Every run of one random seed; returns the run folders by condition."""
    from selfie_lite.tiny.build import build_tiny

    preset = build_tiny()
    # Every run trains all its rounds (the guard records its anchor agreement but never stops: threshold 0); which
    # round `selfie-lite run` would ship with the configured threshold is read off afterwards (shipped_round).
    # "spa" is the paper's loop: every robust.* setting off (config.PAPER), whatever the defaults are.
    from selfie_lite.config import PAPER

    base = [{"random_seed": seed, "data": {"labelled_share": "3.3pct"}, "robust": PAPER["robust"],
             "guard": {"select": "guard", "min_anchor_agreement": 0.0, "from_round": 2}}]
    base += args.overrides
    folders = {}

    spa = out / f"seed-{seed}" / "spa"
    cfg = make_config(base)
    log(f"seed {seed}: SPA ({cfg.rounds} rounds, pools {cfg.data.pool_sizes})")
    timings[f"seed {seed}: SPA"] = run(cfg, spa, quiet)
    folders["spa"] = spa

    # DPO on every gold pair outside the held-out test split; the same shuffle puts the same pairs in the test split.
    n_full = gold_pair_count(preset.preferences) - cfg.data.test_size
    epochs = 3 if n_full <= 2000 else 1  # the paper: 3 epochs for a seed of <= 2K pairs, 1 on all of UltraFeedback
    full = out / f"seed-{seed}" / "dpo-100"
    cfg_full = make_config(base + [{"rounds": 0, "data": {"labelled_share": str(n_full)}, "train": {"seed_epochs": epochs}}])
    log(f"seed {seed}: DPO on 100% of the gold pairs ({n_full} pairs, {epochs} epoch(s))")
    timings[f"seed {seed}: DPO-100%"] = run(cfg_full, full, quiet)
    folders["dpo-100"] = full

    for name, (over, _) in ABLATIONS.items():
        if name not in args.ablations:
            continue
        dst = out / f"seed-{seed}" / name
        if name in FORK_FROM and FORK_FROM[name] not in folders:
            raise SystemExit(f"ablation {name} continues {FORK_FROM[name]}'s run: list {FORK_FROM[name]} before it")
        fork(folders[FORK_FROM[name]] if name in FORK_FROM else spa, dst, FORK_ROUND_1.get(name, "judge"))
        log(f"seed {seed}: ablation {name}")
        timings[f"seed {seed}: {name}"] = run(make_config(base + [over]), dst, quiet)
        folders[name] = dst
    return folders


def evaluate_seed(seed: int, folders: dict[str, Path], args, timings: dict) -> dict:
    from selfie_lite.backends import get_backend
    from selfie_lite.config import from_dict
    from selfie_lite.evaluate import EvalSettings, evaluate_models, load_pairs, self_label_agreement
    from selfie_lite.inputs import sft_model_of
    from selfie_lite.rundir import read_jsonl
    from selfie_lite.scorers import OracleScorer
    from selfie_lite.tiny.build import build_tiny
    from selfie_lite.tiny.task import score

    path = args.out / f"seed-{seed}" / f"eval-{args.split}.json"
    key = f"seed {seed}: eval" + (" (val)" if args.split == "val" else "")
    if path.is_file() and not args.force_eval:
        timings[key] = 0.0  # done before: Timings keeps the time it took then
        return json.loads(path.read_text())
    preset = build_tiny()
    cfg = from_dict(json.loads((folders["spa"] / "config.json").read_text()))
    prompts_file = preset.eval_prompts if args.split == "eval" else preset.val_prompts
    prompts = [r["prompt"] for r in read_jsonl(prompts_file)]
    sft = Path(sft_model_of(folders["spa"]) or preset.model_dir)  # the SFT model the runs really started from
    models = {"sft": sft, "dpo-seed": folders["spa"] / "round-0" / "model",
              "dpo-100": folders["dpo-100"] / "round-0" / "model"}
    for name in ["spa", *[a for a in ABLATIONS if a in folders]]:
        for i in range(1, run_rounds(folders[name]) + 1):
            models[f"{name}/round-{i}"] = folders[name] / f"round-{i}" / "model"
    # Evaluation decodes the same way whatever the runs sampled with (a tuned sample.temperature must not move it).
    settings = EvalSettings(temperature=args.temperature, top_p=1.0,
                            max_new_tokens=cfg.sample.max_new_tokens, samples_per_prompt=args.samples_per_prompt,
                            random_seed=seed, batch_size=cfg.sample.batch_size, beta=cfg.beta)
    backend, _ = get_backend(cfg)
    log(f"seed {seed}: evaluating {len(models)} models on {len(prompts)} {args.split} prompts")
    t0 = time.perf_counter()
    res = evaluate_models(backend, models, sft, prompts, OracleScorer(), settings,
                          pairs=load_pairs(folders["spa"] / "data" / "test.jsonl"))
    timings[key] = time.perf_counter() - t0
    res.pop("outputs")
    res["gold_agreement"] = {name: self_label_agreement(folders[name], score) for name in folders if name != "dpo-100"}
    res["labels"] = {name: {f"round-{i}": label_breakdown(folders[name] / f"round-{i}" / "judged.jsonl")
                            for i in range(1, cfg.rounds + 1)} for name in folders if name != "dpo-100"}
    res["anchors"] = {name: [json.loads((folders[name] / f"round-{i}" / "done" / "guard.json").read_text())[
        "anchor_agreement"] for i in range(2, run_rounds(folders[name]) + 1)] for name in folders if name != "dpo-100"}
    res["train"] = {name: {f"round-{i}": _train_metrics(folders[name] / f"round-{i}")
                           for i in range(run_rounds(folders[name]) + 1)} for name in folders}
    path.write_text(json.dumps(res, indent=2))
    return res


def run_rounds(run_dir: Path) -> int:
    return json.loads((run_dir / "config.json").read_text())["rounds"]


def mark_shipped(res: dict, folders: dict[str, Path], rounds: int, args) -> dict:
    """Add "<run>/shipped" rows: what `selfie-lite run` ships with the round guard as the product configures it
    (threshold, first round checked), read off each round's measured verdict. Done at render time, so a change of
    the guard's settings needs no new evaluation."""
    guard = make_config(args.overrides).guard
    for name in [n for n in folders if n != "dpo-100"]:
        k = shipped_round(folders[name], run_rounds(folders[name]), guard.min_anchor_agreement, guard.from_round)
        res["models"][f"{name}/shipped"] = dict(res["models"][f"{name}/round-{k}"] if k else res["models"]["dpo-seed"],
                                                shipped_round=k, threshold=guard.min_anchor_agreement)
    return res


def shipped_round(run_dir: Path, rounds: int, threshold: float, from_round: int = 2) -> int:
    """The round `run` ships with guard.select = guard: the round before the first one (i >= from_round) whose
    self-labels agree with the seed-DPO judge on fewer than `threshold` of the pairs; else the last."""
    for i in range(from_round, rounds + 1):
        g = json.loads((run_dir / f"round-{i}" / "done" / "guard.json").read_text())
        if g["anchor_agreement"] < threshold:
            return i - 1
    return rounds


def label_breakdown(judged: Path) -> dict:
    """What the self-judge preferred, by the oracle's parts: correct / formatted / concise, and length."""
    from selfie_lite.rundir import read_jsonl
    from selfie_lite.tiny.task import score_details

    if not judged.is_file():
        return {}
    rows = read_jsonl(judged)
    if not rows:
        return {}
    c = [score_details(r["prompt"], r["chosen"]) for r in rows]
    r_ = [score_details(r["prompt"], r["rejected"]) for r in rows]
    n = len(rows)
    out = {"pairs": n, "chosen_longer": sum(len(x["chosen"].split()) > len(x["rejected"].split()) for x in rows) / n}
    for part in ("correct", "formatted", "concise"):
        out[f"chosen_{part}"] = sum(d[part] for d in c) / n
        out[f"rejected_{part}"] = sum(d[part] for d in r_) / n
    return out


def _train_metrics(round_dir: Path) -> dict:
    p = round_dir / "done" / "train.json"
    return json.loads(p.read_text()) if p.is_file() else {}


# ---------------------------------------------------------------------------------------------
# Tables


def _ms(values: list[float], spec: str = ".3f") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def rows_spec(rounds: int, ablations: list[str]) -> list[tuple[str, str]]:
    rows = [("1. SFT", "sft"), ("2. DPO, seed pairs only (3.3%)", "dpo-seed"), ("3. DPO, 100% of gold pairs", "dpo-100")]
    rows += [(f"4. SPA round {i} (3.3%)", f"spa/round-{i}") for i in range(1, rounds + 1)]
    rows += [("4. SPA + round guard (method = paper with guard.select = guard)", "spa/shipped")]
    for a in ablations:
        rows += [(f"5. {ABLATIONS[a][1]}, round {i}", f"{a}/round-{i}") for i in range(1, rounds + 1)]
        rows += [(f"5. {ABLATIONS[a][1]}, shipped (round guard)", f"{a}/shipped")]
    return rows


def tables(results: dict[int, dict], rounds: int, ablations: list[str]) -> str:
    seeds = sorted(results)
    out = []
    for metric, title in (("win_rate", "Oracle win rate against SFT (ties count 1/2)"),
                          ("mean_score", "Mean oracle score (0 to 1; 0.85+ = correct and formatted)")):
        out += [f"### {title}", "", "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
                "|---|" + "---:|" * (len(seeds) + 1)]
        for label, key in rows_spec(rounds, ablations):
            vals = [results[s]["models"].get(key, {}).get(metric) for s in seeds]
            if all(v is None for v in vals):
                continue  # a round this run does not have (runs of 3 and 5 rounds share the table)
            out.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + f" | {_ms(vals)} |")
        out.append("")
    out += ["### Which round `run` ships (round guard)", "",
            "The round guard stops before round i >= guard.from_round (3) when its self-labels agree with the "
            "seed-DPO judge on fewer than guard.min_anchor_agreement (0.93) of the pairs. Anchor agreement per round "
            "(measured from round 2 in every run), and the round shipped:", "",
            "| run | seed | anchor agreement, rounds 2..T | shipped round |", "|---|---:|---|---:|"]
    for name in ["spa", *ablations]:
        for s in seeds:
            m = results[s]["models"].get(f"{name}/shipped")
            if m is None:
                continue
            anchors = results[s].get("anchors", {}).get(name, [])
            out.append(f"| {name} | {s} | {', '.join(f'{a:.3f}' for a in anchors)} | {m['shipped_round']} |")
    out.append("")
    out += ["### Seed-pair accuracy and response length (mean ± sd over seeds)", "",
            "Seed-pair accuracy: how often beta * (log pi - log pi_SFT) ranks the held-out human-labelled pairs "
            "(data/test.jsonl) the way the gold labels do (SFT = 0.5 by construction).", "",
            "| model | seed-pair accuracy | mean length (tokens) | mean length (words) |", "|---|---:|---:|---:|"]
    for label, key in rows_spec(rounds, ablations):
        m = [results[s]["models"].get(key, {}) for s in seeds]
        if not any(m):
            continue
        out.append(f"| {label} | {_ms([x.get('seed_pair_accuracy') for x in m])} | "
                   f"{_ms([x.get('mean_response_tokens') for x in m], '.1f')} | {_ms([x.get('mean_response_words') for x in m], '.1f')} |")
    out += ["", "### Self-label agreement with gold, per round (mean ± sd over seeds)", "",
            "The share of each round's self-labelled pairs whose chosen response the oracle also prefers (ties 1/2).",
            "", "| run | " + " | ".join(f"round {i}" for i in range(1, rounds + 1)) + " |",
            "|---|" + "---:|" * rounds]
    for name, label in [("spa", "SPA"), *[(a, ABLATIONS[a][1]) for a in ablations]]:
        cells = [_ms([results[s]["gold_agreement"].get(name, {}).get(f"round-{i}") for s in seeds])
                 for i in range(1, rounds + 1)]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "### What the self-judge preferred (SPA, mean over seeds)", "",
            "Share of each round's self-labelled pairs whose chosen / rejected response is correct, formatted "
            "(\"The answer is X.\") or concise under the oracle, and how often the chosen one has more words.", "",
            "| round | pairs | correct: chosen / rejected | formatted: chosen / rejected | concise: chosen / rejected | chosen longer |",
            "|---|---:|---:|---:|---:|---:|"]
    for i in range(1, rounds + 1):
        bs = [results[s].get("labels", {}).get("spa", {}).get(f"round-{i}", {}) for s in seeds]
        bs = [b for b in bs if b]
        if not bs:
            continue

        def m(k, bs=bs):
            return statistics.mean(b[k] for b in bs)

        out.append(f"| {i} | {m('pairs'):.0f} | " + " | ".join(
            f"{m('chosen_' + part):.2f} / {m('rejected_' + part):.2f}" for part in ("correct", "formatted", "concise"))
            + f" | {m('chosen_longer'):.2f} |")
    out += ["", "### Training, per round (mean over seeds)", "",
            "| run | round | pairs | loss start -> end | mean margin | frac smoothed |", "|---|---|---:|---|---:|---:|"]
    for name in ["spa", "dpo-100", *ablations]:
        for i in range(rounds + 1):
            ms = [results[s]["train"].get(name, {}).get(f"round-{i}", {}) for s in seeds]
            ms = [m for m in ms if m]
            if not ms:
                continue
            avg = {k: statistics.mean(m[k] for m in ms) for k in ("pairs", "loss_start", "loss_end", "mean_margin", "frac_smoothed")
                   if all(isinstance(m.get(k), (int, float)) for m in ms)}
            out.append(f"| {name} | {i} | {avg.get('pairs', 0):.0f} | {avg.get('loss_start', float('nan')):.3f} -> "
                       f"{avg.get('loss_end', float('nan')):.3f} | {avg.get('mean_margin', float('nan')):.3f} | "
                       f"{avg.get('frac_smoothed', 0):.2f} |")
    return "\n".join(out)


def calibration_table(summary: dict) -> str:
    from selfie_lite.tiny.calibration import target_text

    out = ["### Calibration against the paper's baselines (the bench, not SPA)", "",
           "| figure | target | " + " | ".join(f"seed {s}" for s in summary["seeds"]) + " | mean ± sd | holds |",
           "|---|---|" + "---:|" * (len(summary["seeds"]) + 1) + "---|"]
    for f in summary["figures"].values():
        out.append(f"| {f['what']} | {target_text(*f['target'])} | " + " | ".join(f"{v:.3f}" for v in f["per_seed"])
                   + f" | {f['mean']:.3f} ± {f['sd']:.3f} | {'yes' if f['holds'] else '**no**'} |")
    return "\n".join(out)


def write_markdown(md: Path, body: str) -> None:
    head = ("# Results on the tiny preset\n\nThe tables between the markers are written by "
            "`python benchmarks/results.py`; the text around them is written by people.\n\n")
    text = md.read_text() if md.is_file() else head + BEGIN + "\n" + END + "\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + "\n\n" + BEGIN + "\n" + END + "\n"
    pre, rest = text.split(BEGIN, 1)
    post = rest.split(END, 1)[1]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(pre + BEGIN + "\n" + body.rstrip() + "\n" + END + post)


def header(cfg: dict, settings: dict, args, timings: dict, total: float) -> list[str]:
    """The lines above the tables: the command, the settings (cfg: a run's config.json; settings: eval.json's) and
    the wall time."""
    return [
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `" + " ".join(["python benchmarks/results.py", *sys.argv[1:]]) + "`.",
        "",
        "- Settings: examples/tiny.toml as shipped (the main job's), "
        + (f"with --set {', '.join(args.sets)}" if args.sets else "nothing changed") + ".",
        f"- Random seeds {', '.join(map(str, args.seeds))}; {settings['prompts']} held-out {args.split} prompts, "
        f"{settings['samples_per_prompt']} sampled answer(s) per prompt and model at temperature {settings['temperature']} "
        f"(top_p {settings['top_p']}, at most {settings['max_new_tokens']} new tokens), the same sampling seed for every model.",
        f"- Labelled seed {cfg['data']['labelled_share']}; prompt pools {cfg['data']['pool_sizes']} for rounds 1-{cfg['rounds']}; "
        f"test split {cfg['data']['test_size']} pairs; beta {cfg['beta']}; learning rate {cfg['train']['learning_rate']}; "
        f"LoRA r {cfg['lora']['r']}; refine alpha {cfg['refine']['alpha']}, lambdas {cfg['refine']['lambdas']}, "
        f"K {cfg['refine']['low_conf_frac']}; sampling temperature {cfg['sample']['temperature']}.",
        f"- Wall time of a fresh run: {sum(timings.values()) / 60:.1f} min with torch on {args.threads} thread(s) of "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), shared with other work"
        + (f"; this invocation took {total / 60:.1f} min, reusing finished stages" if total < 0.8 * sum(timings.values()) else "")
        + f". Per seed: {per_part(timings)}.",
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="random seeds (default 1 2 3)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "results", help="where the runs go")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "results.md", help="markdown file to write")
    ap.add_argument("--split", choices=["eval", "val"], default="eval", help="eval prompts, or val prompts for tuning")
    ap.add_argument("--samples-per-prompt", type=int, default=2, help="eval responses per prompt and model (default 2)")
    ap.add_argument("--temperature", type=float, default=0.7, help="eval sampling temperature (default 0.7, the paper's)")
    ap.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE config override for every run")
    ap.add_argument("--quick", action="store_true", help="smoke test: pools 40/80/120, 100-pair test split")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see main())")
    ap.add_argument("--force-eval", action="store_true", help="re-evaluate even when eval-<split>.json exists")
    args = ap.parse_args()

    import torch

    from selfie_lite.config import parse_override

    # One thread: this model is tiny, and on a shared machine two OpenMP threads that wait for each other at
    # every op run 50-100x slower than one (measured: a [16, 41] forward takes 0.01 s on 1 thread, 0.6 s on 2).
    torch.set_num_threads(args.threads)
    args.overrides = [parse_override(s) for s in args.sets]
    if args.quick:
        args.overrides.insert(0, {"data": {"pool_sizes": [40, 80, 120], "test_size": 100}})
    args.out.mkdir(parents=True, exist_ok=True)
    quiet = Console(file=io.StringIO())  # the loop's per-round tables; the log says what runs
    timings = Timings(args.out / "timings.json")
    t_start = time.perf_counter()
    results, rounds = {}, 3
    for seed in args.seeds:
        folders = train_all(seed, args.out, args, quiet, timings)
        rounds = max(rounds, *(run_rounds(f) for name, f in folders.items() if name != "dpo-100"))
        results[seed] = mark_shipped(evaluate_seed(seed, folders, args, timings), folders, rounds, args)
        log(f"seed {seed}: done ({time.perf_counter() - t_start:.0f} s so far)")
    total = time.perf_counter() - t_start
    from selfie_lite.tiny import calibration

    per_seed = {s: calibration.figures_of_seed(results[s]["models"], json.loads(
        (args.out / f"seed-{s}" / "spa" / "round-1" / "done" / "judge.json").read_text())) for s in args.seeds}
    calib = calibration.summarise(per_seed, source=f"{args.split} prompts, " + " ".join(["benchmarks/results.py", *sys.argv[1:]]))
    if args.split == "eval" and not args.sets and not args.quick and len(args.seeds) >= 3:
        calibration.save(calib)  # what `selfie-lite tiny info` prints: only from the full, untuned benchmark
    cfg = json.loads((args.out / f"seed-{args.seeds[0]}" / "spa" / "config.json").read_text())
    body = [
        *header(cfg, results[args.seeds[0]]["settings"], args, timings, total),
        "",
        calibration_table(calib),
        "",
        tables(results, rounds, [a for a in ABLATIONS if a in args.ablations]),
    ]
    write_markdown(args.md, "\n".join(body))
    (args.out / f"results-{args.split}.json").write_text(json.dumps({"timings": dict(timings), "total_s": total,
                                                                    "results": {str(k): v for k, v in results.items()}}, indent=2))
    log(f"wrote {args.md} in {total / 60:.1f} min")


if __name__ == "__main__":
    main()
