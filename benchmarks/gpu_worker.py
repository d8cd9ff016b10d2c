"""The measuring process of benchmarks/gpu.py: one backend, every stage, in its own process.

    python -m benchmarks.gpu_worker SPEC.json      # gpu.py's run_backend starts it, with the repo on PYTHONPATH

One process per backend because Unsloth must be imported before transformers, peft and trl, and patches them for the
whole process; so this module imports nothing at the top but the standard library and the arithmetic, and
run_worker imports the backend first. The spec (written by gpu.py) names the backend, the shape dict, the model
folder and the work sizes; the stage rows go to spec["out"] as JSON after every stage, so a worker that fails or is
killed still leaves what it measured.
"""

from __future__ import annotations

import gc
import json
import random
import shutil
import sys
import time
from pathlib import Path

from benchmarks.gpu_roofline import forward_flops, ratios, sampling_flops, weight_bytes_per_step


class _Measure:
    """Seconds and peak CUDA memory of one stage (peak reset at the start; includes weights already held)."""

    def __init__(self, torch):
        self.torch = torch
        self.cuda = torch.cuda.is_available()

    def __enter__(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        self.result: dict = {}
        return self.result

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
        self.result["seconds"] = time.perf_counter() - self.t0
        if self.cuda:
            self.result["peak_alloc_gb"] = self.torch.cuda.max_memory_allocated() / 1e9
            self.result["peak_reserved_gb"] = self.torch.cuda.max_memory_reserved() / 1e9
        else:
            self.result["peak_alloc_gb"] = self.result["peak_reserved_gb"] = None
        return False


class _SavingDict(dict):
    """The stage rows; every new row rewrites the worker's JSON so a killed worker leaves what it measured."""

    def __init__(self, owner: dict, path: str):
        super().__init__()
        self.owner, self.path = owner, Path(path)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.owner, "stages": dict(self)}, indent=2))
        tmp.replace(self.path)


