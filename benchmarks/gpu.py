"""Speed and peak GPU memory of every SPA stage, per backend, on a real-size model with random weights (issue 5).

    python benchmarks/gpu.py --model-shape mistral-7b --backends hf,unsloth --out results.json   # one GPU, ~6 min
    python benchmarks/gpu.py --model-shape qwen-1.5b --backends hf,unsloth                         # the Colab shape
    python benchmarks/gpu.py --model-shape tiny                                                    # CPU dry run, seconds

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

Batch sizes are the preset's (mistral-7b: zephyr-7b, qwen-1.5b: qwen-colab, tiny: tiny). Peak memory is
torch.cuda.max_memory_allocated / max_memory_reserved, reset before each stage; a stage's peak includes the weights
it holds (nvidia-smi shows ~0.5 GB more: the CUDA context). Each backend runs in its own process (Unsloth must be
imported before transformers and trl, and patches them for the whole process).

For sample and judge, two ratios to the card's limits: weight bytes read per forward step (4-bit nf4 or 16-bit)
times steps over the measured time, against the card's memory bandwidth; and forward FLOPs (2 x matmul params per
token + attention) over the measured time, against its dense bf16 (fp16 on a T4) matrix rate. Card figures are spec
sheet values (CARDS below), or --bandwidth-gbs / --peak-tflops.

Last, the estimated wall time of the paper's schedule on this card: 2K seed pairs (3 epochs), prompt pools of
8K/20K/30K, 2 samples of up to 300 new tokens, judging by policy and SFT reference, one DPO epoch per round, a merge
per round, and the model loads each stage does. It is an estimate from the rates above (upper bound on lengths:
every response runs to 300 tokens, every judged sequence is seq-len tokens), not a measurement of a run.
"""

from __future__ import annotations

import argparse
import gc
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

# ---------------------------------------------------------------------------------------------
# Shapes, cards and the paper's schedule (plain data)

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
    "tiny": dict(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, qkv_bias=False, tie_word_embeddings=False,
                 max_position_embeddings=512, rope_theta=10000.0, preset="tiny", seq_len=96, new_tokens=16),
}

# (substring of torch.cuda.get_device_name, label, memory bandwidth GB/s, dense bf16 matrix TFLOP/s; fp16 on a T4).
# Vendor spec sheets, without sparsity; first match wins, so longer names come first.
CARDS: list[tuple[str, str, float, float]] = [
    ("H200", "H200", 4800, 989),
    ("H100 NVL", "H100 NVL", 3900, 835),
    ("H100 PCIe", "H100 PCIe", 2000, 756),
    ("H100", "H100 SXM", 3350, 989),
    ("A100 80GB PCIe", "A100 80GB PCIe", 1935, 312),
    ("A100-SXM4-80GB", "A100 80GB SXM", 2039, 312),
    ("A100", "A100 40GB", 1555, 312),
    ("L40S", "L40S", 864, 362),
    ("L4", "L4", 300, 121),
    ("A10", "A10", 600, 125),
    ("RTX 4090", "RTX 4090", 1008, 165),
    ("RTX 3090", "RTX 3090", 936, 71),
    ("T4", "T4", 320, 65),
]

PAPER_SCHEDULE = dict(seed_pairs=2000, seed_epochs=3, pools=[8000, 20000, 30000], round_epochs=1, num_samples=2,
                      new_tokens=300)

# bitsandbytes nf4 with double quantisation, block 64: 4 bits a weight, an 8-bit absmax per 64 weights, and an fp32
# scale per 256 absmax blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

# The tiny preset's template: the same <s><|user|>...<|assistant|>...</s> layout, whatever the model size.
from selfie_lite.tiny.build import CHAT_TEMPLATE  # noqa: E402

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
PROMPT_OVERHEAD = 3  # <s><|user|>...<|assistant|>
PAIR_OVERHEAD = 4  # the prompt's 3 and </s> after the response


# ---------------------------------------------------------------------------------------------
# Arithmetic: parameters, bytes a forward step reads, FLOPs, card ratios, the schedule


