"""Speed and peak GPU memory of every SPA stage, per backend, on a real-size model with random weights (issue 5).

    python benchmarks/gpu.py --model-shape mistral-7b --backends hf,unsloth --out results.json   # one GPU, ~6 min
    python benchmarks/gpu.py --model-shape qwen-1.5b --backends hf,unsloth                         # the Colab shape
    python benchmarks/gpu.py --model-shape tiny                                                    # CPU dry run, seconds
    python benchmarks/gpu.py --model-shape mistral-7b --backends hf --vllm                         # + vLLM in its process

No download: the model is built from its config (Mistral-7B, Qwen2.5-1.5B or a tiny Llama) with random weights and
saved as a model folder with a generated tokenizer (one word = one token, vocabulary padded to the real size, a chat
template), so prompt and response lengths are exact. Every stage runs through the backend interface, so this
measures our pipeline, not bare transformers calls:

    load      backend.load(trainable=False)           seconds, peak memory
    sample    backend.generate, K=2                   new tokens/s (rows x decode steps), one warm-up call first
    judge     backend.sequence_logps                  sequences/s on seq-len-token sequences, one warm-up batch first
    train     backend.load(trainable=True)+add_lora, then train.train_dpo (SPA loss with the extrapolated margin,
              round-1 settings) for a few optimizer steps   pairs/s after the first step
    merge     backend.save_adapter + backend.merge    seconds (16-bit path)
    sample_vllm  (--vllm) sampler_vllm.VLLMSampler on the sample stage's prompts, its engine in a child process:
              start-up seconds, new tokens/s, the GPU memory the engine held and what was left taken after it stopped

Batch sizes are the preset's (mistral-7b: zephyr-7b, qwen-1.5b: qwen-colab, tiny: tiny). Peak memory is
torch.cuda.max_memory_allocated / max_memory_reserved, reset before each stage; a stage's peak includes the weights
it holds (nvidia-smi shows ~0.5 GB more: the CUDA context). Each backend runs in its own process (Unsloth must be
imported before transformers and trl, and patches them for the whole process).

For sample and judge, two ratios to the card's limits: weight bytes read per forward step (4-bit nf4 or 16-bit)
times steps over the measured time, against the card's memory bandwidth; and forward FLOPs (2 x matmul params per
token + attention) over the measured time, against its dense bf16 (fp16 on a T4) matrix rate. Card figures are spec
sheet values (CARDS in gpu_roofline.py), or --bandwidth-gbs / --peak-tflops.

Last, the estimated wall time of the paper's schedule on this card: 2K seed pairs (3 epochs), prompt pools of
8K/20K/30K, 2 samples of up to 300 new tokens, judging by policy and SFT reference, one DPO epoch per round, a merge
per round, and the model loads each stage does. It is an estimate from the rates above (upper bound on lengths:
every response runs to 300 tokens, every judged sequence is seq-len tokens), not a measurement of a run.

Three files: this one is the driver (arguments, one worker process per backend, the tables); gpu_worker.py is the
measuring process; gpu_roofline.py the arithmetic (parameters, bytes, FLOPs, card figures, the schedule). The model
folder comes from selfie_lite.testing.build_shaped_model, which the backend tests use too.
"""

from __future__ import annotations

import argparse
import importlib.util as importlib_util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_roofline import PAPER_SCHEDULE, card_spec, param_counts, schedule_estimate  # noqa: E402
from selfie_lite.testing import PROMPT_OVERHEAD, TINY_SHAPE, build_shaped_model  # noqa: E402

# The model shapes (selfie_lite.testing.build_shaped_model builds them from these keys) and each one's run settings:
# the preset whose batch sizes the stages use, tokens per judged sequence and DPO pair, new tokens per sample.
SHAPES: dict[str, dict] = {
    # mistralai/Mistral-7B-v0.1, the base of zephyr-7b-sft-full (the paper's SFT model): 7,241,732,096 params
    "mistral-7b": dict(arch="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, qkv_bias=False,
                       tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=10000.0,
                       preset="zephyr-7b", seq_len=1024, new_tokens=300),
    # Qwen/Qwen2.5-1.5B-Instruct, the Colab preset's model: 1,543,714,304 params (tied embeddings, q/k/v biases)
    "qwen-1.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                      num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, qkv_bias=True,
                      tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0,
                      preset="qwen-colab", seq_len=1024, new_tokens=300),
    # A CPU dry run of every stage in seconds.
    "tiny": dict(TINY_SHAPE, preset="tiny", seq_len=96, new_tokens=16),
}


