"""compat.py: each version shim against the libraries installed here (transformers 5.24, TRL 1.16, bitsandbytes 0.50
at the time of writing), and the other side of its switch with a stand-in where the installed version cannot show it.
Where a shim exists because of what a version does, the test also checks that the installed version still does it,
so a library that stops needing the shim shows up here."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers
from packaging.version import Version
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig

from selfie_lite import compat
from selfie_lite.train import _checkpointing

TRANSFORMERS = Version(transformers.__version__)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One id per word, and a chat template in plain words: 'user hi there end assistant'."""
    vocab = {w: i for i, w in enumerate(["<pad>", "end", "user", "assistant", "hi", "there"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="end")
    out.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} end {% endfor %}"
                         "{% if add_generation_prompt %}assistant{% endif %}")
    return out


# -------------------------------------------------------------------------------------------------
# transformers


def test_template_ids_of_the_installed_apply_chat_template():
    from selfie_lite.chat import template_ids

    assert template_ids(word_tokenizer(), [{"role": "user", "content": "hi there"}], add_generation_prompt=True) == \
        [2, 4, 5, 1, 3]


def test_checkpointing_arg_follows_the_installed_transformers():
    want = "activation_checkpointing" if TRANSFORMERS >= Version("5.24") else "gradient_checkpointing"
    assert compat.checkpointing_arg(DPOConfig) == want


def test_checkpointing_arg_before_the_rename():
    @dataclasses.dataclass
    class OldArguments:  # TrainingArguments before transformers 5.24: only the old name
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    assert compat.checkpointing_arg(OldArguments) == "gradient_checkpointing"


@pytest.mark.parametrize("on", [False, True])
def test_train_checkpointing_sets_it_without_the_deprecation_warning(tmp_path, on):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **_checkpointing(on))
    assert not [w for w in seen if "gradient_checkpointing" in str(w.message)]
    assert args.gradient_checkpointing is on
    name = compat.checkpointing_arg(DPOConfig)
    assert getattr(args, name) is on and getattr(args, f"{name}_kwargs") == {"use_reentrant": False}


def test_the_old_checkpointing_name_warns_in_the_installed_transformers(tmp_path):
    if TRANSFORMERS < Version("5.24"):
        pytest.skip("gradient_checkpointing is not deprecated before transformers 5.24")
    with pytest.warns(FutureWarning, match="gradient_checkpointing` is deprecated"):
        DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_checkpointing=True)


@pytest.mark.parametrize("ratio, steps", [(0.0, 0), (0.1, 10), (0.25, 25)])
def test_warmup_ratio_is_a_share_of_the_steps(tmp_path, ratio, steps):
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", warmup_steps=ratio)  # as train_dpo
    assert args.get_warmup_steps(100) == steps


def test_dequantized_save_kwargs():
    assert compat.dequantized_save_kwargs(tiny_llama()) == {"save_original_format": False}  # transformers 5

    class Older:
        def save_pretrained(self, save_directory, safe_serialization=True):
            pass

    assert compat.dequantized_save_kwargs(Older()) == {}


def test_is_gradient_checkpointing_warning_is_silenced_and_only_it():
    model = tiny_llama()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.is_gradient_checkpointing  # noqa: B018
    if TRANSFORMERS >= Version("5.24"):
        assert [w.category for w in seen] == [FutureWarning]  # why the shim exists
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compat.silence_is_gradient_checkpointing_warning()
        model.is_gradient_checkpointing  # noqa: B018
        warnings.warn("`something_else` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["`something_else` is deprecated"]


# -------------------------------------------------------------------------------------------------
# TRL


def test_drop_trl_ref_adapter():
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(), lora)
    model.add_adapter("ref", lora)  # what TRL 1.16's DPOTrainer does with a PeftModel
    compat.drop_trl_ref_adapter(model)
    assert set(model.peft_config) == {"default"}
    assert not [n for n, _ in model.named_parameters() if ".ref." in n]
    compat.drop_trl_ref_adapter(model)  # no copy: nothing happens
    assert set(model.peft_config) == {"default"}


def test_no_trl_prompt_filter_restores_max_length():
    args = SimpleNamespace(max_length=64)
    with compat.no_trl_prompt_filter(args):
        assert args.max_length is None
    assert args.max_length == 64
    with pytest.raises(RuntimeError), compat.no_trl_prompt_filter(args):
        raise RuntimeError("tokenisation failed")
    assert args.max_length == 64
    # TRL keeping the long prompts inside it: tests/test_train.py::test_long_prompts_are_cut_to_their_end_not_dropped


# -------------------------------------------------------------------------------------------------
# bitsandbytes

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")


def _avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _linear4bit():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    return torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4"),
                               torch.nn.Linear(64, 8)).to("cpu")  # .to quantizes the 4-bit weight


def _eval_forward_packs(model) -> bool:
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 64))
    return bool(getattr(model[0].weight.quant_state, "packing_format_for_cpu", False))


@needs_bnb
def test_disable_bnb_cpu_inference_repack():
    if not _avx512bf16():
        pytest.skip("bitsandbytes repacks only on AVX512-BF16 CPUs")
    assert _eval_forward_packs(_linear4bit())  # why the shim exists: an eval forward repacks the weights
    model = _linear4bit()
    compat.disable_bnb_cpu_inference_repack(model)
    assert model[0].support_avx512bf16_for_cpu is False
    assert not hasattr(model[1], "support_avx512bf16_for_cpu")  # only the 4-bit layers are touched
    assert not _eval_forward_packs(model)


def test_quiet_bnb_kernels_warning_sets_its_logger_to_errors():
    compat.quiet_bnb_kernels_warning()
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() == logging.ERROR
    assert logging.getLogger("kernels._internals.hf_hub").getEffectiveLevel() == logging.ERROR


@needs_bnb
def test_quiet_bnb_kernels_warning_on_import():
    if not _avx512bf16():
        pytest.skip("bitsandbytes looks for its fused kernel only on AVX512-BF16 CPUs")
    # offline, with or without the `kernels` package (transformers >= 5.25 requires it), importing bitsandbytes on
    # such a CPU logs about the kernel it could not get
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = "import bitsandbytes"
    before = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert "kernels-community" in before.stderr  # why the shim exists
    quiet = "from selfie_lite import compat; compat.quiet_bnb_kernels_warning(); " + script
    after = subprocess.run([sys.executable, "-c", quiet], capture_output=True, text=True, check=True, env=env)
    assert "kernels-community" not in after.stderr and "publisher trust" not in after.stderr, after.stderr
    # Importing the package is enough: config validation imports transformers.trainer_utils (-> PEFT ->
    # bitsandbytes) long before a backend loads, and `selfie-lite run` printed both lines from there.
    first = "import selfie_lite, transformers.trainer_utils"
    package = subprocess.run([sys.executable, "-c", first], capture_output=True, text=True, check=True, env=env)
    assert "kernels-community" not in package.stderr and "publisher trust" not in package.stderr, package.stderr
