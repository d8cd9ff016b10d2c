"""Peak CPU memory of one training micro-batch and of one judging batch, before and after the chunked loss (issue 12).

    python benchmarks/memory.py                                   # the table in docs/performance.md (~200 s, 2 cores)
    python benchmarks/memory.py --vocab 32000 --seq-len 512       # one column
    python benchmarks/memory.py --fresh-per-cell                  # one process per cell (slower; a cross-check)

The model: a random-weight Llama with a real vocabulary (32,000: Llama 2 / Mistral; 152,064: Qwen 2.5) and a short
stack (hidden 256, 2 layers, untied output layer) so that it runs on 2 cores, fp32, with LoRA (r 16) on every linear
layer like the presets. Batches: `--pairs` preference pairs (2 rows each) of seq-len tokens, the first half prompt,
the second half response (train.max_prompt_length = train.max_length / 2, as the presets), and `--judge-batch`
sequences of seq-len tokens for the judge.

What each row measures (each is the extra memory at its peak, above what the process held before it):
    loss only          the policy's sequence log-probs and their backward pass, from the last hidden states:
                       before: full logits -> log_softmax sum (the code this replaced); after: loss.sequence_logps
    train lam=0        one micro-batch: forward, loss, backward. before: the old compute_loss (policy logits and the
                       adapter-off reference logits in every step); after: SPADPOTrainer.compute_loss itself, with
                       the reference log-probs from the pass before training (train.reference_pass)
    reference pass     after only: one micro-batch of train.reference_pass (once per round, no gradient)
    train lam>0        one micro-batch with noise detection (round 1: lam = 1/2): before: the old compute_loss with
                       the extrapolated margin over full logits; after: SPADPOTrainer.compute_loss
    judge              one batch of the judge's scoring: before: the old HFBackend.sequence_logps body (kept below);
                       after: HFBackend.sequence_logps

How it is measured: torch's CPU allocations are invisible to tracemalloc, so this reads the kernel's resident-set
high-water mark. Each (vocabulary, length, before/after) runs in a fresh Python process; there, each measurement
runs its operation once on a short batch (first-call workspaces), resets the high-water mark (writing 5 to
/proc/self/clear_refs), reads VmRSS, runs the operation and reports VmHWM - VmRSS. MALLOC_MMAP_THRESHOLD_ is fixed
at 64 KiB so that every large tensor is its own mapping, returned to the kernel when freed (glibc's default raises
its threshold after such frees and would keep freed memory resident, counted in later baselines).
--fresh-per-cell runs every row in its own process instead, as a check of that.

The "before" code is kept here (old_*), as it was in selfie_lite before this change; the "after" rows call the
package's own code.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ROWS = ["loss only", "train lam=0", "reference pass", "train lam>0", "judge"]
MB = 2**20
LAM, BETA = 0.5, 0.1


# ---------------------------------------------------------------------------------------------
# Measuring


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def pin_mmap_threshold(nbytes: int = 65536) -> None:
    """glibc's mallopt(M_MMAP_THRESHOLD): every allocation of nbytes or more is its own mapping, returned to the
    kernel when freed, and the threshold stops adapting (as MALLOC_MMAP_THRESHOLD_ in the environment does)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, nbytes)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: the figures may then undercount memory reused from the heap


def peak_extra_bytes(op, warmup) -> int:
    """Run warmup(), then op(); bytes of resident memory op needed above what was resident when it started."""
    warmup()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    op()
    return _status("VmHWM") - base


# ---------------------------------------------------------------------------------------------
# The code before issue 12 (selfie_lite/refine.py, train.py compute_loss, backends/hf.py), kept to measure it


def old_sequence_logps(logits, labels, mask):
    import torch

    mask = mask.bool()
    labels = labels.masked_fill(~mask, 0)
    logits = logits.float()
    token_logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.where(mask, token_logps, 0.0).sum(-1)


def old_extrapolated_logps(policy_logits, ref_logits, labels, mask, lam, vocab_chunk=8192):
    import torch

    with torch.no_grad():
        mask = mask.bool()
        labels = labels.masked_fill(~mask, 0)
        log_norm = None
        for start in range(0, policy_logits.size(-1), vocab_chunk):
            h_theta = policy_logits[..., start : start + vocab_chunk].float()
            h_ref = ref_logits[..., start : start + vocab_chunk].float()
            chunk_lse = torch.logsumexp((1 + lam) * h_theta - lam * h_ref, dim=-1)
            log_norm = chunk_lse if log_norm is None else torch.logaddexp(log_norm, chunk_lse)
        idx = labels.unsqueeze(-1)
        h_g_label = (1 + lam) * policy_logits.gather(-1, idx).squeeze(-1).float() - lam * ref_logits.gather(
            -1, idx).squeeze(-1).float()
        return torch.where(mask, h_g_label - log_norm, 0.0).sum(-1)


