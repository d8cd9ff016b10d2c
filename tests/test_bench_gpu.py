"""benchmarks/gpu*.py: the arithmetic worked by hand (gpu_roofline.py), the generated model folder
(selfie_lite.testing's builder), and the CPU dry run end to end (gpu.py driving gpu_worker.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu, gpu_roofline
from selfie_lite.testing import PROMPT_OVERHEAD, TINY_SHAPE, shaped_config, shaped_tokenizer

REPO = Path(__file__).resolve().parent.parent

# A config small enough to count by hand: hidden 8, MLP 16, 2 layers, 2 heads of 4 (1 KV head), vocabulary 10.
HAND = dict(arch="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, qkv_bias=False, tie_word_embeddings=False)


def test_param_counts_by_hand():
    c = gpu_roofline.param_counts(HAND)
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, MLP 3 x 8x16 = 384 -> 576; two layers 1152
    assert c["layers_linear"] == 1152
    assert c["embed"] == 80 and c["lm_head"] == 80
    assert c["norms"] == 2 * 2 * 8 + 8
    assert c["total"] == 1152 + 80 + 80 + 40
    assert c["matmul_params"] == 1152 + 80


def test_param_counts_of_the_real_shapes():
    assert gpu_roofline.param_counts(gpu.SHAPES["mistral-7b"])["total"] == 7_241_732_096  # Mistral-7B-v0.1
    assert gpu_roofline.param_counts(gpu.SHAPES["qwen-1.5b"])["total"] == 1_543_714_304  # Qwen2.5-1.5B(-Instruct)
    tied = gpu_roofline.param_counts(gpu.SHAPES["qwen-1.5b"])
    assert tied["lm_head"] == 0 and tied["matmul_params"] == tied["layers_linear"] + 151936 * 1536


def test_weight_bytes_per_step_by_hand():
    # 16-bit: every linear weight, the output projection, the norms, 2 bytes each (embedding lookup left out)
    assert gpu_roofline.weight_bytes_per_step(HAND, "16bit") == 1152 * 2 + 80 * 2 + 40 * 2
    # nf4: 0.5 byte + an 8-bit absmax per 64 + an fp32 scale per 256 blocks; lm_head and norms stay 16-bit
    assert gpu_roofline.NF4_BYTES_PER_PARAM == 0.515869140625
    assert gpu_roofline.weight_bytes_per_step(HAND, "nf4") == pytest.approx(1152 * 0.515869140625 + 160 + 80)
    assert gpu_roofline.weight_bytes_per_step(HAND, "16bit", bytes_16=4) == 2544 * 2  # fp32 on a CPU


def test_mistral_7b_decode_step_reads_3_86_gb_in_4bit():
    shape = gpu.SHAPES["mistral-7b"]
    # 32 layers x 218,103,808 linear weights in nf4, lm_head 32000x4096 and 266,240 norm weights at 2 bytes
    linear = 32 * 218_103_808
    assert gpu_roofline.param_counts(shape)["layers_linear"] == linear
    expected = linear // 2 + linear // 64 + linear * 4 // (64 * 256) + 131_072_000 * 2 + 266_240 * 2
    assert expected == 3_863_093_248
    assert gpu_roofline.weight_bytes_per_step(shape, "nf4") == pytest.approx(expected)
    assert gpu_roofline.weight_bytes_per_step(shape, "16bit") == (linear + 131_072_000 + 266_240) * 2


def test_forward_flops_by_hand():
    assert gpu_roofline.forward_flops(HAND, tokens=10) == 2 * 1232 * 10  # 2 x params x tokens
    # attention at mean context 6: QK^T and AV = 2 x 2 x head_dim 4 x 6 per head, 2 heads, 2 layers = 384 / token
    assert gpu_roofline.forward_flops(HAND, tokens=10, mean_context=6) == (2 * 1232 + 384) * 10
    # sampling: prefill of 3 rows x 4 prompt tokens (mean context 2), then 5 steps of 3 rows (mean context 4 + 2.5)
    assert gpu_roofline.sampling_flops(HAND, rows=3, prompt_len=4, steps=5) == pytest.approx(
        gpu_roofline.forward_flops(HAND, 12, 2) + gpu_roofline.forward_flops(HAND, 15, 6.5))


def test_ratios_to_the_card():
    card = {"card": "H100 SXM", "bandwidth_gbs": 3350, "peak_tflops": 989, "source": "spec sheet"}
    r = gpu_roofline.ratios(weight_bytes=3_863_093_248, steps=300, flops=989e12 * 0.5, seconds=10.0, card=card)
    assert r["bandwidth_frac"] == pytest.approx(3_863_093_248 * 300 / 10 / 3350e9)  # ~3.5% of HBM
    assert r["flops_frac"] == pytest.approx(0.05)
    assert gpu_roofline.ratios(1, 1, 1, 1.0, None) == {"bandwidth_frac": None, "flops_frac": None}


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("Tesla T4", "T4"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
])
def test_card_lookup(name, label):
    assert gpu_roofline.card_spec(name)["card"] == label


def test_unknown_card_has_no_figures():
    assert gpu_roofline.card_spec("Some Future GPU") is None


def test_schedule_estimate_by_hand():
    rates = {"tokens_per_s": 1000, "sequences_per_s": 100, "pairs_per_s": 10, "merge_s": 60, "load_s": 30,
             "train_load_s": 40}
    est = gpu_roofline.schedule_estimate(rates)
    r0, r1, r2, r3 = est["rounds"]
    assert r0["total_s"] == 2000 * 3 / 10 + 60 + 40  # seed DPO 3 epochs, merge, one training load
    # round 1: 8000 x 2 x 300 tokens; 2 models x 16000 seqs; 8000 pairs; merge; 3 loads + a training load
    assert r1["total_s"] == 4800 + 320 + 800 + 60 + 130
    assert r2["total_s"] == 12000 + 800 + 2000 + 60 + 130
    assert r3["total_s"] == 18000 + 1200 + 3000 + 60 + 130
    assert est["total_s"] == 700 + 6110 + 14990 + 22390
    assert gpu_roofline.schedule_estimate({**rates, "pairs_per_s": None}) is None
    # judge.policy_from_sampling: the policy's log-probs come from sampling, only the reference scores (one load less)
    one = gpu_roofline.schedule_estimate(rates, judge_passes=1)["rounds"]
    assert one[0]["total_s"] == 700
    assert one[1]["total_s"] == 4800 + 160 + 800 + 60 + 100


def test_generated_tokenizer_one_word_one_token(tmp_path):
    tok = shaped_tokenizer(vocab_size=600, model_max_length=256)
    assert len(tok) == 600
    ids = tok.apply_chat_template([{"role": "user", "content": "w10 w11 w599"}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>"), 10, 11, 599,
                   tok.convert_tokens_to_ids("<|assistant|>")]
    assert len(ids) == 3 + PROMPT_OVERHEAD
    assert tok.decode([10, 599, tok.eos_token_id], skip_special_tokens=True) == "w10 w599"
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("w42 w43", add_special_tokens=False)["input_ids"] == [42, 43]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One CPU dry run, as docs/gpu.md gives it: the script from another folder, no PYTHONPATH (the driver puts the
    checkout on the worker's path), both backends (unsloth is skipped where it is not installed), the card figures
    given. Returns (stdout, the --out report, the --work-dir); the tests below share it."""
    tmp = tmp_path_factory.mktemp("dry-run")
    # PYTHONPATH holds only the stand-in vLLM (tests/fake_vllm) for --vllm: selfie-lite comes from the driver.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"COLUMNS": "220", "NO_COLOR": "1",
                                                                         "PYTHONPATH": str(REPO / "tests" / "fake_vllm")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--model-shape", "tiny", "--backends", "hf,unsloth",
         "--out", str(tmp / "results.json"), "--bandwidth-gbs", "20", "--peak-tflops", "0.5",
         "--work-dir", str(tmp / "work"), "--vllm"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((tmp / "results.json").read_text()), tmp / "work"


