"""Stage 2 of a round: direct preference judgment from logits (spa-method.md, Round i step 2).

    r(x, y) = beta * (log pi_{i-1}(y|x) - log pi_ref(y|x))      sequence sums, no length normalisation
    p(y1 > y2 | x) = sigmoid(r1 - r2); chosen = highest reward, rejected = lowest (any K >= 2)

pi_ref is pi_init (the SFT model) by default, the paper's choice; judge.reference = "previous" is the ablation.
The two models are scored one after the other, each loaded alone, so judging needs the memory of ONE model
(not two): the price is a second load from disk, seconds against the minutes of scoring.

Reads: round-<i>/samples/. Writes: round-<i>/policy_logps.json and reference_logps.json (so a kill during the
second pass keeps the first), then round-<i>/judged.jsonl. By default the policy term comes from the sampling pass
(judge.policy_from_sampling), which halves the judge's forward passes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from selfie_lite.config import RunConfig
from selfie_lite.rundir import atomic_write_json, atomic_write_jsonl, maybe_kill, read_json


def flat_sequences(rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [(r["prompt_ids"], ids) for r in rows for ids in r["response_ids"]]


def judge_pairs(rows: list[dict], policy_logps: list[float], ref_logps: list[float], beta: float) -> tuple[list[dict], dict]:
    """Pairs (best vs worst reward per prompt) and counts of what was dropped.

    Dropped: prompts whose best and worst responses are the same text (nothing to prefer), and pairs whose
    chosen response is empty (an empty answer is never a target worth learning; as `rejected` it is kept).
    """
    pairs, dropped_identical, dropped_empty = [], 0, 0
    k = 0
    for r in rows:
        n = len(r["responses"])
        rewards = [beta * (policy_logps[k + j] - ref_logps[k + j]) for j in range(n)]
        k += n
        best = max(range(n), key=lambda j: (rewards[j], -j))
        worst = min(range(n), key=lambda j: (rewards[j], j))
        chosen, rejected = r["responses"][best], r["responses"][worst]
        if best == worst or chosen == rejected:
            dropped_identical += 1
            continue
        if not chosen.strip():
            dropped_empty += 1
            continue
        diff = rewards[best] - rewards[worst]
        pairs.append({
            "pair_id": r["id"],
            "prompt": r["prompt"],
            "chosen": chosen,
            "rejected": rejected,
            "reward_chosen": rewards[best],
            "reward_rejected": rewards[worst],
            "p_chosen": 1.0 / (1.0 + math.exp(-diff)),
            "rewards": rewards,
        })
    return pairs, {"dropped_identical": dropped_identical, "dropped_empty_chosen": dropped_empty}


def score_with(backend, model_dir: Path, sequences, batch_size: int, progress, label: str) -> tuple[list[float], float]:
    task = progress.start(label, total=len(sequences), unit="seqs") if progress else None
    model, _ = backend.load(model_dir)
    t0 = time.perf_counter()
    logps = backend.sequence_logps(
        model, sequences, batch_size=batch_size, on_batch=(lambda n: progress.advance(task, n)) if progress else None
    )
    seconds = time.perf_counter() - t0
    backend.free(model)
    if progress:
        progress.finish(task)
    return logps, seconds


def judge_round(cfg: RunConfig, round_dir: Path, backend, rows: list[dict], policy_dir: Path, reference_dir: Path,
                progress=None) -> tuple[list[dict], dict]:
    sequences = flat_sequences(rows)
    seconds = {}
    cached = {}
    if cfg.judge.policy_from_sampling and all("policy_logps" in r for r in rows):
        # The sampler is pi_{i-1}: its log-probs of its own samples came out of the sampling pass, so the policy
        # term costs nothing and only the reference needs a forward pass (tested equal to the two-pass result).
        cached["policy"] = [lp for r in rows for lp in r["policy_logps"]]
        seconds["policy"] = 0.0
    for name, model_dir in (("policy", policy_dir), ("reference", reference_dir)):
        path = round_dir / f"{name}_logps.json"
        if name in cached:
            continue
        if path.is_file():
            cached[name] = read_json(path)
            continue
        cached[name], seconds[name] = score_with(
            backend, model_dir, sequences, cfg.judge.batch_size, progress, f"judge ({name})"
        )
        atomic_write_json(path, cached[name])
        maybe_kill("judge", len(cached))
    pairs, drops = judge_pairs(rows, cached["policy"], cached["reference"], cfg.beta)
    atomic_write_jsonl(round_dir / "judged.jsonl", pairs)
    total = sum(seconds.values())
    margins = [p["reward_chosen"] - p["reward_rejected"] for p in pairs]
    return pairs, {
        "sequences": len(sequences),
        "pairs": len(pairs),
        **drops,
        "seconds": round(total, 3),
        # Sequences judged (each scored by policy AND reference) per second of forward passes.
        "sequences_per_s": round(len(sequences) / total, 1) if len(seconds) == 2 and total else None,
        "policy_from_sampling": seconds.get("policy") == 0.0,
        "mean_reward_gap": sum(margins) / max(1, len(margins)),
        "mean_p_chosen": sum(p["p_chosen"] for p in pairs) / max(1, len(pairs)),
    }