# ---------------------------------------------------------------------------------------------
# The driver: build once, one worker per backend, a table and the schedule estimate


def backend_missing(name: str) -> str | None:
    import importlib.util

    if name == "hf":
        return None
    if name == "unsloth":
        return None if importlib.util.find_spec("unsloth") else "unsloth not installed"
    return f"unknown backend {name!r}"


def run_backend(spec: dict, work: Path, timeout: float) -> dict:
    spec_path = work / f"spec-{spec['backend']}.json"
    out_path = work / f"result-{spec['backend']}.json"
    log_path = work / f"worker-{spec['backend']}.log"
    out_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "out": str(out_path)}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.perf_counter()
    try:
        with log_path.open("w") as log:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_worker", str(spec_path)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=str(work))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = f"timeout after {timeout:.0f} s"
    result = json.loads(out_path.read_text()) if out_path.is_file() else {"backend": spec["backend"]}
    result["wall_s"] = time.perf_counter() - t0
    if rc == 0 and out_path.is_file():
        return result
    tail = log_path.read_text().strip().splitlines()[-15:] if log_path.is_file() else []
    last = next((line for line in reversed(tail) if line.strip()), "no output")
    result["failed"] = f"{rc if isinstance(rc, str) else f'exit {rc}'}: {last.strip()[:300]}"
    result["log_tail"] = tail
    return result  # the stages that finished before the failure are kept


def detect_device() -> tuple[str, str]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name(0)
    return "cpu", "cpu"


