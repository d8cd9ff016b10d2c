"""Counter-measures against late-round drift (config section `robust`; docs/method.md, "Counter-measures against
drift"). Each is off by default, and off is exactly the paper's loop (arXiv 2406.04412); loop.py wires them in.

- gold replay (DICE's gamma): human seed pairs mixed into every self-labelled round's training set;
- learning-rate decay: round i >= 1 trains at train.learning_rate * lr_decay ** (i - 1);
- a fixed DPO reference (train_reference = "sft"): log pi_init of every training pair, scored in a pass of its own
  before training (one model in memory at a time, as the judge does);
- length-debiased judging lives in judge.py (fit_length_penalty), where the pairs are chosen.
"""

from __future__ import annotations

import random
from pathlib import Path

from selfie_lite.config import RunConfig

TABLE = "train_reference_logps.json"  # in round-<i>/: pi_init's log-probs of every training pair


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


def reference_stage(cfg: RunConfig, round_dir: Path, backend, init_dir: Path, pairs: list[dict],
                    progress=None) -> dict:
    """robust.train_reference = "sft": score every training pair (chosen and rejected) with pi_init, loaded alone
    and freed afterwards, on exactly the tokens the trainer will score (train.training_sequences).

    Reads: the training pairs (self-labelled + replayed). Writes: round-<i>/train_reference_logps.json (atomic),
    {pair_id: {"chosen", "rejected", "chosen_tokens", "rejected_tokens"}}; the loop then marks the stage done, so a
    resumed round reuses the file."""
    import time

    from selfie_lite.judge import score_with
    from selfie_lite.rundir import atomic_write_json
    from selfie_lite.train import reference_table, training_sequences

    t0 = time.perf_counter()
    sequences = training_sequences(backend.load_tokenizer(init_dir), pairs, cfg.train)
    logps, seconds = score_with(backend, init_dir, sequences, cfg.judge.batch_size, progress, "reference (pi_init)")
    table = reference_table(pairs, logps, sequences)
    atomic_write_json(round_dir / TABLE, {str(k): v for k, v in table.items()})
    return {"pairs": len(pairs), "sequences": len(sequences), "model": str(init_dir),
            "seconds": round(time.perf_counter() - t0, 3), "scoring_seconds": round(seconds, 3)}


def read_reference_table(round_dir: Path) -> dict[int, dict]:
    from selfie_lite.rundir import read_json

    return {int(k): v for k, v in read_json(round_dir / TABLE).items()}
