"""The round guard: which round `run` ships, and when the loop stops early (docs/method.md, "Round guard").

Why: on every bench we measured, the last round is not the best; a self-labelling loop can train on labels that
drifted from what the humans taught the seed judge, and the paper's loop ships that round anyway.

Signal (guard.select = "guard"): anchor agreement (docs/method.md (E10)). Before round i >= guard.from_round (3)
trains, its self-labels are compared with those of the seed-DPO judge pi_0 on the same pairs: pi_0 is the judge a
user can trust most (it learnt from the human pairs only). from_round is 3 because every stop before round 2 we
measured was a false alarm. When the agreement falls below guard.min_anchor_agreement the round is not trained and
the run ships pi_{i-1}. benchmarks/guard_signals.py measured which cheap signals predict a drop of oracle quality;
this one was the only one that did (docs/results.md, "The round guard").

Reads: round-<i>/samples/ (token ids as sampled), judged.jsonl, reference_logps.json (pi_init's log-probs from the
judge, when the judge's reference is pi_init), round-0/model. Writes: round-<i>/logps-round-0.json (pi_0's
log-probs of the samples, shared with robust.consistency) and round-<i>/done/guard.json.
"""

from __future__ import annotations

import time
from itertools import accumulate
from pathlib import Path

from selfie_lite.config import RunConfig
from selfie_lite.judge import cached_scores, flat_sequences, score_with
from selfie_lite.loss import implicit_rewards
from selfie_lite.metrics import pair_accuracy, response_counts
from selfie_lite.rundir import read_json, read_jsonl
from selfie_lite.stage import Round


def pair_indices(rows: list[dict], pairs: list[dict]) -> list[tuple[int, int]]:
    """(chosen, rejected) positions in flat_sequences(rows) of every judged pair, so that the exact sampled tokens
    are scored, not a re-tokenisation of the text."""
    firsts = accumulate([0, *response_counts(rows)])  # each row's first position, in the flat order
    start = {r["id"]: (k0, r) for r, k0 in zip(rows, firsts, strict=False)}
    out = []
    for p in pairs:
        k0, r = start[p["pair_id"]]
        out.append((k0 + r["responses"].index(p["chosen"]), k0 + r["responses"].index(p["rejected"])))
    return out


def agreement(rewards: list[float], idx: list[tuple[int, int]]) -> float:
    """Share of pairs whose chosen response the rewards also prefer; ties count 1/2. No pairs: nothing disagrees."""
    if not idx:
        return 1.0
    return pair_accuracy([rewards[c] for c, _ in idx], [rewards[r] for _, r in idx])


def guard_stage(r: Round) -> dict:
    """The round guard's measurement (docs/method.md (E10)), before round i >= guard.from_round trains: anchor
    agreement of the round's self-labels (judged.jsonl) with the seed-DPO judge pi_0. The verdict is `verdict`."""
    from selfie_lite.sample import load_samples

    return anchor_agreement(r.cfg, r.dir, r.backend, load_samples(r.dir), read_jsonl(r.dir / "judged.jsonl"),
                            r.model(0), r.init_dir, r.progress)


def verdict(r: Round) -> str | None:
    """Why the loop stops before training round i (one line), or None. The measured agreement is on disk, so a
    resume stops at the same place; the threshold is the current one, so `--resume --force --set
    guard.min_anchor_agreement=X` can let a stopped run go on."""
    from selfie_lite.rundir import marker

    m = read_json(marker(r.dir, "guard"))
    m |= {"threshold": r.cfg.guard.min_anchor_agreement, "stop": m["anchor_agreement"] < r.cfg.guard.min_anchor_agreement}
    return stop_reason(r.index, m) if m["stop"] else None


def anchor_agreement(cfg: RunConfig, round_dir: Path, backend, rows: list[dict], pairs: list[dict], anchor_dir: Path,
                     init_dir: Path, progress=None) -> dict:
    """Anchor agreement of round i's self-labels, and whether the loop stops before training the round."""
    t0 = time.perf_counter()
    sequences = flat_sequences(rows)
    idx = pair_indices(rows, pairs)
    anchor = cached_scores(backend, anchor_dir, rows, round_dir, "round-0", cfg.judge.batch_size, progress,
                           "guard (pi_0)")
    ref_file = round_dir / "reference_logps.json"
    if cfg.judge.reference == "init" and ref_file.is_file():
        init = read_json(ref_file)  # the judge scored pi_init on these very sequences
    else:
        init, _ = score_with(backend, init_dir, sequences, cfg.judge.batch_size, progress, "guard (pi_init)")
    value = agreement(implicit_rewards(anchor, init, cfg.beta), idx)
    threshold = cfg.guard.min_anchor_agreement
    return {"anchor_agreement": value, "threshold": threshold, "stop": value < threshold,
            "seconds": round(time.perf_counter() - t0, 3)}


def stop_reason(i: int, m: dict) -> str:
    return (f"round {i}'s self-labels agree with the seed-DPO judge on {m['anchor_agreement']:.0%} of pairs, under "
            f"guard.min_anchor_agreement = {m['threshold']:.0%}: stopped before training it; shipping round {i - 1}")


def select_by_scorer(cfg: RunConfig, run_dir: Path, backend, init_dir: Path, last_round: int, progress=None) -> dict:
    """guard.select = an external scorer (scorers.py): every round's model (0..last_round) answers the first guard.probe_prompts prompts of
    the held-out test split (sampled as the run samples, one answer each, the same seed for every model); the round
    whose answers the scorer scores highest is shipped. Returns {"round", "scores": {round: mean score}, "scorer"}."""
    from selfie_lite.evaluate import EvalSettings, evaluate_models
    from selfie_lite.rundir import read_jsonl
    from selfie_lite.scorers import parse_scorer

    scorer = parse_scorer(cfg.guard.select, key="guard.select")
    prompts = [r["prompt"] for r in read_jsonl(run_dir / "data" / "test.jsonl")][: cfg.guard.probe_prompts]
    if not prompts:
        from selfie_lite.errors import UserError

        raise UserError("guard.select names a scorer but the run has no held-out prompts to probe with",
                        hint="give data.test_size > 0, or use guard.select = guard")
    scorer.check(prompts)
    models = {f"round-{i}": run_dir / f"round-{i}" / "model" for i in range(last_round + 1)}
    settings = EvalSettings(temperature=cfg.sample.temperature, top_p=cfg.sample.top_p,
                            max_new_tokens=cfg.sample.max_new_tokens, samples_per_prompt=1,
                            random_seed=cfg.random_seed, batch_size=cfg.sample.batch_size, beta=cfg.beta)
    res = evaluate_models(backend, models, init_dir, prompts, scorer, settings, progress=progress)
    scorer.close()
    scores = {int(name.split("-")[1]): m["mean_score"] for name, m in res["models"].items() if name in models}
    best = max(scores, key=lambda i: (scores[i], i))  # a tie goes to the later round
    return {"round": best, "scores": scores, "scorer": cfg.guard.select, "prompts": len(prompts)}
