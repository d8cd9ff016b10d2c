"""Pipeline overhead: our sampling and judging stages against the bare transformers calls doing the same work.

    python benchmarks/pipeline.py                # the tiny preset, 256 prompts x 2 samples, best of 3
    python benchmarks/pipeline.py --model DIR --prompts 64 --max-new-tokens 128

Sampling: our stage (sample_round: chunking, left padding, seeding, eos trimming, atomic shard writes) vs a bare
batched model.generate with the same prompts, batch size and settings; tokens/s counts generated tokens up to and
including end-of-sequence. Judging: our stage (judge_round: policy and SFT-reference log-probs, pairing, file
writes) vs bare batched forward passes over the same sequences with both models; "sequences/s" counts sequences
scored by both models. Two rows for the judge: with judge.policy_from_sampling=false (two forward passes, like the
bare side) and the default (the policy term comes from the sampling pass, one forward pass). Model loading is excluded from
both sides (the stage loads each model once per round). The goal (issue 3): ours >= 0.8x bare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def bare_generate(model, tok, prompt_ids, batch_size, max_new_tokens, temperature, top_p, k, eos_ids):
    tokens = 0
    t0 = time.perf_counter()
    for s in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[s : s + batch_size]
        enc = tok.pad({"input_ids": batch}, padding=True, return_tensors="pt", padding_side="left")
        with torch.inference_mode():
            out = model.generate(**enc.to(model.device), do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                 max_new_tokens=max_new_tokens, num_return_sequences=k, pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            tokens += next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
    return tokens, time.perf_counter() - t0


def bare_logps(model, seqs, batch_size):
    t0 = time.perf_counter()
    for s in range(0, len(seqs), batch_size):
        batch = seqs[s : s + batch_size]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, (p, r) in enumerate(batch):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            attn[i, : len(p) + len(r)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=attn.to(model.device)).logits[:, :-1]
            torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None].to(model.device))
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model folder (default: the tiny preset's SFT model)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.config import load_config, parse_override
    from selfie_lite.judge import flat_sequences, judge_round
    from selfie_lite.rundir import read_jsonl
    from selfie_lite.sample import load_samples, sample_round
    from selfie_lite.tiny.build import build_tiny

    preset = build_tiny()
    model_dir = Path(args.model or preset.model_dir)
    over = [parse_override(f"sample.chunk_size={args.prompts}")]
    if args.max_new_tokens:
        over.append(parse_override(f"sample.max_new_tokens={args.max_new_tokens}"))
    cfg = load_config("tiny", None, over)
    cfg_two_pass = load_config("tiny", None, [*over, parse_override("judge.policy_from_sampling=false")])
    prompts = [r["prompt"] for r in read_jsonl(preset.val_prompts)][: args.prompts]
    be = HFBackend(cfg)
    model, tok = be.load(model_dir)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    from selfie_lite.chat import chat_prompt_ids

    prompt_ids = [chat_prompt_ids(tok, p) for p in prompts]
    s = cfg.sample
    rows = []
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            rd = Path(d)
            m_ours = sample_round(cfg, rd, be, model_dir, prompts, 1)
            torch.manual_seed(rep)
            n_bare, t_bare = bare_generate(model, tok, prompt_ids, s.batch_size, s.max_new_tokens, s.temperature,
                                           s.top_p, s.num_samples, eos_ids)
            samples = load_samples(rd)
            seqs = flat_sequences(samples)
            (rd / "two").mkdir()
            _, m_two = judge_round(cfg_two_pass, rd / "two", be, samples, model_dir, model_dir, None)
            (rd / "one").mkdir()
            _, m_one = judge_round(cfg, rd / "one", be, samples, model_dir, model_dir, None)
            t_bare_judge = bare_logps(model, seqs, cfg.judge.batch_size) + bare_logps(model, seqs, cfg.judge.batch_size)
            rows.append({
                "sample_ours_tok_s": m_ours["tokens_per_s"],
                "sample_bare_tok_s": n_bare / t_bare,
                "judge_two_pass_seq_s": m_two["sequences_per_s"],
                "judge_ours_seq_s": m_one["sequences_per_s"],
                "judge_bare_seq_s": len(seqs) / t_bare_judge,
                "sequences": len(seqs),
            })
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    t = Table(title=f"pipeline overhead: {model_dir.name}, {len(prompts)} prompts x {s.num_samples}, "
                    f"{s.max_new_tokens} new tokens max, {torch.get_num_threads()} threads, median of {args.repeats}")
    for c in ("stage", "ours", "bare", "ours / bare", "goal"):
        t.add_column(c)
    t.add_row("sampling (tokens/s)", f"{med['sample_ours_tok_s']:,.0f}", f"{med['sample_bare_tok_s']:,.0f}",
              f"{med['sample_ours_tok_s'] / med['sample_bare_tok_s']:.2f}x", ">= 0.8x")
    t.add_row("judging, two passes (sequences/s)", f"{med['judge_two_pass_seq_s']:,.0f}", f"{med['judge_bare_seq_s']:,.0f}",
              f"{med['judge_two_pass_seq_s'] / med['judge_bare_seq_s']:.2f}x", ">= 0.8x")
    t.add_row("judging, default (sequences/s)", f"{med['judge_ours_seq_s']:,.0f}", f"{med['judge_bare_seq_s']:,.0f}",
              f"{med['judge_ours_seq_s'] / med['judge_bare_seq_s']:.2f}x", ">= 0.8x")
    Console().print(t)
    if args.json:
        args.json.write_text(json.dumps({"median": med, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
