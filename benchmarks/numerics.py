"""Are the loop's float results the same across processes? What makes them differ, and what does fixing it cost?

    python benchmarks/numerics.py                 # the tiny preset's SFT model, 128 prompts x 2 samples
    python benchmarks/numerics.py --prompts 64 --repeats 2

Each cell runs in a FRESH subprocess (as a resumed run does): sample with log-prob recording (the judge's policy
term), then score the samples with a forward pass (the judge's reference term), and hash every float bit for bit.
Conditions vary what a resume could change without changing any input:
  - the torch thread count (1 or 2);
  - the process's history before the stage: a "disturbed" worker first allocates odd-sized buffers and runs
    unrelated matrix products of other shapes (heap layout and first-call state, as a long pytest session or a
    notebook would have);
  - MKL's conditional numerical reproducibility mode (MKL_CBWR), set or not.
A row is "same" when its hash equals the undisturbed run with the same thread count and MKL setting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.disturb:
        junk = [bytearray(1000 + 37 * i) for i in range(200)]  # shift the heap
        for n in (3, 17, 129, 333):  # first calls of other GEMM shapes
            a = torch.randn(n, n + 5)
            (a @ a.T).sum()
        del junk
    sys.path.insert(0, str(ROOT))
    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.config import RunConfig
    from selfie_lite.rundir import read_jsonl
    from selfie_lite.tiny.build import build_tiny

    preset = build_tiny()
    prompts = [r["prompt"] for r in read_jsonl(preset.eval_prompts)[: args.prompts]]
    be = HFBackend(RunConfig())
    model, tok = be.load(preset.model_dir)
    t0 = time.perf_counter()
    rows = be.generate(model, tok, prompts, num_samples=2, temperature=0.7, top_p=1.0, max_new_tokens=40,
                       batch_size=64, seed=1234)
    t1 = time.perf_counter()
    seqs = [(r["prompt_ids"], ids) for r in rows for ids in r["response_ids"]]
    logps = be.sequence_logps(model, seqs, batch_size=64)
    t2 = time.perf_counter()
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r["response_ids"]).encode())
        h.update(struct.pack(f"{len(r['policy_logps'])}d", *r["policy_logps"]))
    h.update(struct.pack(f"{len(logps)}d", *logps))
    print(json.dumps({"hash": h.hexdigest()[:12], "sample_s": t1 - t0, "score_s": t2 - t1,
                      "first_logp": rows[0]["policy_logps"][0]}))


def run_cell(threads: int, disturb: bool, cbwr: str | None, prompts: int) -> dict:
    env = dict(os.environ)
    env.pop("MKL_CBWR", None)
    if cbwr:
        env["MKL_CBWR"] = cbwr
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--prompts", str(prompts)]
    if disturb:
        cmd.append("--disturb")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--disturb", action="store_true")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats per cell (median)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"cross-process reproducibility: tiny SFT model, {args.prompts} prompts x 2 samples + scoring")
    for col in ("threads", "MKL_CBWR", "process history", "hash", "same as fresh", "sample s", "score s"):
        t.add_column(col)
    for cbwr in (None, "AUTO,STRICT"):
        for threads in (1, 2):
            base = None
            for disturb in (False, True):
                cells = [run_cell(threads, disturb, cbwr, args.prompts) for _ in range(args.repeats)]
                hashes = {c["hash"] for c in cells}
                base = base or cells[0]["hash"]
                t.add_row(str(threads), cbwr or "unset", "disturbed" if disturb else "fresh",
                          ",".join(sorted(hashes)), "yes" if hashes == {base} else "NO",
                          f"{statistics.median(c['sample_s'] for c in cells):.2f}",
                          f"{statistics.median(c['score_s'] for c in cells):.2f}")
    Console().print(t)


if __name__ == "__main__":
    main()