def old_train_step(model, inputs, lam):
    """The old compute_loss (paper reference: adapter-off forward in every step), then backward."""
    import torch

    from selfie_lite.loss import dpo_losses

    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    labels, mask = input_ids[:, 1:], inputs["completion_mask"][:, 1:].bool()
    policy_logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    policy_logps = old_sequence_logps(policy_logits, labels, mask)
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    ref_logps = old_sequence_logps(ref_logits, labels, mask)
    if lam > 0:
        g = old_extrapolated_logps(policy_logits.detach(), ref_logits, labels, mask, lam)
        g_c, g_r = g.chunk(2)
        r_c, r_r = old_sequence_logps(ref_logits, labels, mask).chunk(2)
        _ = BETA * ((g_c - r_c) - (g_r - r_r))
    pc, pr = policy_logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    dpo_losses(pc, pr, rc, rr, BETA)[0].mean().backward()


def old_judge(model, ids, attn, labels_mask):
    """The old HFBackend.sequence_logps body for one batch."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        target = ids[:, 1:]
        token_logp = torch.gather(logits, -1, target.unsqueeze(-1)).squeeze(-1).float()
        token_logp = token_logp - torch.logsumexp(logits.float(), dim=-1)
        return (token_logp * labels_mask[:, 1:]).sum(-1)


# ---------------------------------------------------------------------------------------------
# The model, the batches, and a stand-in trainer around the real compute_loss


def build_model(vocab: int, hidden: int, layers: int, seq_len: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=max(seq_len, 128), tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(LlamaForCausalLM(config), lora)
    model.train()
    return model


def examples(n_pairs: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    half = seq_len // 2
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    return [{"pair_id": i, "prompt_ids": ids(half), "chosen_ids": ids(seq_len - half), "rejected_ids": ids(seq_len - half)}
            for i in range(n_pairs)]


def stand_in_trainer(model, lam: float, ref_table: dict | None, exs: list[dict]):
    """An object with what SPADPOTrainer.compute_loss and train.reference_pass read, and their methods bound to it:
    the measured code is the package's, without building a TRL trainer (dataset tokenisation, accelerate)."""
    from selfie_lite.config import RefineConfig
    from selfie_lite.smoothing import smoothing_of
    from selfie_lite.trainer import PairCollator, SPADPOTrainer

    t = types.SimpleNamespace(
        model=model, smoother=smoothing_of(RefineConfig() if lam > 0 else None, lam, []), ref_logps=ref_table, beta=BETA,
        state=types.SimpleNamespace(global_step=0, max_steps=10), args=types.SimpleNamespace(learning_rate=1e-5),
        accelerator=types.SimpleNamespace(unwrap_model=lambda m: m), pair_stats={}, seen_after_warmup=0,
        smoothed_after_warmup=0, _metrics={"train": __import__("collections").defaultdict(list)},
        train_dataset=exs, data_collator=PairCollator(pad_token_id=0), compute_loss_context_manager=contextlib.nullcontext,
    )
    for name in ("compute_loss", "_given_ref_logps", "_record"):
        setattr(t, name, types.MethodType(getattr(SPADPOTrainer, name), t))
    return t


# ---------------------------------------------------------------------------------------------
# One process: every row of one (vocabulary, length, path)


def run_cell(spec: dict) -> dict:
    import torch

    pin_mmap_threshold()
    torch.set_num_threads(spec["threads"])
    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.config import RunConfig
    from selfie_lite.reference import reference_pass
    from selfie_lite.trainer import PairCollator

    V, T, path = spec["vocab"], spec["seq_len"], spec["path"]
    model = build_model(V, spec["hidden"], spec["layers"], T)
    collate = PairCollator(pad_token_id=0)
    short = 64  # warm-up length
    ex, ex_short = examples(spec["pairs"], T, V), examples(spec["pairs"], short, V, seed=1)
    batch, batch_short = collate(ex), collate(ex_short)
    judge_seqs = [(e["prompt_ids"], e["chosen_ids"]) for e in examples(spec["judge_batch"], T, V, seed=2)]
    judge_short = [(e["prompt_ids"], e["chosen_ids"]) for e in examples(spec["judge_batch"], short, V, seed=3)]
    hf = HFBackend(RunConfig())

    def judge_tensors(seqs):
        ids = torch.tensor([p + r for p, r in seqs])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, (p, _) in enumerate(seqs):
            mask[row, len(p):] = True
        return ids, torch.ones_like(ids), mask

    def zero_grad():
        model.zero_grad(set_to_none=True)

    def train_after(b, exs, lam):
        table = reference_pass(stand_in_trainer(model, 0.0, None, exs), spec["pairs"]) if lam == 0 else None
        trainer = stand_in_trainer(model, lam, table, exs)

        def op():
            trainer.compute_loss(model, b).backward()
            zero_grad()
        return op

    def loss_only(b, after: bool):
        # the policy's last hidden states as a leaf: what the loss itself adds on top of the model's forward
        from selfie_lite.loss import LastHidden, sequence_logps

        with torch.no_grad():
            hidden = model.get_base_model().model(input_ids=b["input_ids"],
                                                  attention_mask=b["attention_mask"])[0][:, :-1]
        head = model.get_base_model().lm_head
        labels, mask = b["input_ids"][:, 1:], b["completion_mask"][:, 1:]

        def op():
            h = hidden.clone().requires_grad_()
            if after:
                logps = sequence_logps(LastHidden(h, head.weight), labels, mask)
            else:
                logps = old_sequence_logps(head(h), labels, mask)
            logps.sum().backward()
        return op

    results = {}
    after = path == "after"
    ops = {
        "loss only": (loss_only(batch, after), loss_only(batch_short, after)),
        "judge": ((lambda: hf.sequence_logps(model, judge_seqs, batch_size=len(judge_seqs))),
                  (lambda: hf.sequence_logps(model, judge_short, batch_size=len(judge_short))))
        if after else ((lambda: old_judge(model, *judge_tensors(judge_seqs))),
                       (lambda: old_judge(model, *judge_tensors(judge_short)))),
    }
    if after:
        ops["train lam=0"] = (train_after(batch, ex, 0.0), train_after(batch_short, ex_short, 0.0))
        ops["train lam>0"] = (train_after(batch, ex, LAM), train_after(batch_short, ex_short, LAM))
        ops["reference pass"] = ((lambda: reference_pass(stand_in_trainer(model, 0.0, None, ex), spec["pairs"])),
                                 (lambda: reference_pass(stand_in_trainer(model, 0.0, None, ex_short), spec["pairs"])))
    else:
        for row, lam in (("train lam=0", 0.0), ("train lam>0", LAM)):
            ops[row] = ((lambda b=batch, lam=lam: (old_train_step(model, b, lam), zero_grad())),
                        (lambda b=batch_short, lam=lam: (old_train_step(model, b, lam), zero_grad())))
    for row in spec["rows"]:
        if row not in ops:
            continue
        model.train(row != "judge")
        op, warm = ops[row]
        t0 = time.perf_counter()
        results[row] = {"bytes": peak_extra_bytes(op, warm), "seconds": round(time.perf_counter() - t0, 2)}
        model.train()
    return results


