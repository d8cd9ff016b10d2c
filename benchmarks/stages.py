"""Each stage's time, throughput and peak memory (RSS) on the real model, in full precision and in 4-bit (QLoRA).

    python benchmarks/stages.py                    # three one-round smol runs: fp32, --load-in-4bit, checkpointing
    python benchmarks/stages.py --runs DIR [DIR]   # only the table, from finished run folders

Every run: `selfie-lite run --preset smol --seed 3.3pct --rounds 1` with a 24-prompt pool and the seed DPO on one
epoch (so that each fits in minutes; everything else as examples/smol.toml ships it), the same random seed, torch
on 2 threads. The figures are read off each stage's done/<stage>.json: seconds, throughput (tokens/s sampling,
sequences/s judging, pairs/s training) and peak_rss_mb, the stage's own peak RSS of the process (selfie_lite/rss.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> (run folder, overrides). Gradient checkpointing is off in the smol preset (faster on a CPU): the third
# variant measures what turning it on saves in memory and costs in time.
VARIANTS = {"fp32": ("fp32", []), "4-bit (nf4)": ("4-bit", [{"load_in_4bit": True}]),
            "fp32, checkpointing": ("fp32-ckpt", [{"train": {"gradient_checkpointing": True}}])}
SMALL = [{"rounds": 1, "data": {"pool_sizes": [24]}, "train": {"seed_epochs": 1}}]
RATE = {"sample": ("tokens_per_s", "tok/s"), "judge": ("sequences_per_s", "seq/s"), "train": ("pairs_per_s", "pairs/s")}


def run_variant(name: str, folder: str, overrides: list[dict], out: Path, seed: int, threads: int) -> Path:
    from selfie_lite import api
    from selfie_lite.config import load_config

    run_dir = out / folder
    cfg = load_config("smol", None, [{"random_seed": seed, "threads": threads}, *SMALL, *overrides])
    quiet = Console(file=io.StringIO())
    t0 = time.perf_counter()
    api.execute(api.prepare(cfg, run_dir, resume=(run_dir / "config.json").is_file(), console=quiet), console=quiet)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def rows_of(run_dir: Path) -> list[tuple]:
    """(round, stage, seconds, rate text, peak RSS MB) per finished stage, in the order the loop ran them."""
    rows = []
    for rd in sorted(run_dir.glob("round-*"), key=lambda p: int(p.name.split("-")[1])):
        done = rd / "done"
        for marker in sorted(done.glob("*.json"), key=lambda p: p.stat().st_mtime_ns):
            m = json.loads(marker.read_text())
            key, unit = RATE.get(marker.stem, (None, ""))
            rate = f"{m[key]:,.2f} {unit}" if key and isinstance(m.get(key), (int, float)) else ""
            rows.append((rd.name, marker.stem, m.get("seconds"), rate, m.get("peak_rss_mb")))
    return rows


def table(runs: dict[str, Path]) -> Table:
    t = Table(title="Stages on SmolLM2-135M-Instruct, 2 cores")
    for col in ("variant", "round", "stage", "seconds", "throughput", "peak RSS MB"):
        t.add_column(col, justify="right" if col in ("seconds", "peak RSS MB") else "left")
    for name, run_dir in runs.items():
        for rnd, stage, secs, rate, rss in rows_of(run_dir):
            t.add_row(name, rnd, stage, "-" if secs is None else f"{secs:.1f}", rate, "-" if rss is None else f"{rss:,.0f}")
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "stages", help="where the runs go")
    ap.add_argument("--runs", type=Path, nargs="+", help="only print the table of these finished run folders")
    ap.add_argument("--seed", type=int, default=42, help="random seed of both runs (default 42)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if args.runs:
        runs = {p.name: p for p in args.runs}
    else:
        runs = {name: run_variant(name, folder, over, args.out, args.seed, args.threads)
                for name, (folder, over) in VARIANTS.items()}
    Console(width=160).print(table(runs))
    if args.json:
        args.json.write_text(json.dumps({n: rows_of(p) for n, p in runs.items()}, indent=2))


if __name__ == "__main__":
    main()
