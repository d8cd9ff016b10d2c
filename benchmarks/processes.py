"""One process against two (`accelerate launch`, distributed.py) on the same round: are the self-labelled pairs the
same bytes, how far apart are the trained models, and how long does each take.

    python benchmarks/processes.py              # the smol preset (SmolLM2-135M-Instruct, the real chat model)
    python benchmarks/processes.py --toy        # the toy model of the tests (seconds)

A one-process run makes round 0 and round 1 on one torch thread (the reference). Its round 0 is then copied, and
round 1 is made again by resuming the copy: with one process on one thread, one process on two threads (what
selfie-lite does on this 2-core machine by default), and two processes on one thread each (over gloo). The table
gives the resumed session's wall time (process start and model loads included), each stage's seconds from its
done/<stage>.json, whether the samples, judged pairs and reference log-probs are byte-identical to the reference
run's round 1, and the largest weight difference of the round-1 model.

The smol run: `--preset smol --seed 3.3pct --rounds 1`, a 24-prompt pool in chunks of 6 (so that two processes
have chunks to share), the seed DPO on one epoch, as benchmarks/stages.py sizes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ((1, 1), (1, 2), (2, 1))  # (processes, torch threads each)
STAGES = ("sample", "judge", "reference", "train", "merge")
LABELS = ["judged.jsonl", "reference_logps.json", "train_reference_logps.json"]
SMOL = ["--preset", "smol", "--seed", "3.3pct", "--rounds", "1", "--set", "data.pool_sizes=[24]",
        "--set", "train.seed_epochs=1", "--set", "sample.chunk_size=6", "--random-seed", "0"]
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, threads: int, args: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    run = ["-m", "selfie_lite", "run", *args, "--set", f"threads={threads}"]
    cmd = [sys.executable, *run] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_port()),
        *run]
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - start


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def same_labels(a: Path, b: Path) -> str:
    files = sorted(p.relative_to(a).as_posix() for p in (a / "samples").glob("chunk-*.jsonl")) + LABELS
    same = [f for f in files if (a / f).is_file() and (a / f).read_bytes() == (b / f).read_bytes()]
    return "yes" if len(same) == len(files) else f"no ({len(files) - len(same)} of {len(files)} files differ)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="the tests' toy model instead of the smol preset")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-processes")
    ap.add_argument("--table", action="store_true", help="only the table, from the run folders under --out")
    a = ap.parse_args()
    if a.table:
        return print_table(a.out, a.toy, json.loads((a.out / "walls.json").read_text()))
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    if a.toy:
        sys.path.insert(0, str(ROOT))
        from selfie_lite.testing import build_toy_run

        args = build_toy_run(a.out)
    else:
        args = SMOL
    ref = a.out / "reference"
    Console(stderr=True).print(f"reference: one process, one thread -> {ref}")
    launch(1, 1, [*args, "--out", str(ref)])
    walls = {}
    for processes, threads in LAYOUTS:
        run = a.out / f"p{processes}-t{threads}"
        shutil.copytree(ref, run, ignore=shutil.ignore_patterns("round-1", "summary.json"))
        Console(stderr=True).print(f"round 1: {processes} process(es), {threads} thread(s) each -> {run}")
        walls[run.name] = launch(processes, threads, ["--resume", str(run), "--force"])
        (a.out / "walls.json").write_text(json.dumps(walls))
    print_table(a.out, a.toy, walls)


def print_table(out: Path, toy: bool, walls: dict) -> None:
    ref = out / "reference"
    t = Table(title=f"round 1 of the {'toy model' if toy else 'smol preset (SmolLM2-135M-Instruct)'}: one process "
                    "against two (2 CPU cores)")
    for col in ("processes x threads", "wall s", *(f"{s} s" for s in STAGES), "pairs = reference (bytes)",
                "max |dw| vs reference"):
        t.add_column(col)
    for processes, threads in LAYOUTS:
        run = out / f"p{processes}-t{threads}"
        done = {s: json.loads((run / "round-1" / "done" / f"{s}.json").read_text()) for s in STAGES}
        t.add_row(f"{processes} x {threads} thread{'s' if threads > 1 else ''}", f"{walls[run.name]:.1f}",
                  *(f"{done[s].get('seconds', 0):.1f}" for s in STAGES),
                  same_labels(ref / "round-1", run / "round-1"),
                  f"{max_weight_diff(ref / 'round-1' / 'model', run / 'round-1' / 'model'):.1e}")
    Console(width=160).print(t)

if __name__ == "__main__":
    main()
