"""The arithmetic behind benchmarks/gpu.py: how much a model of a given shape weighs, reads and computes, how close a
measured stage came to the card's limits, and how long the paper's schedule would take at measured rates.

Plain functions of a shape dict (keys as in selfie_lite.testing.TINY_SHAPE) and plain data (the cards' spec sheets,
the paper's schedule); no torch, so the worker imports it before Unsloth and the tests check it by hand.

    weights BW   weight bytes read per forward step x steps / seconds, against the card's memory bandwidth
    bf16 FLOPs   forward FLOPs (2 x matmul params per token + attention) / seconds, against its dense bf16 matrix rate
"""

from __future__ import annotations

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
    """The card's spec-sheet figures, by the name torch reports; None for a card not in CARDS."""
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
