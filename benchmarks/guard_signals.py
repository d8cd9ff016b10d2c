"""Which cheap per-round signal predicts a drop of oracle quality? Read from the results benchmark's run folders.

    python benchmarks/guard_signals.py                 # after python benchmarks/results.py (runs/results)
    python benchmarks/guard_signals.py --split val     # oracle scores of the validation prompts (after
                                                       # python benchmarks/results.py --split val --md /tmp/val.md)

For every run of the benchmark (SPA and each ablation, every random seed) and every round i >= 1 it sets the change of
signals that describe pi_i against pi_{i-1}, computable without any external judge, beside the change of the
oracle's mean score on the eval prompts (from the benchmark's eval, nothing re-sampled):
  - seed_retention: how often pi_i's implicit reward against pi_init orders the human SEED pairs (the only labels a
    user has) as the humans did; one scoring pass per model;
  - train_acc: the DPO reward accuracy at the end of round i's training (round 0: the seed DPO);
  - tokens: mean length of pi_i's answers to held-out prompts (a probe a run can sample: no labels needed);
  - anchor_agreement: how often round i's self-labels (judged by pi_{i-1}) agree with the seed-DPO judge pi_0
    (beta * (log pi_0 - log pi_init)) on the same pairs; 1 in round 1, where the judge is pi_0 itself. Label
    drift measured against the one judge a user can trust most, at the cost of one scoring pass of the pairs;
  - reward_gap / p_chosen: round i's judge, mean implicit-reward gap of its pairs and its mean sigmoid (this is
    about pi_{i-1}'s samples, judged by pi_{i-1}; no value for pi_0).
A useful guard signal moves WITH the oracle: the table gives, per signal, the Spearman correlation of its change
with the oracle change, and on how many of the rounds where the oracle fell it fell too (rose, for length).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx) ** 0.5
    vy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (vx * vy) if vx and vy else float("nan")


def seed_retention(be, model_dir, seqs, ref_logps) -> float:
    """Share of seed pairs (seqs: N chosen, then N rejected) that pi's implicit reward against pi_init orders right."""
    from selfie_lite.loss import implicit_rewards
    from selfie_lite.metrics import pair_accuracy

    model, _ = be.load(model_dir)
    r = implicit_rewards(be.sequence_logps(model, seqs, batch_size=64), ref_logps, 1.0)
    n = len(r) // 2
    return pair_accuracy(r[:n], r[n:])


