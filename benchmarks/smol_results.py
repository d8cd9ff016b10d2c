"""The paper's table on a real chat model: the smol preset (SmolLM2-135M-Instruct, verifiable instructions).

    python benchmarks/smol_results.py                       # seeds 42 43 44; writes docs/results.md
    python benchmarks/smol_results.py --seeds 42            # one seed (about an hour on 2 idle cores)
    python benchmarks/smol_results.py --seeds 42 --split val --md /tmp/tune.md --set train.learning_rate=1e-4

For each random seed (data shuffle, sampling, LoRA init), on examples/smol.toml's settings as shipped:
  1. SFT: SmolLM2-135M-Instruct, untouched;
  2. DPO on the seed pairs only (3.3% of the gold set, 31 pairs): round 0 of the runs below;
  3. DPO on 100% of the gold pairs (every pair outside the held-out test split), same LoRA settings, 1 epoch (the
     paper's rule for its full set; --dpo100-epochs);
  4. SPA, the paper's loop (method = paper): rounds 1, 2, 3, every round kept;
  5. selfie-lite's default as shipped (`selfie-lite run --preset smol --seed 3.3pct`): each round, and the round it
     ships (its round guard acting).
The paper's loop starts from a copy of the default run's data/ and round-0/ (the same seed DPO, bit for bit).
Then every model answers the first --limit (100) of the preset's held-out eval prompts (--split val: the validation
prompts, the only split to tune on) at temperature 0.7, the same sampling seed for every model, and the checker
scores the answers: constraint accuracy (share of instructions met), prompt-level strict accuracy (all met), and the
win rate against SFT's answer to the same prompt (ties 1/2).

Runs are resumable (finished stages are skipped; evaluations are kept per seed), so an interrupted benchmark goes on
where it stopped, and `--parts` runs one part at a time. The tables go between the markers in the markdown file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.results import Timings, fork, log, per_part, run  # noqa: E402  (sys.path above)

BEGIN, END = "<!-- smol-results:begin (written by benchmarks/smol_results.py) -->", "<!-- smol-results:end -->"
PARTS = ("default", "paper", "dpo-100", "eval")


def make_config(overrides: list[dict]):
    from selfie_lite.config import load_config

    return load_config("smol", None, overrides)


def train_seed(seed: int, args, quiet: Console, timings: Timings) -> dict[str, Path]:
    out = args.out / f"seed-{seed}"
    base = [{"random_seed": seed}, *args.overrides]
    folders = {"default": out / "default", "paper": out / "paper", "dpo-100": out / "dpo-100"}
    if "default" in args.parts:
        log(f"seed {seed}: selfie-lite's default as shipped (the smol preset)")
        timings[f"seed {seed}: default"] = run(make_config(base), folders["default"], quiet)
    if "paper" in args.parts:
        fork(folders["default"], folders["paper"], "none")
        log(f"seed {seed}: SPA, the paper's loop (rounds 1-3 from the default run's round 0)")
        timings[f"seed {seed}: paper"] = run(make_config(base + [{"method": "paper"}]), folders["paper"], quiet)
    if "dpo-100" in args.parts:
        cfg = make_config(base)
        # every valid gold pair but the held-out test split (the same shuffle puts the same pairs there)
        n_full = json.loads((folders["default"] / "summary.json").read_text())["data"]["valid_rows"] - cfg.data.test_size
        log(f"seed {seed}: DPO on 100% of the gold pairs ({n_full} pairs, {args.dpo100_epochs} epoch(s))")
        full = make_config(base + [{"rounds": 0, "data": {"labelled_share": str(n_full)},
                                    "train": {"seed_epochs": args.dpo100_epochs}}])
        timings[f"seed {seed}: DPO-100%"] = run(full, folders["dpo-100"], quiet)
    return folders


def evaluate_seed(seed: int, folders: dict[str, Path], args, timings: Timings) -> dict | None:
    from selfie_lite.backends import get_backend
    from selfie_lite.config import from_dict
    from selfie_lite.evaluate import EvalSettings, evaluate_models, self_label_agreement
    from selfie_lite.inputs import sft_model_of
    from selfie_lite.smol.build import generate_prompts
    from selfie_lite.smol.checker import IFEvalScorer, score

    path = args.out / f"seed-{seed}" / f"eval-{args.split}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if "eval" not in args.parts:
        return None
    cfg = from_dict(json.loads((folders["default"] / "config.json").read_text()))
    prompts = generate_prompts()[args.split][: args.limit]
    sft = Path(sft_model_of(folders["default"]))
    models = {"sft": sft, "dpo-seed": folders["default"] / "round-0" / "model",
              "dpo-100": folders["dpo-100"] / "round-0" / "model"}
    for name in ("paper", "default"):
        for i in range(1, cfg.rounds + 1):
            if (folders[name] / f"round-{i}" / "done" / "merge.json").is_file():
                models[f"{name}/round-{i}"] = folders[name] / f"round-{i}" / "model"
    settings = EvalSettings(temperature=args.temperature, top_p=1.0, max_new_tokens=cfg.sample.max_new_tokens,
                            samples_per_prompt=1, random_seed=seed, batch_size=cfg.sample.batch_size, beta=cfg.beta)
    backend, _ = get_backend(cfg)
    log(f"seed {seed}: evaluating {len(models)} models on {len(prompts)} {args.split} prompts")
    t0 = time.perf_counter()
    res = evaluate_models(backend, models, sft, prompts, IFEvalScorer(), settings)
    timings[f"seed {seed}: eval" + (" (val)" if args.split == "val" else "")] = time.perf_counter() - t0
    res.pop("outputs")
    summary = json.loads((folders["default"] / "summary.json").read_text())
    k = summary["final_round"]
    res["models"]["default/shipped"] = dict(res["models"]["dpo-seed" if k == 0 else f"default/round-{k}"],
                                            shipped_round=k, why=summary.get("final_why"))
    res["gold_agreement"] = {n: self_label_agreement(folders[n], score) for n in ("paper", "default")}
    res["train"] = {n: [r.get("train", {}) for r in json.loads((folders[n] / "summary.json").read_text())["per_round"]]
                    for n in folders}
    path.write_text(json.dumps(res, indent=2))
    return res


ROWS = [("1. SFT (SmolLM2-135M-Instruct)", "sft"), ("2. DPO, seed pairs only (3.3%)", "dpo-seed"),
        ("3. DPO, 100% of gold pairs", "dpo-100"),
        *[(f"4. SPA (paper's loop) round {i}", f"paper/round-{i}") for i in (1, 2, 3)],
        *[(f"5. selfie-lite default, round {i}", f"default/round-{i}") for i in (1, 2, 3)],
        ("5. selfie-lite default, shipped (round guard)", "default/shipped")]
METRICS = [("constraint_accuracy", "Constraint accuracy (share of instructions met)"),
           ("strict_accuracy", "Prompt-level strict accuracy (every instruction met)"),
           ("win_rate", "Win rate against SFT under the checker (ties 1/2)"),
           ("mean_words", "Mean answer length (words)")]


def _ms(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def tables(results: dict[int, dict]) -> str:
    seeds = sorted(results)
    out = ["| model | " + " | ".join(title.split(" (")[0] for _, title in METRICS) + " |",
           "|---|" + "---:|" * len(METRICS)]
    for label, key in ROWS:
        cells = [_ms([results[s]["models"].get(key, {}).get(m) for s in seeds]) for m, _ in METRICS]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "Mean ± sd over the seeds above (one figure when one seed ran). Per seed:", ""]
    for m, title in METRICS[:3]:
        out += [f"#### {title}", "", "| model | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                "|---|" + "---:|" * len(seeds)]
        for label, key in ROWS:
            vals = [results[s]["models"].get(key, {}).get(m) for s in seeds]
            out.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
        out.append("")
    out += ["#### Shipped round and self-label agreement with the checker", "",
            "| seed | default ships | why | self-label agreement, paper r1-r3 | default r1-r3 |", "|---|---:|---|---|---|"]
    for s in seeds:
        m = results[s]["models"].get("default/shipped", {})
        ga = results[s].get("gold_agreement", {})
        fmt = lambda d: ", ".join(f"{v:.2f}" for _, v in sorted(d.items()))  # noqa: E731
        out.append(f"| {s} | {m.get('shipped_round', '-')} | {m.get('why', '')} | {fmt(ga.get('paper', {}))} | "
                   f"{fmt(ga.get('default', {}))} |")
    out += ["", "#### Training per round (loss start -> end, pairs/s)", "", "| seed | run | per round |", "|---|---|---|"]
    for s in seeds:
        for n, rounds in results[s].get("train", {}).items():
            cells = [f"r{i}: {t['loss_start']:.3f} -> {t['loss_end']:.3f} ({t['pairs']} pairs, {t['pairs_per_s']:.2f}/s)"
                     for i, t in enumerate(rounds) if t]
            out.append(f"| {s} | {n} | " + "; ".join(cells) + " |")
    return "\n".join(out)


def write_markdown(md: Path, body: str) -> None:
    text = md.read_text() if md.is_file() else ""
    if BEGIN not in text or END not in text:
        text = text.rstrip() + "\n\n" + BEGIN + "\n" + END + "\n"
    pre, rest = text.split(BEGIN, 1)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(pre + BEGIN + "\n" + body.rstrip() + "\n" + END + rest.split(END, 1)[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="random seeds (default 42 43 44)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "smol-results", help="where the runs go")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "results.md", help="markdown file to write")
    ap.add_argument("--split", choices=["eval", "val"], default="eval", help="eval prompts, or val prompts to tune on")
    ap.add_argument("--limit", type=int, default=100, help="prompts evaluated (default 100 of the split's 200)")
    ap.add_argument("--temperature", type=float, default=0.7, help="eval sampling temperature (default 0.7)")
    ap.add_argument("--dpo100-epochs", type=int, default=1, help="epochs of DPO on 100%% of the gold pairs (default 1)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to run (default all)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE config override for every run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the real model uses both cores)")
    args = ap.parse_args()

    import torch

    from selfie_lite.config import parse_override

    torch.set_num_threads(args.threads)
    args.overrides = [parse_override(s) for s in args.sets]
    args.out.mkdir(parents=True, exist_ok=True)
    quiet = Console(file=io.StringIO())
    timings = Timings(args.out / "timings.json")
    t_start = time.perf_counter()
    results = {}
    for seed in args.seeds:
        folders = train_seed(seed, args, quiet, timings)
        res = evaluate_seed(seed, folders, args, timings)
        if res is not None:
            results[seed] = res
        log(f"seed {seed}: done ({time.perf_counter() - t_start:.0f} s so far)")
    if not results:
        return
    # the settings of the first seed whose runs are still here (a seed's eval json outlives its run folders)
    kept = [k for k in sorted(results) if (args.out / f"seed-{k}" / "default" / "config.json").is_file()]
    cfg = json.loads((args.out / f"seed-{kept[0]}" / "default" / "config.json").read_text())
    s = results[min(results)]["settings"]
    # every part of these seeds as timed when it really ran (this invocation may have run none of them)
    spent = {k: v for k, v in timings.stored.items() if any(k.startswith(f"seed {n}: ") for n in results)}
    notes = [f"- Seed {k}: {results[k]['note']}." for k in sorted(results) if results[k].get("note")]
    head = [
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `" + " ".join(["python benchmarks/smol_results.py", *sys.argv[1:]]) + "`.",
        "",
        "- Settings: examples/smol.toml as shipped" + (f", with --set {', '.join(args.sets)}" if args.sets else "") + ".",
        f"- Random seeds {', '.join(map(str, sorted(results)))}; the first {s['prompts']} held-out {args.split} prompts, one "
        f"answer per prompt and model at temperature {s['temperature']} (at most {s['max_new_tokens']} new tokens), the "
        "same sampling seed for every model; scored by the checker (selfie_lite/smol/checker.py).",
        f"- Labelled seed {cfg['data']['labelled_share']}; pools {cfg['data']['pool_sizes']}; beta {cfg['beta']}; learning "
        f"rate {cfg['train']['learning_rate']}; LoRA r {cfg['lora']['r']}; DPO-100% {args.dpo100_epochs} epoch(s).",
        f"- Wall time: {sum(spent.values()) / 60:.0f} min for the {len({k.split(':')[0] for k in spent})} seed(s) timed, "
        f"on {args.threads} torch threads of "
        f"{os.cpu_count()} CPU cores ({platform.machine()}; the seeds' parts as they really ran, from "
        f"{args.out.name}/timings.json). Per seed: {per_part(spent)}.",
        *notes,
        "",
    ]
    write_markdown(args.md, "\n".join(head) + "\n" + tables(results))
    (args.out / f"results-{args.split}.json").write_text(json.dumps(
        {"timings": dict(timings), "results": {str(k): v for k, v in results.items()}}, indent=2))
    log(f"wrote {args.md}")


if __name__ == "__main__":
    main()
