"""Counter-measures against late-round drift (config section `robust`; docs/method.md, "Counter-measures against
drift"). Each has an off value that is exactly the paper's loop (arXiv 2406.04412; method = "paper" sets them all);
the defaults are what measured best (config.RobustConfig, docs/results.md). loop.py orders their stages.

- gold replay (DICE's gamma): human seed pairs mixed into every self-labelled round's training set;
- learning-rate decay: round i >= 1 trains at train.learning_rate * lr_decay ** (i - 1);
- a fixed DPO reference (train_reference = "sft"): log pi_init of every training pair, scored in a pass of its own
  before training (one model in memory at a time, as the judge does; reference.reference_stage);
- consistency weighting (CREAM, arXiv 2410.12735): in round i >= 2, each prompt's samples are ranked by this round's
  judge and by the previous round's; the smoothing of its pair follows their disagreement (consistency_smoothing);
- length-debiased judging lives in judge.py (fit_length_penalty), where the pairs are chosen;
- a step budget per round (max_steps: round_max_steps) and margin selection of the self-labelled pairs (margin_keep,
  SeRA: select_by_margin); round_lambda extends refine.lambdas to rounds beyond its list (data.extra_pools);
- anchored rejected responses (anchor_rejected, Temporal Self-Rewarding): anchor_stage samples pi_0's answers, which
  sample.load_samples appends to each row and judge.judge_pairs picks the rejected side from.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from selfie_lite.config import RunConfig
from selfie_lite.stage import Round


def gold_pair_id(seed_index: int) -> int:
    """Replayed seed pair k gets pair_id -1 - k: self-labelled pairs are numbered from 0 (their sample row), so the
    two can never collide, and the seed row stays readable from the id."""
    return -1 - seed_index


def gold_replay(pairs: list[dict], seed_pairs: list[dict], share: float, random_seed: int,
                round_idx: int) -> list[dict]:
    """This round's training set: its self-labelled `pairs`, plus human seed pairs so that they make `share` of the
    total (n_gold = round(n_self * share / (1 - share)), at most every seed pair once). The seed pairs are drawn
    without replacement by a generator seeded with (random_seed, round): a resumed round draws the same ones.
    Replayed pairs carry "gold": True (the trainer never smooths them: they are human labels) and a negative
    pair_id (gold_pair_id). share = 0 returns `pairs` itself: the paper."""
    if share <= 0 or not seed_pairs:
        return pairs
    want = min(len(seed_pairs), round(len(pairs) * share / (1 - share)))
    rng = random.Random(f"gold-replay:{random_seed}:{round_idx}")
    picked = sorted(rng.sample(range(len(seed_pairs)), want))
    gold = [{"pair_id": gold_pair_id(k), "prompt": seed_pairs[k]["prompt"], "chosen": seed_pairs[k]["chosen"],
             "rejected": seed_pairs[k]["rejected"], "gold": True, "seed_index": k} for k in picked]
    return pairs + gold


def round_learning_rate(learning_rate: float, lr_decay: float, round_idx: int) -> float:
    """Peak learning rate of round i: train.learning_rate for the seed round (0) and round 1, then multiplied by
    lr_decay each round. lr_decay = 1 returns learning_rate itself (the paper)."""
    if lr_decay == 1.0 or round_idx <= 1:
        return learning_rate
    return learning_rate * lr_decay ** (round_idx - 1)


def select_by_margin(pairs: list[dict], keep: float) -> list[dict]:
    """Margin selection (docs/method.md (E13); SeRA, arXiv 2410.09362): the ceil(keep * n) self-labelled pairs with
    the largest implicit-reward margin reward_chosen - reward_rejected (ties: the lower pair_id), in their original
    order. keep = 1 returns `pairs` itself: every pair, the paper."""
    if keep >= 1.0 or not pairs:
        return pairs
    n = max(1, math.ceil(keep * len(pairs) - 1e-9))
    ranked = sorted(range(len(pairs)), key=lambda j: (-(pairs[j]["reward_chosen"] - pairs[j]["reward_rejected"]),
                                                      int(pairs[j]["pair_id"])))
    kept = sorted(ranked[:n])
    return [pairs[j] for j in kept]


def round_max_steps(max_steps: int, round_idx: int) -> int:
    """The step budget of round i (docs/method.md (E12)) as the trainer's max_steps: robust.max_steps in rounds >= 1,
    -1 (no cap: the epochs decide) for the seed round and when the budget is off (0)."""
    return max_steps if max_steps > 0 and round_idx >= 1 else -1


def round_lambda(lambdas: list[float], round_idx: int) -> float:
    """Noise detection's lam for round i >= 1: refine.lambdas[i - 1]; rounds beyond the list (data.extra_pools) keep
    the paper's halving, lam_T * 0.5 ** (i - T)."""
    if round_idx <= len(lambdas):
        return lambdas[round_idx - 1]
    return lambdas[-1] * 0.5 ** (round_idx - len(lambdas)) if lambdas else 0.0