def param_counts(shape: dict) -> dict:
    """Parameters by kind, from the config alone (no model built)."""
    h, inter, n_layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    per_layer_linear = h * q + 2 * h * kv + q * h + 3 * h * inter  # q, k, v, o; gate, up, down
    per_layer_bias = (q + 2 * kv) if shape.get("qkv_bias") else 0
    per_layer_norm = 2 * h
    embed = shape["vocab_size"] * h
    lm_head = 0 if shape["tie_word_embeddings"] else shape["vocab_size"] * h
    layers_linear = n_layers * per_layer_linear
    biases = n_layers * per_layer_bias
    norms = n_layers * per_layer_norm + h
    return {
        "embed": embed,
        "lm_head": lm_head,  # separate weights; 0 when tied (the matmul still happens, see matmul_params)
        "layers_linear": layers_linear,
        "biases": biases,
        "norms": norms,
        "total": embed + lm_head + layers_linear + biases + norms,
        # weights multiplied by every token: all linear layers and the output projection (tied or not)
        "matmul_params": layers_linear + shape["vocab_size"] * h,
    }


def weight_bytes_per_step(shape: dict, quant: str, bytes_16: int = 2) -> float:
    """Bytes of weights one forward step reads: linear layers (nf4 or 16-bit), the output projection, biases and
    norms at 16 bits (bitsandbytes keeps lm_head unquantised). The embedding lookup reads only a few rows: left out."""
    c = param_counts(shape)
    linear = c["layers_linear"] * (NF4_BYTES_PER_PARAM if quant == "nf4" else bytes_16)
    head = shape["vocab_size"] * shape["hidden_size"] * bytes_16
    return linear + head + (c["biases"] + c["norms"]) * bytes_16


def forward_flops(shape: dict, tokens: float, mean_context: float = 0.0) -> float:
    """2 FLOPs per matmul weight per token, plus attention: QK^T and AV, 2 x head_dim x context each, per head."""
    c = param_counts(shape)
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    attn = 4 * shape["num_hidden_layers"] * shape["num_attention_heads"] * head_dim * mean_context
    return (2 * c["matmul_params"] + attn) * tokens


def sampling_flops(shape: dict, rows: int, prompt_len: int, steps: int) -> float:
    """Prefill of rows x prompt_len tokens, then `steps` decode steps of `rows` tokens each."""
    prefill = forward_flops(shape, rows * prompt_len, prompt_len / 2)
    decode = forward_flops(shape, rows * steps, prompt_len + steps / 2)
    return prefill + decode


def card_spec(device_name: str) -> dict | None:
    for key, label, bw, tflops in CARDS:
        if key.lower() in device_name.lower():
            return {"card": label, "bandwidth_gbs": bw, "peak_tflops": tflops, "source": "spec sheet"}
    return None


def ratios(weight_bytes: float, steps: float, flops: float, seconds: float, card: dict | None) -> dict:
    """Share of the card's memory bandwidth (weights only) and of its matrix rate that a stage reached."""
    if not card or seconds <= 0:
        return {"bandwidth_frac": None, "flops_frac": None}
    return {
        "bandwidth_frac": weight_bytes * steps / seconds / (card["bandwidth_gbs"] * 1e9),
        "flops_frac": flops / seconds / (card["peak_tflops"] * 1e12),
    }


