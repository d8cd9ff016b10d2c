"""Stage 2 of a round: direct preference judgment from logits (docs/method.md (E2, E3); arXiv 2406.04412, Sec. 3.1):
each sample's implicit reward under pi_{i-1}; chosen = highest reward, rejected = lowest (any K >= 2).

pi_ref is pi_init (the SFT model) by default, the paper's choice; judge.reference = "previous" is the ablation.
robust.length_debias picks by reward - a * length instead, a fitted per round (fit_length_penalty).
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

from selfie_lite import distributed
from selfie_lite.config import RunConfig
from selfie_lite.interrupt import safe_point
from selfie_lite.loss import implicit_rewards
from selfie_lite.metrics import per_prompt, response_counts
from selfie_lite.rundir import atomic_write_json, atomic_write_jsonl, read_json
from selfie_lite.stage import NULL_PROGRESS, Round


def flat_sequences(rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [(r["prompt_ids"], ids) for r in rows for ids in r["response_ids"]]


def judge_pairs(rows: list[dict], policy_logps: list[float], ref_logps: list[float], beta: float,
                length_penalty: float = 0.0) -> tuple[list[dict], dict]:
    """Pairs (best vs worst reward per prompt) and counts of what was dropped.

    Dropped: prompts whose best and worst responses are the same text (nothing to prefer), and pairs whose
    chosen response is empty (an empty answer is never a target worth learning; as `rejected` it is kept).
    length_penalty a != 0 (robust.length_debias, see fit_length_penalty): best and worst are picked by
    reward - a * length_in_tokens instead; the stored rewards stay the true implicit rewards. a = 0: the paper.
    """
    pairs, dropped_identical, dropped_empty = [], 0, 0
    for r, rewards in zip(rows, per_prompt(implicit_rewards(policy_logps, ref_logps, beta), response_counts(rows)),  # (E2)
                          strict=True):
        n = len(rewards)
        key = _debiased(rewards, r, length_penalty) if length_penalty else rewards
        own, anchored = _sides(r, n)  # robust.anchor_rejected: rejected among pi_0's samples; else both all n
        best = max(own, key=lambda j: (key[j], -j))
        worst = min(anchored, key=lambda j: (key[j], j))
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


def _sides(row: dict, n: int) -> tuple[range, range]:
    """Where chosen and rejected are picked from: every sample, or with pi_0's samples appended (row["anchor_from"],
    robust.anchor_rejected; docs/method.md (E14)) the round's own samples and pi_0's."""
    a = row.get("anchor_from")
    return (range(a), range(a, n)) if a else (range(n), range(n))


def _debiased(rewards: list[float], row: dict, a: float) -> list[float]:
    return [rw - a * len(ids) for rw, ids in zip(rewards, row["response_ids"], strict=True)]


def length_gap(pairs: list[dict], rows: list[dict]) -> float:
    """Mean chosen-minus-rejected length in tokens over the pairs (0.0 for no pairs)."""
    lengths = {}
    for r in rows:
        for text, ids in zip(r["responses"], r["response_ids"], strict=True):
            lengths[(r["id"], text)] = len(ids)
    gaps = [lengths[(p["pair_id"], p["chosen"])] - lengths[(p["pair_id"], p["rejected"])] for p in pairs]
    return sum(gaps) / len(gaps) if gaps else 0.0


def fit_length_penalty(rows: list[dict], policy_logps: list[float], ref_logps: list[float], beta: float,
                       max_iter: int = 64) -> tuple[float, float]:
    """DICE's length-debiased choice: the `a` (reward per token) for which the pairs that judge_pairs picks by
    reward - a * length have a mean chosen-minus-rejected length gap of about 0. Returns (a, that gap).

    Procedure. Within a prompt, the order of two responses of different lengths flips only where
    a = (r_j - r_k) / (len_j - len_k): these breakpoints cut the a axis into intervals on which every choice, and
    so the gap, is constant. A larger a favours shorter chosen and longer rejected responses, so the gap does not
    increase with a (up to the few pairs dropped as identical or empty). We bisect over the sorted breakpoints
    for the interval where the gap crosses 0, take the interval (of the two around the crossing) with the smaller
    |gap|, ties to the one nearer a = 0, and return its midpoint: a value away from every breakpoint, so no pair
    is decided by rounding. A gap already 0 at a = 0, or no lengths to trade, gives a = 0 (the paper's choice).
    """
    rewards = per_prompt(implicit_rewards(policy_logps, ref_logps, beta), response_counts(rows))  # (E2)
    breaks = set()
    for r, rw in zip(rows, rewards, strict=True):
        lens = [len(ids) for ids in r["response_ids"]]
        for j in range(len(lens)):
            for m in range(j + 1, len(lens)):
                if lens[j] != lens[m]:
                    breaks.add((rw[j] - rw[m]) / (lens[j] - lens[m]))

    def gap(a: float) -> float:
        return length_gap(judge_pairs(rows, policy_logps, ref_logps, beta, a)[0], rows)

    g0 = gap(0.0)
    if g0 == 0.0 or not breaks:
        return 0.0, g0
    b = sorted(breaks)
    # One representative a per interval: below the first breakpoint, the midpoints, above the last.
    reps = [b[0] - 1.0] + [(x + y) / 2 for x, y in zip(b, b[1:], strict=False)] + [b[-1] + 1.0]
    lo, hi = 0, len(reps) - 1  # find the first interval whose gap is <= 0
    if gap(reps[hi]) > 0:
        return reps[hi], gap(reps[hi])
    if gap(reps[lo]) <= 0:
        return reps[lo], gap(reps[lo])
    for _ in range(max_iter):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if gap(reps[mid]) <= 0:
            hi = mid
        else:
            lo = mid
    g_lo, g_hi = gap(reps[lo]), gap(reps[hi])
    best = min((abs(g_lo), abs(reps[lo]), lo), (abs(g_hi), abs(reps[hi]), hi))[2]
    return reps[best], gap(reps[best])


def score_with(backend, model_dir: Path, sequences, batch_size: int, progress, label: str) -> tuple[list[float], float]:
    """log pi(y|x) (docs/method.md (E1)) of every (prompt_ids, response_ids) under the model in model_dir, loaded
    alone and freed afterwards; returns (log-probs, seconds of scoring)."""
    progress = progress or NULL_PROGRESS
    task = progress.start(label, total=len(sequences), unit="seqs")
    model, _ = backend.load(model_dir)
    t0 = time.perf_counter()
    # Several processes (distributed.py): each scores whole batches of the backend's own order, gathered on all.
    logps = distributed.score_sharded(
        lambda seqs: backend.sequence_logps(model, seqs, batch_size=batch_size,
                                            on_batch=lambda n: progress.advance(task, n * distributed.world_size())),
        sequences, batch_size, lambda s: len(s[0]) + len(s[1]),
    )
    seconds = time.perf_counter() - t0
    backend.free(model)
    progress.finish(task)
    return logps, seconds


def cached_scores(backend, model_dir: Path, rows: list[dict], round_dir: Path, name: str, batch_size: int,
                  progress, label: str) -> list[float]:
    """log pi(y|x) of every sample of the round (flat_sequences order) under the model in model_dir, kept in
    round-<i>/logps-<name>.json: the round guard and consistency weighting both score pi_0 in round 2, once."""
    path = round_dir / f"logps-{name}.json"
    if path.is_file():
        return read_json(path)
    logps, _ = score_with(backend, model_dir, flat_sequences(rows), batch_size, progress, label)
    if distributed.is_main():
        atomic_write_json(path, logps)
    return logps


def judge_stage(r: Round) -> dict:
    """Stage 2 of round i: judge the round's samples with pi_{i-1} against the judge's reference (pi_init, or
    pi_{i-2} with judge.reference = "previous"), write judged.jsonl; on the tiny preset also their gold agreement."""
    from selfie_lite.metrics import gold_agreement
    from selfie_lite.sample import load_samples

    previous = r.cfg.judge.reference == "previous" and r.index >= 2
    reference = r.model(r.index - 2) if previous else r.init_dir
    pairs, metrics = judge_round(r.cfg, r.dir, r.backend, load_samples(r.dir), r.prev_dir, reference, r.progress)
    if not pairs:  # not marked done: a resume with other sampling settings can sample again
        from selfie_lite.errors import RunError

        raise RunError(f"round {r.index}: every sampled pair was identical or empty, nothing to train on",
                       hint="raise sample.temperature or sample.num_samples, then --resume")
    if r.gold:
        metrics.update(gold_agreement(pairs, r.gold))
    return metrics


def judge_round(cfg: RunConfig, round_dir: Path, backend, rows: list[dict], policy_dir: Path, reference_dir: Path,
                progress=NULL_PROGRESS) -> tuple[list[dict], dict]:
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
        if distributed.is_main():
            atomic_write_json(path, cached[name])
        safe_point("judge", len(cached))
    debias = {}
    a = 0.0
    if cfg.robust.length_debias:
        a, gap = fit_length_penalty(rows, cached["policy"], cached["reference"], cfg.beta)
        plain, _ = judge_pairs(rows, cached["policy"], cached["reference"], cfg.beta)
        debias = {"length_penalty": a, "length_gap": gap, "length_gap_undebiased": length_gap(plain, rows)}
    pairs, drops = judge_pairs(rows, cached["policy"], cached["reference"], cfg.beta, a)
    if distributed.is_main():
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
        # Diversity of pi_{i-1}'s samples: distinct responses per prompt over K, averaged (1 = all different).
        "distinct_samples": sum(len(set(r["responses"])) / len(r["responses"]) for r in rows) / max(1, len(rows)),
        **debias,  # robust.length_debias: the fitted a (reward per token) and the length gaps with and without it
    }


# ---------------------------------------------------------------------------------------------
# Judging responses from outside a run (api.judge, `selfie-lite judge`)


def load_response_rows(path: Path) -> list[dict]:
    """A JSONL file of {"prompt": str, "responses": [at least 2 strings]}, checked (check_response_rows)."""
    from selfie_lite.errors import UserError
    from selfie_lite.rundir import read_jsonl

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, expected a .jsonl file of responses")
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    return check_response_rows(read_jsonl(path, user_file=True), str(path))


def check_response_rows(rows: list, where: str = "rows") -> list[dict]:
    """Every row {"prompt": str, "responses": [at least 2 strings]}, at least one row; else a UserError naming the
    first bad row."""
    from selfie_lite.errors import UserError

    for n, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("responses"), list) \
                or len(r["responses"]) < 2 or not all(isinstance(x, str) for x in r["responses"]):
            raise UserError(f"{where} row {n + 1}: need {{\"prompt\": str, \"responses\": [at least 2 strings]}}")
    if not rows:
        raise UserError(f"{where} has no rows")
    return rows


def judge_responses(backend, rows: list[dict], policy, reference, beta: float, batch_size: int,
                    progress=NULL_PROGRESS) -> tuple[list[dict], dict]:
    """(E2, E3) on responses that did not come from a run: lay each (prompt, response) out with the policy's chat
    template, score them with the policy and then the reference (one model in memory at a time), and pick best vs
    worst per prompt (judge_pairs). Returns the pairs and the counts of what was dropped."""
    from selfie_lite.chat import chat_prompt_ids, chat_response_ids

    tok = backend.load_tokenizer(policy)
    rows = [{**r, "id": i, "prompt_ids": chat_prompt_ids(tok, r["prompt"]),
             "response_ids": [chat_response_ids(tok, r["prompt"], x) for x in r["responses"]]}
            for i, r in enumerate(rows)]
    seqs = flat_sequences(rows)
    pol, _ = score_with(backend, policy, seqs, batch_size, progress, "judge (policy)")
    ref, _ = score_with(backend, reference, seqs, batch_size, progress, "judge (reference)")
    return judge_pairs(rows, pol, ref, beta)