def training_pairs(r: Round) -> list[dict]:
    """Round i's training set, a pure function of the run folder: the round's self-labelled pairs (judged.jsonl),
    each with its consistency smoothing where that stage ran (robust.consistency, rounds >= 2), plus the replayed
    human seed pairs (robust.gold_replay, drawn the same on every resume). Round 0: the seed pairs. Every
    counter-measure off: judged.jsonl as it is, the paper's set."""
    from selfie_lite.rundir import is_done, read_jsonl

    if r.index == 0:
        return read_jsonl(r.run_dir / "data" / "seed.jsonl")
    pairs = read_jsonl(r.dir / "judged.jsonl")  # never empty: the judge stage stops the run first
    if is_done(r.dir, "consistency"):
        smoothing = read_consistency(r.dir)
        pairs = [dict(p, smoothing=smoothing[int(p["pair_id"])]) for p in pairs]
    pairs = select_by_margin(pairs, r.cfg.robust.margin_keep)  # robust.margin_keep (1 = every pair)
    if r.cfg.robust.gold_replay > 0:
        pairs = gold_replay(pairs, read_jsonl(r.run_dir / "data" / "seed.jsonl"), r.cfg.robust.gold_replay,
                            r.cfg.random_seed, r.index)
    return pairs


# ---------------------------------------------------------------------------------------------
# Consistency weighting (CREAM; docs/method.md, "Counter-measures against drift")