def anchor_agreement(be, tok, pairs: list[dict], anchor_model, init_model) -> float:
    """Share of pairs whose chosen response pi_0's implicit reward (against pi_init) also prefers; ties count 1/2."""
    from selfie_lite.evaluate import pair_sequences
    from selfie_lite.loss import implicit_rewards
    from selfie_lite.metrics import pair_accuracy

    seqs = pair_sequences(tok, pairs)  # N chosen, then N rejected
    r = implicit_rewards(be.sequence_logps(anchor_model, seqs, batch_size=64),
                         be.sequence_logps(init_model, seqs, batch_size=64), 1.0)
    n = len(pairs)
    return pair_accuracy(r[:n], r[n:]) if n else 1.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "results")
    ap.add_argument("--json", type=Path, default=None, help="where to write the per-round rows (default OUT/guard-SPLIT.json)")
    ap.add_argument("--split", choices=["eval", "val"], default="eval",
                    help="whose oracle scores: the eval prompts, or the validation prompts (to pick a threshold on)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.config import from_dict
    from selfie_lite.evaluate import pair_sequences
    from selfie_lite.inputs import sft_model_of
    from selfie_lite.rundir import read_json, read_jsonl

    res = read_json(args.out / f"results-{args.split}.json")["results"]
    rows = []
    for seed, r in res.items():
        models = r["models"]
        for run_dir in sorted((args.out / f"seed-{seed}").iterdir()):
            run = run_dir.name
            if run == "dpo-100" or not (run_dir / "config.json").is_file():
                continue
            cfg = from_dict(read_json(run_dir / "config.json"))
            be = HFBackend(cfg)
            sft = sft_model_of(run_dir)
            seed_pairs = read_jsonl(run_dir / "data" / "seed.jsonl")
            model, tok = be.load(sft)
            seqs = pair_sequences(tok, seed_pairs)
            ref = be.sequence_logps(model, seqs, batch_size=64)

            def retention(model_dir, be=be, seqs=seqs, ref=ref):
                return seed_retention(be, model_dir, seqs, ref)

            anchor, _ = be.load(run_dir / "round-0" / "model")
            r0 = read_json(run_dir / "round-0" / "done" / "train.json")
            prev_score = models["dpo-seed"]["mean_score"]
            prev = {"seed_retention": retention(run_dir / "round-0" / "model"), "train_acc": r0.get("reward_accuracy"),
                    "tokens": models["dpo-seed"]["mean_response_tokens"]}
            for i in range(1, cfg.rounds + 1):
                rd = run_dir / f"round-{i}"
                key = f"{run}/round-{i}"
                if key not in models:
                    continue
                j = read_json(rd / "done" / "judge.json")
                t = read_json(rd / "done" / "train.json")
                cur = {"seed_retention": retention(rd / "model"), "train_acc": t.get("reward_accuracy"),
                       "tokens": models[key]["mean_response_tokens"],
                       "reward_gap": j["mean_reward_gap"], "p_chosen": j["mean_p_chosen"],
                       "anchor_agreement": anchor_agreement(be, tok, read_jsonl(rd / "judged.jsonl"), anchor, model),
                       "gold_agreement": j.get("gold_agreement_untied")}
                score = models[key]["mean_score"]
                rows.append({"seed": int(seed), "run": run, "round": i, "score": score, "d_score": score - prev_score,
                             "signals": cur, "prev": prev})
                prev, prev_score = cur, score
    out = args.json or args.out / f"guard-{args.split}.json"
    out.write_text(json.dumps(rows, indent=2))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"guard signals vs the oracle's mean-score change ({len(rows)} rounds)")
    for col in ("signal", "about", "Spearman(change, oracle change)", "sign agrees on oracle drops", "drops"):
        t.add_column(col)
    names = ["seed_retention", "train_acc", "tokens", "reward_gap", "p_chosen", "anchor_agreement", "gold_agreement"]
    for name in names:
        xs, ys = [], []
        for r in rows:
            a, b = r["signals"].get(name), r["prev"].get(name)
            if a is None or b is None:
                continue
            xs.append(a - b)
            ys.append(r["d_score"])
        if len(xs) < 3:
            continue
        drops = [(x, y) for x, y in zip(xs, ys, strict=True) if y < -0.005]
        agree = sum(x > 0 for x, _ in drops) if name == "tokens" else sum(x < 0 for x, _ in drops)
        t.add_row(name, "pi_i" if name in ("seed_retention", "train_acc", "tokens") else "round i's labels",
                  f"{spearman(xs, ys):+.2f}", f"{agree}/{len(drops)}", str(len(drops)))
    Console().print(t)
    # Levels: for the label signals the level matters more than the change (round 1 has no "before").
    t2 = Table(title="label signals per round (mean over seeds and runs) beside the oracle change of that round")
    for col in ("round", "anchor_agreement", "gold_agreement (needs the oracle)", "oracle change", "rounds"):
        t2.add_column(col)
    for i in sorted({r["round"] for r in rows}):
        rs = [r for r in rows if r["round"] == i]
        avg = lambda k, rs=rs: sum(r["signals"][k] for r in rs if r["signals"].get(k) is not None) / len(rs)  # noqa: E731
        t2.add_row(str(i), f"{avg('anchor_agreement'):.3f}", f"{avg('gold_agreement'):.3f}",
                   f"{sum(r['d_score'] for r in rs) / len(rs):+.3f}", str(len(rs)))
    Console().print(t2)


if __name__ == "__main__":
    main()