def schedule_estimate(rates: dict, schedule: dict = PAPER_SCHEDULE, judge_passes: int = 2) -> dict | None:
    """Seconds per round of the paper's schedule from measured rates; None when a rate is missing.

    rates: tokens_per_s (sampling), sequences_per_s (judging, one model), pairs_per_s (DPO), merge_s, load_s
    (an inference load), train_load_s (load + LoRA). judge_passes: 2 = policy and reference each score every
    sample; 1 = the policy's log-probs came out of sampling (judge.policy_from_sampling), only the reference
    scores. Loads per round: sample 1, judge one per pass, train 1; round 0 has only train and merge."""
    if not all(rates.get(k) for k in ("tokens_per_s", "sequences_per_s", "pairs_per_s")):
        return None
    if any(rates.get(k) is None for k in ("merge_s", "load_s", "train_load_s")):
        return None
    k, new = schedule["num_samples"], schedule["new_tokens"]
    rounds = [{
        "round": 0,
        "prompts": 0,
        "sample_s": 0.0,
        "judge_s": 0.0,
        "train_s": schedule["seed_pairs"] * schedule["seed_epochs"] / rates["pairs_per_s"],
        "merge_s": rates["merge_s"],
        "load_s": rates["train_load_s"],
    }]
    for i, n in enumerate(schedule["pools"], start=1):
        rounds.append({
            "round": i,
            "prompts": n,
            "sample_s": n * k * new / rates["tokens_per_s"],
            "judge_s": judge_passes * n * k / rates["sequences_per_s"],
            "train_s": n * schedule["round_epochs"] / rates["pairs_per_s"],
            "merge_s": rates["merge_s"],
            "load_s": (1 + judge_passes) * rates["load_s"] + rates["train_load_s"],
        })
    for r in rounds:
        r["total_s"] = r["sample_s"] + r["judge_s"] + r["train_s"] + r["merge_s"] + r["load_s"]
    return {"rounds": rounds, "total_s": sum(r["total_s"] for r in rounds)}


# ---------------------------------------------------------------------------------------------
# The model folder: config with random weights, and a tokenizer whose words are single tokens