@pytest.mark.cpu_agnostic
def test_tiny_dry_run_prints_every_column(dry_run):
    """A tiny random Llama, every stage through the hf backend, the table and the estimate."""
    text = dry_run[0]
    for col in ("backend", "stage", "work", "seconds", "throughput", "peak alloc GB", "peak reserved GB",
                "<= 20 GB", "weights BW", "bf16 FLOPs"):
        assert col in text, col
    for stage in ("load", "sample", "judge", "train_load", "train", "merge", "sample_vllm"):
        assert f"│ hf      │ {stage}" in text, stage
    assert "tok/s" in text and "seq/s" in text and "pairs/s" in text
    assert "estimated wall time of the paper's schedule" in text and "not a measured run" in text
    if importlib.util.find_spec("unsloth") is None:
        assert "unsloth not installed" in text


@pytest.mark.cpu_agnostic
def test_tiny_dry_run_reports_every_stage(dry_run):
    _, report, work = dry_run
    assert report["params"] == gpu_roofline.param_counts(gpu.SHAPES["tiny"])["total"]
    hf = next(r for r in report["results"] if r["backend"] == "hf")
    stages = hf["stages"]
    assert stages["sample"]["new_tokens"] > 0 and stages["sample"]["rate"] > 0
    assert stages["judge"]["items"] == 64 and stages["judge"]["rate"] > 0  # one judge batch of the tiny preset
    assert stages["train"]["steps"] == 3 and stages["train"]["rate"] > 0
    assert stages["merge"]["merged_gb"] > 0
    # --vllm: the same prompts through the vLLM sampler, its engine a child process gone by the end (no GPU here:
    # no memory figures)
    v = stages["sample_vllm"]
    assert v["items"] == stages["sample"]["items"] and v["new_tokens"] > 0 and v["rate"] > 0
    assert v["why"] == "asked for, on cpu" and v["engine_gb"] is None
    assert not Path(f"/proc/{v['engine_pid']}").exists()
    for name in ("sample", "judge"):  # the card figures were given, so both ratios are numbers
        assert 0 < stages[name]["bandwidth_frac"] and 0 < stages[name]["flops_frac"]
    assert hf["estimate"]["total_s"] > 0 and len(hf["estimate"]["rounds"]) == 4
    assert hf["judge_passes"] in (1, 2) and isinstance(stages["sample"]["policy_logps"], bool)
    unsloth = next(r for r in report["results"] if r["backend"] == "unsloth")
    if importlib.util.find_spec("unsloth") is None:
        assert unsloth == {"backend": "unsloth", "skipped": "unsloth not installed"}
    # the model folder was built in --work-dir, and the model built has the parameters the arithmetic counts
    built = json.loads((work / "model-tiny" / "shape.json").read_text())
    assert built["params"] == gpu_roofline.param_counts(TINY_SHAPE)["total"]