def rates_for_schedule(result: dict) -> dict:
    s = result.get("stages", {})
    merge = s.get("merge", {})
    return {
        "tokens_per_s": s.get("sample", {}).get("rate"),
        "sequences_per_s": s.get("judge", {}).get("rate"),
        "pairs_per_s": s.get("train", {}).get("rate"),
        "merge_s": merge.get("seconds", 0.0) if "skipped" not in merge else 0.0,
        "load_s": s.get("load", {}).get("seconds"),
        "train_load_s": s.get("train_load", {}).get("seconds"),
    }


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def print_report(report: dict, console) -> None:
    from rich.table import Table

    card = report.get("card")
    card_txt = f"{card['card']}: {card['bandwidth_gbs']:g} GB/s, {card['peak_tflops']:g} TFLOP/s ({card['source']})" \
        if card else "no card figures (CPU, or an unknown card: pass --bandwidth-gbs / --peak-tflops)"
    budget = report["budget_gb"]
    n = report["params"]
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    t = Table(title=f"{report['shape']} ({size} params), seq {report['seq_len']}, "
                    f"{report['device_name']}; {card_txt}", title_justify="left")
    for col in ("backend", "stage", "work", "seconds", "throughput", "peak alloc GB", "peak reserved GB",
                f"<= {budget:g} GB", "weights BW", "bf16 FLOPs"):
        t.add_column(col, justify="right" if col not in ("backend", "stage", "work") else "left")
    for res in report["results"]:
        name = res["backend"]
        if "skipped" in res:
            t.add_row(name, "-", res["skipped"], *["-"] * 7)
            continue
        for stage in ("load", "sample", "judge", "train_load", "train", "merge", "sample_vllm"):
            if stage not in res.get("stages", {}):
                continue
            r = res["stages"][stage]
            if "skipped" in r:
                t.add_row(name, stage, r["skipped"], *["-"] * 7)
                continue
            work = f"{r.get('items', '-')} {r.get('unit', '')}".strip()
            if stage in ("sample", "sample_vllm"):
                work += f", {r['new_tokens']} new tok"
            if stage == "sample_vllm":
                work += f", start {r['start_s']:.1f} s"
                if r.get("engine_gb") is not None:
                    work += f", engine held {r['engine_gb']:.2f} GB, {r['left_after_stop_gb']:.2f} GB left after stop"
            if stage == "merge" and r.get("path"):
                work += f" ({r['path']})"
            thr = f"{r['rate']:.1f} {r['rate_unit']}" if r.get("rate") else "-"
            peak = r.get("peak_reserved_gb")
            ok = "-" if peak is None else ("yes" if peak <= budget else "NO")
            t.add_row(name, stage, work, _fmt(r.get("seconds"), ".1f"), thr, _fmt(r.get("peak_alloc_gb"), ".2f"),
                      _fmt(peak, ".2f"), ok, _pct(r.get("bandwidth_frac")), _pct(r.get("flops_frac")))
        if "failed" in res:
            t.add_row(name, "FAILED", res["failed"], *["-"] * 7)
    console.print(t)

    sched = PAPER_SCHEDULE
    e = Table(title=f"estimated wall time of the paper's schedule on {card['card'] if card else report['device_name']}",
              caption=f"{sched['seed_pairs']} seed pairs x {sched['seed_epochs']} epochs; pools "
                      f"{'/'.join(str(p) for p in sched['pools'])}; K={sched['num_samples']}, {sched['new_tokens']} "
                      "new tokens; judging by the reference alone when sampling kept the policy's log-probs: "
                      "an estimate from the rates above, not a measured run",
              title_justify="left", caption_justify="left")
    for col in ("backend", "round", "prompts", "sample h", "judge h", "train h", "merge+loads h", "total h"):
        e.add_column(col, justify="left" if col == "backend" else "right")
    for res in report["results"]:
        est = res.get("estimate")
        if not est:
            e.add_row(res["backend"], "-", "-", "-", "-", "-", "-", "-")
            continue
        for r in est["rounds"]:
            e.add_row(res["backend"], str(r["round"]), str(r["prompts"]), f"{r['sample_s'] / 3600:.2f}",
                      f"{r['judge_s'] / 3600:.2f}", f"{r['train_s'] / 3600:.2f}",
                      f"{(r['merge_s'] + r['load_s']) / 3600:.2f}", f"{r['total_s'] / 3600:.2f}")
        e.add_row(res["backend"], "all", "", "", "", "", "", f"[bold]{est['total_s'] / 3600:.2f}[/bold]")
    console.print(e)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See docs/gpu.md for what the columns mean and the settings per card.")
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="mistral-7b")
    ap.add_argument("--backends", default="hf,unsloth", help="comma-separated, run in this order (default hf,unsloth)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per judged sequence and DPO pair "
                    "(default 1024; tiny: 96); sampling prompts are seq-len minus the new tokens")
    ap.add_argument("--new-tokens", type=int, default=None, help="max new tokens per sample (default 300; tiny: 16)")
    ap.add_argument("--preset", default=None, help="settings preset (default: zephyr-7b / qwen-colab / tiny by shape)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="any setting as KEY=VALUE (repeatable)")
    ap.add_argument("--sample-prompts", type=int, default=None, help="prompts sampled (default: one sample batch)")
    ap.add_argument("--judge-seqs", type=int, default=None, help="sequences judged (default: 4 judge batches)")
    ap.add_argument("--dpo-steps", type=int, default=None, help="DPO optimizer steps; the first is not timed "
                    "(default 4; tiny: 3)")
    ap.add_argument("--skip-merge", action="store_true", help="leave the merge out (it writes a 16-bit model)")
    ap.add_argument("--vllm", action="store_true", help="also time --sampler vllm (its engine in a child process) on "
                    "the sample stage's prompts, and the GPU memory it holds and gives back")
    ap.add_argument("--budget-gb", type=float, default=20.0, help="peak memory target per stage (default 20 GB)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="card memory bandwidth, GB/s (default: CARDS)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="card dense bf16 matrix rate, TFLOP/s")
    ap.add_argument("--work-dir", type=Path, default=None, help="where the model and scratch go (default: a temp "
                    "folder, removed after); a model built there before is reused")
    ap.add_argument("--worker-timeout", type=float, default=1800, help="seconds per backend before giving up")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop the whole run after this long (a backend "
                    "cut short keeps the stages it finished)")
    ap.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    from rich.console import Console

    from selfie_lite.config import parse_override

    console = Console()
    shape = SHAPES[args.model_shape]
    seq_len = args.seq_len or shape["seq_len"]
    new_tokens = args.new_tokens or shape["new_tokens"]
    if new_tokens + PROMPT_OVERHEAD + 1 > seq_len:
        console.print(f"[red]--new-tokens {new_tokens} leaves no room for a prompt in --seq-len {seq_len}[/red]")
        return 2
    preset = args.preset or shape["preset"]
    if args.vllm and importlib_util.find_spec("vllm") is None:
        console.print("[red]--vllm: vLLM is not installed (pip install vllm)[/red]")
        return 2
    device, device_name = detect_device()
    if device == "cpu" and args.model_shape != "tiny":
        console.print(f"[yellow]no CUDA GPU: {args.model_shape} on the CPU will be very slow[/yellow]")
    card = card_spec(device_name) if device == "cuda" else None
    if args.bandwidth_gbs or args.peak_tflops:
        card = dict(card or {"card": device_name, "bandwidth_gbs": None, "peak_tflops": None}, source="given")
        card["bandwidth_gbs"] = args.bandwidth_gbs or card["bandwidth_gbs"]
        card["peak_tflops"] = args.peak_tflops or card["peak_tflops"]
        if not (card["bandwidth_gbs"] and card["peak_tflops"]):
            console.print("[red]give both --bandwidth-gbs and --peak-tflops for a card that is not in CARDS[/red]")
            return 2

    from selfie_lite.config import load_config

    overrides = [parse_override(s) for s in args.sets]
    base_cfg = load_config(preset, overrides=overrides)
    # Sequences of exactly seq_len tokens: the preset's prompt cut must not shorten them.
    train_over = {"max_length": seq_len, "max_prompt_length": seq_len - min(new_tokens, seq_len // 3) - 1,
                  "grad_accum": 1}
    sample_prompts = args.sample_prompts or base_cfg.sample.batch_size
    judge_seqs = args.judge_seqs or 4 * base_cfg.judge.batch_size
    dpo_steps = max(2, args.dpo_steps or 4)
    if args.model_shape == "tiny":  # keep the dry run to seconds
        sample_prompts = args.sample_prompts or 4
        judge_seqs = args.judge_seqs or base_cfg.judge.batch_size
        dpo_steps = max(2, args.dpo_steps or 3)

    temp = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="selfie-bench-")) if temp else args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = {"shape": args.model_shape, "params": param_counts(shape)["total"], "seq_len": seq_len,
              "new_tokens": new_tokens, "preset": preset, "device": device, "device_name": device_name, "card": card,
              "budget_gb": args.budget_gb, "schedule": PAPER_SCHEDULE, "results": []}
    try:
        t0 = time.perf_counter()
        with console.status(f"building a random {args.model_shape} model folder"):
            model_dir = build_shaped_model(work / f"model-{args.model_shape}", shape, device=device)
        report["build_s"] = time.perf_counter() - t0
        for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
            missing = backend_missing(name)
            if missing:
                report["results"].append({"backend": name, "skipped": missing})
                console.print(f"[yellow]{name}: skipped ({missing})[/yellow]")
                continue
            over = overrides + [{"model": str(model_dir), "backend": name, "train": train_over,
                                 "sample": {"max_new_tokens": new_tokens}}]
            spec = {"backend": name, "shape": shape, "preset": preset, "overrides": over,
                    "model_dir": str(model_dir), "work_dir": str(work), "seq_len": seq_len, "new_tokens": new_tokens,
                    "sample_prompts": sample_prompts, "judge_seqs": judge_seqs, "dpo_steps": dpo_steps,
                    "skip_merge": args.skip_merge, "card": card, "vllm": args.vllm}
            timeout = args.worker_timeout
            if args.max_minutes:
                timeout = min(timeout, args.max_minutes * 60 - (time.perf_counter() - t0))
                if timeout < 30:
                    report["results"].append({"backend": name, "skipped": "--max-minutes reached"})
                    continue
            with console.status(f"{name}: load, sample, judge, train, merge"):
                res = run_backend(spec, work, timeout)
            if "failed" in res:
                console.print(f"[red]{name}: failed ({res['failed']})[/red]")
            else:
                res["estimate"] = schedule_estimate(rates_for_schedule(res), judge_passes=res.get("judge_passes", 2))
            report["results"].append(res)
            if args.out:  # after every backend, so an outer time limit still leaves the numbers
                args.out.write_text(json.dumps(report, indent=2))
        print_report(report, console)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
            console.print(f"wrote {args.out}")
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all("failed" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
