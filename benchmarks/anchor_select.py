"""Can the seed-DPO judge pick the best round? Read from the results benchmark's run folders.

    python benchmarks/anchor_select.py                 # after python benchmarks/results.py (runs/results)
    python benchmarks/anchor_select.py --split eval

For every run (SPA and each ablation, every random seed) every round's model (0..T) answers the first --prompts
prompts of the split (sampled as `run` samples its probes: one answer each, temperature 0.7, the same seed for
every model); the oracle and the seed-DPO judge r_0 = beta (log pi_0 - log pi_init) (selfie_lite.scorers.AnchorScorer)
score the answers. The table: per run, the round the oracle scores best, the round r_0 scores best, and what picking
by r_0 costs in oracle score against the best round; then the same for the round guard (anchor agreement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "results")
    ap.add_argument("--split", choices=["val", "eval"], default="val")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--threshold", type=float, default=0.93, help="the round guard's threshold, for comparison")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.config import from_dict
    from selfie_lite.evaluate import EvalSettings, generate_outputs
    from selfie_lite.rundir import read_jsonl
    from selfie_lite.scorers import AnchorScorer, OracleScorer
    from selfie_lite.tiny.build import build_tiny

    preset = build_tiny()
    prompts = [r["prompt"] for r in read_jsonl(preset.val_prompts if args.split == "val" else preset.eval_prompts)]
    prompts = prompts[: args.prompts]
    oracle = OracleScorer()
    rows = []
    for seed_dir in sorted(args.runs.glob("seed-*")):
        seed = int(seed_dir.name.split("-")[1])
        for run in sorted(d for d in seed_dir.iterdir() if d.is_dir() and d.name != "dpo-100"):
            cfg = from_dict(json.loads((run / "config.json").read_text()))
            be = HFBackend(cfg)
            init = Path(json.loads((run / "data" / "split.json").read_text())["sft_model"])
            settings = EvalSettings(temperature=cfg.sample.temperature, top_p=cfg.sample.top_p,
                                    max_new_tokens=cfg.sample.max_new_tokens, samples_per_prompt=1,
                                    random_seed=seed, batch_size=cfg.sample.batch_size, beta=cfg.beta)
            anchor = AnchorScorer(be, run / "round-0" / "model", init, cfg.beta, cfg.judge.batch_size)
            o, a = {}, {}
            for i in range(cfg.rounds + 1):
                model, tok = be.load(run / f"round-{i}" / "model")
                out = generate_outputs(be, model, tok, prompts, settings)
                be.free(model)
                ps = [r["prompt"] for r in out for _ in r["responses"]]
                rs = [x for r in out for x in r["responses"]]
                o[i] = statistics.mean(oracle.score(ps, rs))
                a[i] = statistics.mean(anchor.score(ps, rs))
            guard = cfg.rounds
            for i in range(2, cfg.rounds + 1):
                g = json.loads((run / f"round-{i}" / "done" / "guard.json").read_text())
                if g["anchor_agreement"] < args.threshold:
                    guard = i - 1
                    break
            best = max(o, key=lambda i: (o[i], i))
            by_anchor = max(a, key=lambda i: (a[i], i))
            rows.append((run.name, seed, o, a, best, by_anchor, guard))
            print(f"{run.name:16s} seed {seed}: oracle " + " ".join(f"{o[i]:.3f}" for i in o) + " | r_0 "
                  + " ".join(f"{a[i]:+.3f}" for i in a) + f" | best {best}, r_0 picks {by_anchor}, guard {guard}",
                  flush=True)
    print("\n| run | seed | oracle score, rounds 0..T | r_0, rounds 0..T | best | r_0 picks (loss) | guard picks (loss) |")
    print("|---|---:|---|---|---:|---:|---:|")
    for name, seed, o, a, best, pa, pg in rows:
        print(f"| {name} | {seed} | " + ", ".join(f"{o[i]:.3f}" for i in o) + " | "
              + ", ".join(f"{a[i]:+.2f}" for i in a) + f" | {best} | {pa} ({o[best] - o[pa]:.3f}) | "
              f"{pg} ({o[best] - o[pg]:.3f}) |")
    def within(k):
        return sum(o[b] - o[x] <= 0.01 for _, _, o, _, b, pa, pg in rows for x in [pa if k == "a" else pg])

    print(f"\nwithin 0.01 of the best round: r_0 {within('a')}/{len(rows)}, guard {within('g')}/{len(rows)}")


if __name__ == "__main__":
    main()
