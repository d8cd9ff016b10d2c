"""Is the tiny preset a bench on which SPA's premise holds? Its calibration against the paper's BASELINES.

The paper's setting (arXiv 2406.04412): an SFT model with a real prior of answer quality, whose seed-DPO implicit
reward is already a decent annotator. The targets say that in numbers (issue "bench v2"); SPA itself is never a
target. `benchmarks/results.py` measures them (3 random seeds, held-out eval prompts, the main job's settings) and
writes calibration.json beside this file; `selfie-lite tiny info` prints them against the targets.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

CALIBRATION_FILE = Path(__file__).resolve().parent / "calibration.json"

# name -> (what it is, lowest acceptable, highest acceptable or None)
TARGETS: dict[str, tuple[str, float, float | None]] = {
    "sft_frac_good": ("SFT samples that are good (correct and formatted)", 1 / 3, 2 / 3),
    "dpo_seed_win_rate": ("DPO on the 3.3% seed: oracle win rate vs SFT", 0.55, None),
    "dpo_100_win_rate": ("DPO on 100% of the gold pairs: win rate vs SFT", 0.60, None),
    "seed_gain_share": ("DPO-3.3%'s gain as a share of DPO-100%'s (paper: 0.35)", 1 / 3, None),
    "seed_pair_accuracy": ("seed-DPO implicit reward orders held-out gold pairs right", 0.80, None),
    "round1_gold_agreement": ("round-1 self-labels agree with the oracle (untied pairs)", 0.75, None),
}


def figures_of_seed(models: dict, round1_judge: dict) -> dict[str, float]:
    """One random seed's calibration figures from an evaluation (evaluate_models' "models") and round 1's judge
    metrics (done/judge.json)."""
    seed_wr, full_wr = models["dpo-seed"]["win_rate"], models["dpo-100"]["win_rate"]
    return {
        "sft_frac_good": models["sft"]["frac_good"],
        "dpo_seed_win_rate": seed_wr,
        "dpo_100_win_rate": full_wr,
        "seed_gain_share": (seed_wr - 0.5) / (full_wr - 0.5) if full_wr != 0.5 else float("nan"),
        "seed_pair_accuracy": models["dpo-seed"]["seed_pair_accuracy"],
        "round1_gold_agreement": round1_judge["gold_agreement_untied"],
    }


def summarise(per_seed: dict[int, dict[str, float]], source: str) -> dict:
    """Mean, sd and pass/fail per figure over the seeds, as calibration.json stores it."""
    out = {"source": source, "seeds": sorted(per_seed), "figures": {}}
    for name, (what, lo, hi) in TARGETS.items():
        values = [per_seed[s][name] for s in sorted(per_seed)]
        mean = statistics.mean(values)
        out["figures"][name] = {
            "what": what, "per_seed": values, "mean": mean, "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "target": [lo, hi], "holds": lo <= mean and (hi is None or mean <= hi),
        }
    return out


def load() -> dict | None:
    return json.loads(CALIBRATION_FILE.read_text()) if CALIBRATION_FILE.is_file() else None


def save(summary: dict, path: Path = CALIBRATION_FILE) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def target_text(lo: float, hi: float | None) -> str:
    if hi is None:
        return f">= {lo:.2f}"
    return f"{lo:.2f} to {hi:.2f}"