# ---------------------------------------------------------------------------------------------
# The driver


def spawn(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def bound_bytes(spec: dict, vocab: int, seq_len: int) -> int:
    """The issue's goal for the loss: 2 x (rows x T x hidden) fp32 + one [chunk, V] fp32 block."""
    from selfie_lite.loss import chunk_tokens_for

    rows = 2 * spec["pairs"]
    return 2 * rows * seq_len * spec["hidden"] * 4 + chunk_tokens_for(vocab) * vocab * 4


def table(results: dict, spec: dict) -> str:
    out = ["| vocabulary | T | what | before MB | after MB | before / after |",
           "| ---: | ---: | --- | ---: | ---: | ---: |"]
    for (vocab, seq_len), cell in results.items():
        for row in spec["rows"]:
            b = cell["before"].get(row, {}).get("bytes")
            a = cell["after"].get(row, {}).get("bytes")
            ratio = f"{b / a:.1f}x" if a and b else "-"
            out.append(f"| {vocab:,} | {seq_len} | {row} | {'-' if b is None else f'{b / MB:,.0f}'} | "
                       f"{'-' if a is None else f'{a / MB:,.0f}'} | {ratio} |")
    out.append("")
    out.append("Goal for the loss (2 x rows x T x hidden + one chunk, fp32): " + ", ".join(
        f"V {v:,}, T {t}: {bound_bytes(spec, v, t) / MB:,.0f} MB" for v, t in results))
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    p.add_argument("--seq-len", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--pairs", type=int, default=1, help="preference pairs per training micro-batch (2 rows each)")
    p.add_argument("--judge-batch", type=int, default=2, help="sequences per judging batch")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    p.add_argument("--fresh-per-cell", action="store_true", help="one process per row, not per column")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_cell(json.loads(args.worker))), flush=True)
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown --rows {sorted(unknown)}; choose from {ROWS}")
    spec = {"pairs": args.pairs, "judge_batch": args.judge_batch, "hidden": args.hidden, "layers": args.layers,
            "threads": args.threads, "rows": rows}
    results: dict = {}
    t0 = time.perf_counter()
    for vocab in args.vocab:
        for seq_len in args.seq_len:
            cell = results.setdefault((vocab, seq_len), {})
            for path in ("before", "after"):
                groups = [[r] for r in rows] if args.fresh_per_cell else [rows]
                cell[path] = {}
                for group in groups:
                    cell[path].update(spawn({**spec, "vocab": vocab, "seq_len": seq_len, "path": path,
                                             "rows": group}, timeout=1800))
                print(f"  V {vocab:,} T {seq_len} {path}: " + ", ".join(
                    f"{r} {v['bytes'] / MB:,.0f} MB ({v['seconds']} s)" for r, v in cell[path].items()),
                    file=sys.stderr, flush=True)
    print(f"\nPeak extra memory (VmHWM - VmRSS, MB), {args.pairs} pair(s) = {2 * args.pairs} rows per micro-batch, "
          f"{args.judge_batch} sequences per judge batch, hidden {args.hidden}, {args.layers} layers, fp32, "
          f"{time.perf_counter() - t0:.0f} s:\n")
    print(table(results, spec))
    if args.json:
        args.json.write_text(json.dumps({f"{v},{t}": c for (v, t), c in results.items()} | {"spec": spec}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
