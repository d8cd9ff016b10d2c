"""benchmarks/gpu.py: the arithmetic worked by hand, the generated model folder, and the CPU dry run end to end."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "gpu.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("selfie_bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()

# A config small enough to count by hand: hidden 8, MLP 16, 2 layers, 2 heads of 4 (1 KV head), vocabulary 10.
HAND = dict(arch="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, qkv_bias=False, tie_word_embeddings=False)


def test_param_counts_by_hand():
    c = bench.param_counts(HAND)
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, MLP 3 x 8x16 = 384 -> 576; two layers 1152
    assert c["layers_linear"] == 1152
    assert c["embed"] == 80 and c["lm_head"] == 80
    assert c["norms"] == 2 * 2 * 8 + 8
    assert c["total"] == 1152 + 80 + 80 + 40
    assert c["matmul_params"] == 1152 + 80


def test_param_counts_of_the_real_shapes():
    assert bench.param_counts(bench.SHAPES["mistral-7b"])["total"] == 7_241_732_096  # Mistral-7B-v0.1
    assert bench.param_counts(bench.SHAPES["qwen-1.5b"])["total"] == 1_543_714_304  # Qwen2.5-1.5B(-Instruct)
    tied = bench.param_counts(bench.SHAPES["qwen-1.5b"])
    assert tied["lm_head"] == 0 and tied["matmul_params"] == tied["layers_linear"] + 151936 * 1536


def test_weight_bytes_per_step_by_hand():
    # 16-bit: every linear weight, the output projection, the norms, 2 bytes each (embedding lookup left out)
    assert bench.weight_bytes_per_step(HAND, "16bit") == 1152 * 2 + 80 * 2 + 40 * 2
    # nf4: 0.5 byte + an 8-bit absmax per 64 + an fp32 scale per 256 blocks; lm_head and norms stay 16-bit
    assert bench.NF4_BYTES_PER_PARAM == 0.515869140625
    assert bench.weight_bytes_per_step(HAND, "nf4") == pytest.approx(1152 * 0.515869140625 + 160 + 80)
    assert bench.weight_bytes_per_step(HAND, "16bit", bytes_16=4) == 2544 * 2  # fp32 on a CPU


def test_mistral_7b_decode_step_reads_3_86_gb_in_4bit():
    shape = bench.SHAPES["mistral-7b"]
    # 32 layers x 218,103,808 linear weights in nf4, lm_head 32000x4096 and 266,240 norm weights at 2 bytes
    linear = 32 * 218_103_808
    assert bench.param_counts(shape)["layers_linear"] == linear
    expected = linear // 2 + linear // 64 + linear * 4 // (64 * 256) + 131_072_000 * 2 + 266_240 * 2
    assert expected == 3_863_093_248
    assert bench.weight_bytes_per_step(shape, "nf4") == pytest.approx(expected)
    assert bench.weight_bytes_per_step(shape, "16bit") == (linear + 131_072_000 + 266_240) * 2


def test_forward_flops_by_hand():
    assert bench.forward_flops(HAND, tokens=10) == 2 * 1232 * 10  # 2 x params x tokens
    # attention at mean context 6: QK^T and AV = 2 x 2 x head_dim 4 x 6 per head, 2 heads, 2 layers = 384 / token
    assert bench.forward_flops(HAND, tokens=10, mean_context=6) == (2 * 1232 + 384) * 10
    # sampling: prefill of 3 rows x 4 prompt tokens (mean context 2), then 5 steps of 3 rows (mean context 4 + 2.5)
    assert bench.sampling_flops(HAND, rows=3, prompt_len=4, steps=5) == pytest.approx(
        bench.forward_flops(HAND, 12, 2) + bench.forward_flops(HAND, 15, 6.5))


def test_ratios_to_the_card():
    card = {"card": "H100 SXM", "bandwidth_gbs": 3350, "peak_tflops": 989, "source": "spec sheet"}
    r = bench.ratios(weight_bytes=3_863_093_248, steps=300, flops=989e12 * 0.5, seconds=10.0, card=card)
    assert r["bandwidth_frac"] == pytest.approx(3_863_093_248 * 300 / 10 / 3350e9)  # ~3.5% of HBM
    assert r["flops_frac"] == pytest.approx(0.05)
    assert bench.ratios(1, 1, 1, 1.0, None) == {"bandwidth_frac": None, "flops_frac": None}


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("Tesla T4", "T4"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
])
def test_card_lookup(name, label):
    assert bench.card_spec(name)["card"] == label


def test_unknown_card_has_no_figures():
    assert bench.card_spec("Some Future GPU") is None


def test_schedule_estimate_by_hand():
    rates = {"tokens_per_s": 1000, "sequences_per_s": 100, "pairs_per_s": 10, "merge_s": 60, "load_s": 30,
             "train_load_s": 40}
    est = bench.schedule_estimate(rates)
    r0, r1, r2, r3 = est["rounds"]
    assert r0["total_s"] == 2000 * 3 / 10 + 60 + 40  # seed DPO 3 epochs, merge, one training load
    # round 1: 8000 x 2 x 300 tokens; 2 models x 16000 seqs; 8000 pairs; merge; 3 loads + a training load
    assert r1["total_s"] == 4800 + 320 + 800 + 60 + 130
    assert r2["total_s"] == 12000 + 800 + 2000 + 60 + 130
    assert r3["total_s"] == 18000 + 1200 + 3000 + 60 + 130
    assert est["total_s"] == 700 + 6110 + 14990 + 22390
    assert bench.schedule_estimate({**rates, "pairs_per_s": None}) is None
    # judge.policy_from_sampling: the policy's log-probs come from sampling, only the reference scores (one load less)
    one = bench.schedule_estimate(rates, judge_passes=1)["rounds"]
    assert one[0]["total_s"] == 700
    assert one[1]["total_s"] == 4800 + 160 + 800 + 60 + 100


def test_generated_tokenizer_one_word_one_token(tmp_path):
    tok = bench.build_tokenizer(vocab_size=600, model_max_length=256)
    assert len(tok) == 600
    ids = tok.apply_chat_template([{"role": "user", "content": "w10 w11 w599"}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>"), 10, 11, 599,
                   tok.convert_tokens_to_ids("<|assistant|>")]
    assert len(ids) == 3 + bench.PROMPT_OVERHEAD
    assert tok.decode([10, 599, tok.eos_token_id], skip_special_tokens=True) == "w10 w599"
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("w42 w43", add_special_tokens=False)["input_ids"] == [42, 43]


def test_tiny_dry_run_prints_every_column(tmp_path):
    """The CPU dry run: a tiny random Llama, every stage through the hf backend, the table and the estimate."""
    out = tmp_path / "results.json"
    env = dict(os.environ, COLUMNS="220", NO_COLOR="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--model-shape", "tiny", "--backends", "hf,unsloth", "--out", str(out),
         "--bandwidth-gbs", "20", "--peak-tflops", "0.5", "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for col in ("backend", "stage", "work", "seconds", "throughput", "peak alloc GB", "peak reserved GB",
                "<= 20 GB", "weights BW", "bf16 FLOPs"):
        assert col in text, col
    for stage in ("load", "sample", "judge", "train_load", "train", "merge"):
        assert f"│ hf      │ {stage}" in text, stage
    assert "tok/s" in text and "seq/s" in text and "pairs/s" in text
    assert "estimated wall time of the paper's schedule" in text and "not a measured run" in text

    report = json.loads(out.read_text())
    assert report["params"] == bench.param_counts(bench.SHAPES["tiny"])["total"]
    hf = next(r for r in report["results"] if r["backend"] == "hf")
    stages = hf["stages"]
    assert stages["sample"]["new_tokens"] > 0 and stages["sample"]["rate"] > 0
    assert stages["judge"]["items"] == 64 and stages["judge"]["rate"] > 0  # one judge batch of the tiny preset
    assert stages["train"]["steps"] == 3 and stages["train"]["rate"] > 0
    assert stages["merge"]["merged_gb"] > 0
    for name in ("sample", "judge"):  # the card figures were given, so both ratios are numbers
        assert 0 < stages[name]["bandwidth_frac"] and 0 < stages[name]["flops_frac"]
    assert hf["estimate"]["total_s"] > 0 and len(hf["estimate"]["rounds"]) == 4
    assert hf["judge_passes"] in (1, 2) and isinstance(stages["sample"]["policy_logps"], bool)
    unsloth = next(r for r in report["results"] if r["backend"] == "unsloth")
    if importlib.util.find_spec("unsloth") is None:
        assert unsloth == {"backend": "unsloth", "skipped": "unsloth not installed"}
        assert "unsloth not installed" in text
    # the model folder was built in --work-dir and is reused by a second run
    assert (tmp_path / "work" / "model-tiny" / "bench_shape.json").is_file()


def test_new_tokens_must_leave_room_for_a_prompt(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--model-shape", "tiny", "--seq-len", "16",
                           "--new-tokens", "16"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    assert "leaves no room for a prompt" in proc.stdout


def test_a_failing_stage_keeps_the_stages_before_it(tmp_path):
    """A backend that fails (here: LoRA targets that do not exist) still reports what it measured, and exits 1."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--model-shape", "tiny", "--backends", "hf", "--out", str(out),
         "--set", 'lora.target_modules=["nope"]'],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env=dict(os.environ, COLUMNS="220", NO_COLOR="1", PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("load", "sample", "judge"):
        assert f"│ hf      │ {stage}" in proc.stdout
    assert "│ hf      │ FAILED" in proc.stdout and "none of the LoRA targets" in proc.stdout
    hf = json.loads(out.read_text())["results"][0]
    assert sorted(hf["stages"]) == ["judge", "load", "sample"] and "none of the LoRA targets" in hf["failed"]


@pytest.mark.parametrize("shape", ["mistral-7b", "qwen-1.5b"])
def test_real_shapes_build_to_the_counted_size(shape):
    """The configs the GPU run builds (on the meta device here: no memory) have exactly the counted parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    s = bench.SHAPES[shape]
    tok = bench.build_tokenizer(s["vocab_size"], 4096)
    assert len(tok) == s["vocab_size"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(bench.model_config(s, tok))
    assert sum(p.numel() for p in model.parameters()) == bench.param_counts(s)["total"]
    assert model.config.model_type == {"mistral-7b": "mistral", "qwen-1.5b": "qwen2"}[shape]