def build_tokenizer(vocab_size: int, model_max_length: int):
    """WordLevel tokenizer over "w<id>" words: one word = one token, so lengths are exact; the vocabulary is the
    model's full size, so every sampled id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE, model_max_length=model_max_length,
    )


def words(rng, n: int, vocab_size: int) -> str:
    return " ".join(f"w{rng.randrange(len(SPECIAL_TOKENS), vocab_size)}" for _ in range(n))


def model_config(shape: dict, tok):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=shape["max_position_embeddings"],
        tie_word_embeddings=shape["tie_word_embeddings"], bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5,
    )
    rope = {"rope_theta": shape["rope_theta"]}
    if shape["arch"] == "mistral":
        cfg = MistralConfig(**common, sliding_window=4096)
    elif shape["arch"] == "qwen2":
        cfg = Qwen2Config(**common, use_sliding_window=False)
    else:
        cfg = LlamaConfig(**common)
    for k, v in rope.items():  # transformers 5 keeps rope settings in rope_parameters; older versions in rope_theta
        if isinstance(getattr(cfg, "rope_parameters", None), dict):
            cfg.rope_parameters["rope_theta"] = v
        else:
            setattr(cfg, k, v)
    return cfg


def build_model_dir(shape_name: str, folder: Path, device: str) -> Path:
    """Random-weight model of the shape, saved (safetensors, bf16 on a GPU) with its tokenizer; reused if present."""
    import torch
    from transformers import AutoModelForCausalLM

    shape = SHAPES[shape_name]
    folder = Path(folder)
    marker = folder / "bench_shape.json"
    if marker.is_file() and json.loads(marker.read_text()).get("shape") == shape_name:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(shape["vocab_size"], shape["max_position_embeddings"])
    cfg = model_config(shape, tok)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds for 7B, where the CPU takes minutes
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="5GB")
    tok.save_pretrained(str(folder))
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    marker.write_text(json.dumps({"shape": shape_name, "params": param_counts(shape)["total"]}))
    return folder


# ---------------------------------------------------------------------------------------------
# The worker: one backend, every stage, in its own process


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

    def __init__(self, owner: dict, path: str | None):
        super().__init__()
        self.owner, self.path = owner, path

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if self.path:
            tmp = Path(self.path).with_suffix(".tmp")
            tmp.write_text(json.dumps({**self.owner, "stages": dict(self)}, indent=2))
            tmp.replace(self.path)


def run_worker(spec: dict) -> dict:
    """Every stage through the backend interface; returns the stage rows and what ran."""
    if spec["backend"] == "unsloth":
        import selfie_lite.backends.unsloth  # noqa: F401  (unsloth before transformers, peft and trl)
    import random

    import torch

    from selfie_lite.backends import get_backend
    from selfie_lite.config import RefineConfig, load_config

    shape = SHAPES[spec["shape"]]
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
    stages = _SavingDict(out, spec.get("progress_out"))  # written after every stage: a timeout keeps what ran
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
    prompts = [words(rng, prompt_words, vocab) for _ in range(spec["sample_prompts"])]
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
    seqs = [([rng.randrange(len(SPECIAL_TOKENS), vocab) for _ in range(p_len)],
             [rng.randrange(len(SPECIAL_TOKENS), vocab) for _ in range(resp_len)]) for _ in range(n_seq)]
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
    from selfie_lite.train import train_dpo

    with measure as m:
        model, tok = backend.load(model_dir, trainable=True)
        model = backend.add_lora(model, cfg.lora, seed=cfg.random_seed)
    stages["train_load"] = {**m, "items": 1, "unit": "model+LoRA"}
    tb = cfg.train.batch_size
    n_pairs = tb * spec["dpo_steps"]
    d_resp = min(new_tokens, seq_len // 3)
    d_prompt = seq_len - d_resp - PAIR_OVERHEAD
    pairs = [{"pair_id": i, "prompt": words(rng, d_prompt, vocab), "chosen": words(rng, d_resp, vocab),
              "rejected": words(rng, d_resp, vocab)} for i in range(n_pairs)]
    stamps: list[float] = []
    work = Path(spec["work_dir"])
    with measure as m:
        result = train_dpo(model, tok, pairs, beta=cfg.beta, train=cfg.train, refine=RefineConfig(), lam=0.5,
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
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "vllm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


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
    spec_path.write_text(json.dumps({**spec, "progress_out": str(out_path)}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.perf_counter()
    try:
        with log_path.open("w") as log:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path),
                                   "--worker-out", str(out_path)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout, cwd=str(work))
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
        for stage in ("load", "sample", "judge", "train_load", "train", "merge"):
            if stage not in res.get("stages", {}):
                continue
            r = res["stages"][stage]
            if "skipped" in r:
                t.add_row(name, stage, r["skipped"], *["-"] * 7)
                continue
            work = f"{r.get('items', '-')} {r.get('unit', '')}".strip()
            if stage == "sample":
                work += f", {r['new_tokens']} new tok"
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
    ap.add_argument("--budget-gb", type=float, default=20.0, help="peak memory target per stage (default 20 GB)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="card memory bandwidth, GB/s (default: CARDS)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="card dense bf16 matrix rate, TFLOP/s")
    ap.add_argument("--work-dir", type=Path, default=None, help="where the model and scratch go (default: a temp "
                    "folder, removed after); a model built there before is reused")
    ap.add_argument("--worker-timeout", type=float, default=1800, help="seconds per backend before giving up")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop the whole run after this long (a backend "
                    "cut short keeps the stages it finished)")
    ap.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:  # inside a worker process: nothing imported yet but the standard library
        result = run_worker(json.loads(args.worker.read_text()))
        args.worker_out.write_text(json.dumps(result, indent=2))
        return 0

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
            model_dir = build_model_dir(args.model_shape, work / f"model-{args.model_shape}", device)
        report["build_s"] = time.perf_counter() - t0
        for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
            missing = backend_missing(name)
            if missing:
                report["results"].append({"backend": name, "skipped": missing})
                console.print(f"[yellow]{name}: skipped ({missing})[/yellow]")
                continue
            over = overrides + [{"model": str(model_dir), "backend": name, "train": train_over,
                                 "sample": {"max_new_tokens": new_tokens}}]
            spec = {"backend": name, "shape": args.model_shape, "preset": preset, "overrides": over,
                    "model_dir": str(model_dir), "work_dir": str(work), "seq_len": seq_len, "new_tokens": new_tokens,
                    "sample_prompts": sample_prompts, "judge_seqs": judge_seqs, "dpo_steps": dpo_steps,
                    "skip_merge": args.skip_merge, "card": card}
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