def test_new_tokens_must_leave_room_for_a_prompt(capsys):
    assert gpu.main(["--model-shape", "tiny", "--seq-len", "16", "--new-tokens", "16"]) == 2
    assert "leaves no room for a prompt" in capsys.readouterr().out


@pytest.mark.cpu_agnostic
def test_a_failing_stage_keeps_the_stages_before_it(dry_run, tmp_path, capsys, monkeypatch):
    """A backend that fails (here: LoRA targets that do not exist) still reports what it measured, and the run exits
    1. The driver runs in this process, in the dry run's --work-dir: the model folder there is reused, not rebuilt."""
    monkeypatch.setenv("COLUMNS", "220")
    model_dir = dry_run[2] / "model-tiny"
    files_before = {f.name: f.stat().st_mtime_ns for f in model_dir.iterdir()}
    out = tmp_path / "results.json"
    rc = gpu.main(["--model-shape", "tiny", "--backends", "hf", "--out", str(out), "--work-dir", str(dry_run[2]),
                   "--set", 'lora.target_modules=["nope"]'])
    text = capsys.readouterr().out
    assert rc == 1, text[-3000:]
    for stage in ("load", "sample", "judge"):
        assert f"│ hf      │ {stage}" in text
    assert "│ hf      │ FAILED" in text and "none of the LoRA targets" in text
    hf = json.loads(out.read_text())["results"][0]
    assert sorted(hf["stages"]) == ["judge", "load", "sample"] and "none of the LoRA targets" in hf["failed"]
    assert {f.name: f.stat().st_mtime_ns for f in model_dir.iterdir()} == files_before


@pytest.mark.parametrize("shape", ["mistral-7b", "qwen-1.5b"])
def test_real_shapes_build_to_the_counted_size(shape):
    """The configs the GPU run builds (on the meta device here: no memory) have exactly the counted parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    s = gpu.SHAPES[shape]
    tok = shaped_tokenizer(s["vocab_size"], 4096)
    assert len(tok) == s["vocab_size"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shaped_config(s, tok))
    assert sum(p.numel() for p in model.parameters()) == gpu_roofline.param_counts(s)["total"]
    assert model.config.model_type == {"mistral-7b": "mistral", "qwen-1.5b": "qwen2"}[shape]
    assert model.config.rope_parameters["rope_theta"] == s["rope_theta"]


def test_vllm_row_needs_vllm(capsys):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    assert gpu.main(["--model-shape", "tiny", "--vllm"]) == 2
    assert "--vllm: vLLM is not installed" in capsys.readouterr().out
