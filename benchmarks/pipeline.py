"""Pipeline overhead: our sampling, judging and training stages against the bare library calls doing the same work.

    python benchmarks/pipeline.py                # the tiny preset, 256 prompts x 2 samples, best of 3
    python benchmarks/pipeline.py --model DIR --prompts 64 --max-new-tokens 128
    python benchmarks/pipeline.py --preset smol --prompts 16 --train-pairs 32 --repeats 1   # SmolLM2 (about 8 min)

Sampling: our stage (sample_round: chunking, left padding, seeding, eos trimming, atomic shard writes) vs a bare
batched model.generate with the same prompts, batch size and settings; tokens/s counts generated tokens up to and
including end-of-sequence. Judging: our stage (judge_round: policy and SFT-reference log-probs, pairing, file
writes) vs bare batched forward passes over the same sequences with both models; "sequences/s" counts sequences
scored by both models. Two rows for the judge: with judge.policy_from_sampling=false (two forward passes, like the
bare side) and the default (the policy term comes from the sampling pass, one forward pass). Model loading is excluded from
both sides (the stage loads each model once per round). Training (--train-pairs > 0): our train_dpo (SPADPOTrainer:
per-pair smoothing, pair ids, the adapter-off reference scored once before the first step) against a stock
trl.DPOTrainer with the same LoRA adapter, pairs and DPOConfig settings, one epoch each on a fresh adapter; two
rows for ours: round 0 (plain DPO) and a round with the paper's noise detection (lambda 0.5: full reference logits
in every step). pairs/s counts pairs trained, the reference pass included. The goal: ours >= 0.8x bare.
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


def bare_train(model, tok, pairs, cfg, out_dir):
    """One epoch of stock TRL DPO (sigmoid loss, adapter-off reference every step) with our DPOConfig settings."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    t = cfg.train
    args = DPOConfig(output_dir=str(out_dir), learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
                     per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
                     num_train_epochs=1, max_grad_norm=t.max_grad_norm, gradient_checkpointing=t.gradient_checkpointing,
                     beta=cfg.beta, loss_type="sigmoid", max_length=t.max_length, disable_dropout=True, seed=0,
                     use_cpu=not torch.cuda.is_available(), report_to="none", disable_tqdm=True, save_strategy="no",
                     logging_strategy="no")
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    return len(pairs) / (time.perf_counter() - t0)


def train_rows(be, cfg, model_dir, pairs, out: Path) -> dict:
    """pairs/s: ours (round 0; with noise detection) and bare TRL, each on a fresh LoRA adapter of the same model."""
    from selfie_lite.smoothing import smoothing_of
    from selfie_lite.train import train_dpo

    def fresh():
        model, tok = be.load(model_dir, trainable=True)
        return be.add_lora(model, cfg.lora, seed=0), tok

    figures = {}
    for name, refine, lam in (("train_ours_pairs_s", None, 0.0), ("train_detect_pairs_s", cfg.refine, 0.5)):
        model, tok = fresh()
        res = train_dpo(model, tok, pairs, beta=cfg.beta, train=cfg.train, smoother=smoothing_of(refine, lam, []), epochs=1,
                        out_dir=out / name, seed=0)
        figures[name] = res.metrics["pairs_per_s"]
        be.free(model)
    model, tok = fresh()
    figures["train_bare_pairs_s"] = bare_train(model, tok, pairs, cfg, out / "bare")
    be.free(model)
    return figures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "smol"], default="tiny", help="settings, prompts and pairs of this preset")
    ap.add_argument("--model", default="", help="model folder (default: the preset's SFT model)")
    ap.add_argument("--train-pairs", type=int, default=64, help="gold pairs trained on per side (0: no training rows)")
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

    if args.preset == "smol":
        from selfie_lite.gguf import builtin_model
        from selfie_lite.smol.build import build_smol

        model_dir = Path(args.model or builtin_model("smollm2"))
        preset = build_smol(model_dir)
    else:
        preset = build_tiny()
        model_dir = Path(args.model or preset.model_dir)
    over = [parse_override(f"sample.chunk_size={args.prompts}")]
    if args.max_new_tokens:
        over.append(parse_override(f"sample.max_new_tokens={args.max_new_tokens}"))
    cfg = load_config(args.preset, None, over)
    cfg_two_pass = load_config(args.preset, None, [*over, parse_override("judge.policy_from_sampling=false")])
    prompts = [r["prompt"] for r in read_jsonl(preset.val_prompts)][: args.prompts]
    pairs = [dict(r, pair_id=i) for i, r in enumerate(read_jsonl(preset.preferences)[: args.train_pairs])]
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
            trained = train_rows(be, cfg, model_dir, pairs, rd / "train") if pairs else {}
            rows.append({
                **trained,
                "sample_ours_tok_s": m_ours["tokens_per_s"],
                "sample_bare_tok_s": n_bare / t_bare,
                "judge_two_pass_seq_s": m_two["sequences_per_s"],
                "judge_ours_seq_s": m_one["sequences_per_s"],
                "judge_bare_seq_s": len(seqs) / t_bare_judge,
                "sequences": len(seqs),
            })
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    def fmt(v: float) -> str:
        return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"

    t = Table(title=f"pipeline overhead: {args.preset} preset, {len(prompts)} prompts x {s.num_samples}, "
                    f"{s.max_new_tokens} new tokens max, {torch.get_num_threads()} threads, median of {args.repeats}")
    for c in ("stage", "ours", "bare", "ours / bare", "goal"):
        t.add_column(c)
    t.add_row("sampling (tokens/s)", fmt(med['sample_ours_tok_s']), fmt(med['sample_bare_tok_s']),
              f"{med['sample_ours_tok_s'] / med['sample_bare_tok_s']:.2f}x", ">= 0.8x")
    t.add_row("judging, two passes (sequences/s)", fmt(med['judge_two_pass_seq_s']), fmt(med['judge_bare_seq_s']),
              f"{med['judge_two_pass_seq_s'] / med['judge_bare_seq_s']:.2f}x", ">= 0.8x")
    t.add_row("judging, default (sequences/s)", fmt(med['judge_ours_seq_s']), fmt(med['judge_bare_seq_s']),
              f"{med['judge_ours_seq_s'] / med['judge_bare_seq_s']:.2f}x", ">= 0.8x")
    if pairs:
        for label, key in (("training, round 0 (pairs/s)", "train_ours_pairs_s"),
                           ("training, noise detection (pairs/s)", "train_detect_pairs_s")):
            t.add_row(f"{label}, {len(pairs)} pairs", fmt(med[key]), fmt(med['train_bare_pairs_s']),
                      f"{med[key] / med['train_bare_pairs_s']:.2f}x", ">= 0.8x")
    Console().print(t)
    if args.json:
        args.json.write_text(json.dumps({"median": med, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
