"""The figures every stage and the eval share: paired win rate, pair accuracy, gold agreement, and the one way a
flat list of per-response values (one per sampled response, prompt after prompt) is cut back into per-prompt lists."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def per_prompt(values: Sequence, sizes: Iterable[int]) -> list:
    """values laid out prompt after prompt (sizes[i] responses for prompt i) -> one list per prompt."""
    out, k = [], 0
    for n in sizes:
        out.append(list(values[k : k + n]))
        k += n
    if k != len(values):
        raise ValueError(f"{len(values)} values for {k} responses")
    return out


def response_counts(rows: list[dict]) -> list[int]:
    """How many responses each sampled row holds: the sizes per_prompt cuts by."""
    return [len(r["responses"]) for r in rows]


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


def gold_agreement(pairs: list[dict], gold) -> dict:
    """docs/method.md (E11): how often the self-labels agree with the oracle, over all pairs (ties count half), and
    over the pairs the oracle does not tie (the judge's accuracy where there is something to get right)."""
    chosen = [gold(p["prompt"], p["chosen"]) for p in pairs]
    rejected = [gold(p["prompt"], p["rejected"]) for p in pairs]
    n, tie = len(pairs), sum(c == r for c, r in zip(chosen, rejected, strict=True))
    agree = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    return {"gold_agreement": pair_accuracy(chosen, rejected) if n else 0.0, "gold_ties": tie / max(1, n),
            "gold_agreement_untied": agree / (n - tie) if n > tie else None}