def run_worker(spec: dict) -> dict:
    """Every stage through the backend interface; returns the stage rows and what ran, as written to spec["out"]."""
    if spec["backend"] == "unsloth":
        import selfie_lite.backends.unsloth  # noqa: F401  (unsloth before transformers, peft and trl)
    import torch

    from selfie_lite.backends import get_backend
    from selfie_lite.config import RefineConfig, load_config
    from selfie_lite.testing import PAIR_OVERHEAD, PROMPT_OVERHEAD, random_word_ids, random_words

    shape = spec["shape"]
    cfg = load_config(spec["preset"], overrides=spec["overrides"])
    backend, why = get_backend(cfg)
    measure = _Measure(torch)
    rng = random.Random(0)
    seq_len, new_tokens = spec["seq_len"], spec["new_tokens"]
    vocab = shape["vocab_size"]
    model_dir = Path(spec["model_dir"])
    out = {"backend": backend.name, "why": why, "device": backend.device, "dtype": str(backend.dtype).replace("torch.", ""),
           "load_in_4bit": cfg.load_in_4bit, "stages": {}, "versions": _versions(),
           # the run's judge scores with one model when the sampler hands over the policy's log-probs
           "judge_passes": 1 if getattr(cfg.judge, "policy_from_sampling", False) else 2}
    stages = _SavingDict(out, spec["out"])  # written after every stage: a timeout keeps what ran
    out["stages"] = stages
    quant = "nf4" if cfg.load_in_4bit else "16bit"
    bytes_16 = 4 if backend.dtype == torch.float32 else 2
    step_bytes = weight_bytes_per_step(shape, quant, bytes_16)
    out["weight_bytes_per_step"] = step_bytes

    # load for sampling and judging
    with measure as m:
        model, tok = backend.load(model_dir)
    stages["load"] = {**m, "items": 1, "unit": "model"}

    # sample: prompts of seq_len - new_tokens tokens (with the template), K=2, every response up to new_tokens
    k = cfg.sample.num_samples
    prompt_words = max(1, seq_len - new_tokens - PROMPT_OVERHEAD)
    prompts = [random_words(rng, prompt_words, vocab) for _ in range(spec["sample_prompts"])]
    backend.generate(model, tok, prompts[:1], num_samples=k, temperature=0.7, top_p=1.0, max_new_tokens=4,
                     batch_size=1, seed=1)  # warm-up: kernels, caches, compilation
    with measure as m:
        rows = backend.generate(model, tok, prompts, num_samples=k, temperature=cfg.sample.temperature,
                                top_p=cfg.sample.top_p, max_new_tokens=new_tokens,
                                batch_size=cfg.sample.batch_size, seed=2)
    lengths = [len(ids) for r in rows for ids in r["response_ids"]]
    sampled_logps = all("policy_logps" in r for r in rows)  # the judge's policy term came out of sampling
    bs = cfg.sample.batch_size
    steps = sum(max(len(ids) for r in rows[s : s + bs] for ids in r["response_ids"]) for s in range(0, len(rows), bs))
    decode_tokens = sum(len(rows[s : s + bs]) * k * max(len(ids) for r in rows[s : s + bs] for ids in r["response_ids"])
                        for s in range(0, len(rows), bs))
    flops = sum(sampling_flops(shape, len(rows[s : s + bs]) * k, prompt_words + PROMPT_OVERHEAD,
                               max(len(ids) for r in rows[s : s + bs] for ids in r["response_ids"]))
                for s in range(0, len(rows), bs))
    stages["sample"] = {**m, "items": len(prompts), "unit": "prompts", "new_tokens": sum(lengths),
                        "rows": len(lengths), "decode_steps": steps, "decode_row_tokens": decode_tokens,
                        "prompt_tokens": prompt_words + PROMPT_OVERHEAD,
                        "rate": sum(lengths) / m["seconds"], "rate_unit": "tok/s",
                        "step_s": m["seconds"] / max(1, steps), "flops": flops, "policy_logps": sampled_logps,
                        **ratios(step_bytes, steps, flops, m["seconds"], spec.get("card"))}

    # judge: sequences of exactly seq_len tokens (prompt + a response of up to new_tokens)
    resp_len = min(new_tokens, seq_len // 3)
    p_len = seq_len - resp_len
    n_seq = spec["judge_seqs"]
    seqs = [(random_word_ids(rng, p_len, vocab), random_word_ids(rng, resp_len, vocab)) for _ in range(n_seq)]
    jb = cfg.judge.batch_size
    backend.sequence_logps(model, seqs[:jb], batch_size=jb)  # warm-up batch
    with measure as m:
        backend.sequence_logps(model, seqs, batch_size=jb)
    batches = -(-n_seq // jb)
    flops = forward_flops(shape, n_seq * seq_len, seq_len / 2)
    stages["judge"] = {**m, "items": n_seq, "unit": f"seqs of {seq_len} tok", "rate": n_seq / m["seconds"],
                       "rate_unit": "seq/s", "forward_passes": batches, "flops": flops,
                       **ratios(step_bytes, batches, flops, m["seconds"], spec.get("card"))}
    backend.free(model)
    del model
    gc.collect()

    # train: load for training, fresh LoRA, a few DPO optimizer steps with the SPA loss (round-1 settings)
    from selfie_lite.smoothing import smoothing_of
    from selfie_lite.train import train_dpo

    with measure as m:
        model, tok = backend.load(model_dir, trainable=True)
        model = backend.add_lora(model, cfg.lora, seed=cfg.random_seed)
    stages["train_load"] = {**m, "items": 1, "unit": "model+LoRA"}
    tb = cfg.train.batch_size
    n_pairs = tb * spec["dpo_steps"]
    d_resp = min(new_tokens, seq_len // 3)
    d_prompt = seq_len - d_resp - PAIR_OVERHEAD
    pairs = [{"pair_id": i, "prompt": random_words(rng, d_prompt, vocab), "chosen": random_words(rng, d_resp, vocab),
              "rejected": random_words(rng, d_resp, vocab)} for i in range(n_pairs)]
    stamps: list[float] = []
    work = Path(spec["work_dir"])
    with measure as m:
        result = train_dpo(model, tok, pairs, beta=cfg.beta, train=cfg.train, smoother=smoothing_of(RefineConfig(), 0.5, pairs),
                           epochs=1, out_dir=work / f"trainer-{backend.name}", seed=cfg.random_seed,
                           on_step=lambda step, total, logs: stamps.append(time.perf_counter()))
    steady = (len(stamps) - 1) * tb / (stamps[-1] - stamps[0]) if len(stamps) >= 2 else None
    stages["train"] = {**m, "items": n_pairs, "unit": f"pairs of {seq_len} tok", "steps": result.metrics["steps"],
                       "rate": steady or result.metrics["pairs_per_s"], "rate_unit": "pairs/s",
                       "rate_note": "after the first step" if steady else "whole run",
                       "step_s": [round(b - a, 4) for a, b in zip(stamps, stamps[1:], strict=False)],
                       "loss_start": result.metrics["loss_start"], "loss_end": result.metrics["loss_end"]}

    # merge: save the adapter, free the policy, merge into 16-bit weights
    adapter = work / f"adapter-{backend.name}"
    backend.save_adapter(model, adapter)
    backend.free(model)
    del model
    gc.collect()
    if spec.get("skip_merge"):
        stages["merge"] = {"skipped": "--skip-merge"}
    else:
        merged = work / f"merged-{backend.name}"
        with measure as m:
            backend.merge(model_dir, adapter, merged)
        size = sum(f.stat().st_size for f in merged.glob("*.safetensors"))
        stages["merge"] = {**m, "items": 1, "unit": "model", "merged_gb": size / 1e9,
                           "path": getattr(backend, "last_merge", {}).get("path", "peft 16-bit (hf backend)")}
        shutil.rmtree(merged, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)

    if spec.get("vllm"):  # last, so that nothing else of this process holds the GPU
        stages["sample_vllm"] = vllm_stage(cfg, backend, model_dir, prompts, new_tokens, torch)
    return out


def vllm_stage(cfg, backend, model_dir: Path, prompts: list[str], new_tokens: int, torch) -> dict:
    """--vllm: the sample stage's vLLM path as a run takes it (sampler_vllm.VLLMSampler: the engine in a child process
    of its own, stopped when sampling ends), on the same prompts as the sample stage: the engine's start-up, its
    tokens/s, the GPU memory it held (the device's free memory before it started minus while it ran: every
    process counts) and what was still taken once it stopped (what it failed to give back; the design says 0)."""
    from selfie_lite.sampler_vllm import get_sampler

    def free_gb():
        return torch.cuda.mem_get_info()[0] / 1e9 if torch.cuda.is_available() else None

    sampler, why = get_sampler("vllm", backend, cfg)
    sampler.release_memory()
    before = free_gb()
    t0 = time.perf_counter()
    engine, tok = sampler.load(model_dir)
    start_s = time.perf_counter() - t0
    during = free_gb()
    try:
        t0 = time.perf_counter()
        rows = sampler.generate(engine, tok, prompts, num_samples=cfg.sample.num_samples,
                                temperature=cfg.sample.temperature, top_p=cfg.sample.top_p, max_new_tokens=new_tokens,
                                batch_size=cfg.sample.batch_size, seed=2)
        seconds = time.perf_counter() - t0
    finally:
        sampler.free(engine)
    after = free_gb()
    new = sum(len(ids) for r in rows for ids in r["response_ids"])
    return {"seconds": seconds, "start_s": start_s, "items": len(prompts), "unit": "prompts", "new_tokens": new,
            "rate": new / seconds, "rate_unit": "tok/s", "why": why, "engine_pid": engine.pid,
            "engine_gb": None if before is None else before - during,
            "left_after_stop_gb": None if before is None else before - after,
            "peak_alloc_gb": None, "peak_reserved_gb": None}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "vllm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    run_worker(json.loads(Path(sys.argv[1]).read_text()))