CONSISTENCY = "consistency.json"  # in round-<i>/: pair_id -> smoothing a in [0, 0.5]


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b of two scorings of the same K items, in [-1, 1]: +1 = the same order, -1 = reversed.
    Pairs tied in either scoring count for neither side (tau-b's denominator); no untied pair at all: 0."""
    concordant = discordant = ties_x = ties_y = 0
    for j in range(len(x)):
        for k in range(j + 1, len(x)):
            dx, dy = x[j] - x[k], y[j] - y[k]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = concordant + discordant
    denom = ((n0 + ties_x) * (n0 + ties_y)) ** 0.5
    return (concordant - discordant) / denom if denom else 0.0


def consistency_smoothing(pairs: list[dict], previous_rewards: dict[int, list[float]], mode: str) -> tuple[dict[int, float], dict]:
    """CREAM's consistency weight, as a per-pair label smoothing (docs/method.md, "Counter-measures").

    For each self-labelled pair, its prompt's K samples are ranked by this round's implicit rewards (pair["rewards"],
    judge pi_{i-1}) and by the previous round's judge (previous_rewards[pair_id], pi_{i-2} against the same
    reference). C = (tau + 1) / 2 is their consistency; CREAM trains C * DPO(yw, yl) + (1 - C) * DPO(yl, yw), which
    is our smoothed loss (loss.py) with a = 1 - C. We cap a at 0.5: where the two judges disagree outright the pair is
    pushed towards no preference, never towards the previous judge's label (with K = 2, tau is +-1, and an
    uncapped a = 1 would simply hand the label to the older judge).
      mode "pair":  a = min(0.5, 1 - C_pair) for each pair (the issue's per-pair form);
      mode "round": a = min(0.5, 1 - mean C) for every pair of the round (CREAM's published form: one consistency
                    rate per iteration).
    Returns ({pair_id: a}, metrics)."""
    taus = {int(p["pair_id"]): kendall_tau(p["rewards"], previous_rewards[int(p["pair_id"])]) for p in pairs}
    cons = {pid: (t + 1) / 2 for pid, t in taus.items()}
    mean_c = sum(cons.values()) / len(cons) if cons else 1.0
    if mode == "round":
        smoothing = {pid: min(0.5, 1 - mean_c) for pid in cons}
    elif mode == "pair":
        smoothing = {pid: min(0.5, 1 - c) for pid, c in cons.items()}
    else:
        raise ValueError(f"consistency mode {mode!r}")
    n = max(1, len(cons))
    return smoothing, {
        "mode": mode,
        "pairs": len(cons),
        "mean_consistency": mean_c,
        "disagreeing": sum(t < 0 for t in taus.values()) / n,  # share of prompts the two judges order oppositely
        "mean_smoothing": sum(smoothing.values()) / n,
    }


def consistency_stage(r: Round) -> dict:
    """robust.consistency, rounds >= 2, before training: CREAM's per-pair smoothing (docs/method.md (E9))."""
    from selfie_lite.rundir import read_json, read_jsonl
    from selfie_lite.sample import load_samples

    return consistency_weights(r.cfg, r.dir, r.backend, load_samples(r.dir), read_jsonl(r.dir / "judged.jsonl"),
                               r.model(r.index - 2), read_json(r.dir / "reference_logps.json"), r.progress)


def consistency_weights(cfg: RunConfig, round_dir: Path, backend, rows: list[dict], pairs: list[dict],
                        previous_judge: Path, reference: list[float], progress=None) -> dict:
    """robust.consistency in round i >= 2: score this round's samples with the previous round's judge policy
    pi_{i-2} (one model in memory, freed afterwards; rows as sampled, so the exact tokens are scored), take its
    rewards against `reference` (the same reference log-probs this round's judge used), and write
    round-<i>/consistency.json {pair_id: a}. pi_{i-2}'s log-probs go to round-<i>/logps-round-<i-2>.json, which
    the round guard shares in round 2 (its anchor is pi_0). The loop marks the stage done; a resumed round reuses the file."""
    import time

    from selfie_lite.judge import cached_scores
    from selfie_lite.loss import implicit_rewards
    from selfie_lite.metrics import per_prompt, response_counts
    from selfie_lite.rundir import atomic_write_json

    t0 = time.perf_counter()
    logps = cached_scores(backend, previous_judge, rows, round_dir, previous_judge.parent.name, cfg.judge.batch_size,
                          progress, "consistency (previous judge)")
    rewards = implicit_rewards(logps, reference, cfg.beta)
    by_prompt = {int(r["id"]): rw for r, rw in zip(rows, per_prompt(rewards, response_counts(rows)), strict=True)}
    smoothing, metrics = consistency_smoothing(pairs, by_prompt, cfg.robust.consistency)
    from selfie_lite import distributed

    if distributed.is_main():
        atomic_write_json(round_dir / CONSISTENCY, {str(k): v for k, v in smoothing.items()})
    return metrics | {"previous_judge": str(previous_judge), "seconds": round(time.perf_counter() - t0, 3)}


def read_consistency(round_dir: Path) -> dict[int, float]:
    from selfie_lite.rundir import read_json

    return {int(k): v for k, v in read_json(round_dir / CONSISTENCY).items()}


# ---------------------------------------------------------------------------------------------
# Anchored rejected responses (Temporal Self-Rewarding; docs/method.md (E14))

ANCHOR_DIR = "anchor"  # in round-<i>/: anchor/samples/chunk-*.jsonl, pi_0's answers to the round's prompts


def anchor_stage(r: Round) -> dict:
    """robust.anchor_rejected, rounds >= 2, after sampling: K responses per prompt of the round's pool from pi_0, in
    resumable seeded chunks as the sample stage draws them (another seed stream: round 1000 + i)."""
    from selfie_lite.rundir import read_jsonl
    from selfie_lite.sample import sample_round

    prompts = [row["prompt"] for row in read_jsonl(r.run_dir / "data" / f"pool-{r.index}.jsonl")]
    return sample_round(r.cfg, r.dir / ANCHOR_DIR, r.backend, r.model(0), prompts, 1000 + r.index, r.progress)
