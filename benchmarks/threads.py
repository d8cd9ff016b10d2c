"""How many torch threads should a small model use on a CPU? The main job, idle and beside a CPU hog.

    python benchmarks/threads.py                  # tiny preset, seed DPO + 1 round, threads 1 and 2, idle and loaded
    python benchmarks/threads.py --rounds 3 --timeout 900

Each cell is `selfie-lite run --seed 3.3pct --set threads=N` in a fresh run folder (the preset already built), timed
end to end. "loaded" runs one busy process per core beside it (pure Python loops), as a shared machine, a CI
runner or a notebook's other work would. The result decides `threads = 0` (auto) in selfie_lite/numerics.py.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time


def hog(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def run_once(threads: int, rounds: int, timeout: float) -> float | None:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "selfie_lite", "run", "--seed", "3.3pct", "--rounds", str(rounds),
               "--set", f"threads={threads}", "--out", os.path.join(d, "run")]
        t0 = time.perf_counter()
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--timeout", type=float, default=600, help="seconds per cell; slower cells show as '> timeout'")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    from selfie_lite.tiny.build import build_tiny

    build_tiny()  # not timed
    rows = []
    for load in ("idle", "loaded"):
        for n in args.threads:
            hogs = []
            if load == "loaded":
                stop = time.time() + args.timeout + 60
                hogs = [mp.Process(target=hog, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 2)]
                for h in hogs:
                    h.start()
            try:
                seconds = run_once(n, args.rounds, args.timeout)
            finally:
                for h in hogs:
                    h.terminate()
            rows.append((load, n, seconds))
            print(f"{load} threads={n}: {'timeout' if seconds is None else f'{seconds:.1f} s'}", flush=True)
    t = Table(title=f"selfie-lite run --seed 3.3pct --rounds {args.rounds} (tiny preset, cached), {os.cpu_count()} cores")
    for col in ("machine", "torch threads", "wall seconds"):
        t.add_column(col)
    for load, n, s in rows:
        t.add_row(load, str(n), f"> {args.timeout:.0f}" if s is None else f"{s:.1f}")
    Console().print(t)


if __name__ == "__main__":
    main()
