"""Version shims: every place where selfie-lite bends to a particular version of transformers, TRL, PEFT,
bitsandbytes, datasets or Unsloth, each naming the version it exists for, so that dropping support for an old version
(or a library fixing what we work around) is a matter of deleting here.

What belongs here: a switch between two spellings or behaviours of a library, or a workaround for one version's
behaviour. What does not: our own method (which reference, which loss), and the supported ranges themselves, which
are pyproject.toml's (`selfie-lite doctor` reads them from there).

Importing this module is cheap (the standard library only): chat.py imports it, and chat.py is imported by the CLI.
torch, transformers, TRL and bitsandbytes are imported inside the shims that need them, or handed in.
"""

from __future__ import annotations

import contextlib

# -------------------------------------------------------------------------------------------------
# transformers


def checkpointing_arg(args_class) -> str:
    """The name of TrainingArguments' checkpointing switch on `args_class` (a TrainingArguments subclass such as
    TRL's DPOConfig); its keyword arguments are the same name + "_kwargs".

    transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (the old name still works but
    warns, and goes in v6); older ones, such as the transformers <= 5.17 that Unsloth pins on the GPU stack, know
    only the old name."""
    return "activation_checkpointing" if "activation_checkpointing" in args_class.__dataclass_fields__ \
        else "gradient_checkpointing"


def dequantized_save_kwargs(model) -> dict:
    """What `model.save_pretrained` needs to save a 4-bit model that was dequantized to plain 16-bit weights.

    transformers 5 records the 4-bit deserialisation it did at load time and, with save_original_format=True (the
    default), tries to undo it on save, which it cannot after a dequantize (NotImplementedError in 5.17): the
    weights are saved as they are instead. A save_pretrained without that parameter has nothing to undo."""
    import inspect

    if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        return {"save_original_format": False}
    return {}


def silence_is_gradient_checkpointing_warning() -> None:
    """transformers 5.24 deprecated PreTrainedModel.is_gradient_checkpointing (now is_activation_checkpointing) and
    warns (FutureWarning) on every call, which PEFT and TRL make in every run: noise a user can do nothing about.
    Only that message is silenced; gone with transformers 6, which drops the old name."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


# -------------------------------------------------------------------------------------------------
# TRL


def drop_trl_ref_adapter(peft_model) -> None:
    """Delete the "ref" adapter that TRL 1.16's DPOTrainer adds when it is handed a PeftModel and no ref_model: a
    copy of the "default" adapter, which it then uses as the DPO reference. Without it TRL falls back to the model
    with its adapters disabled. Where no copy was made (peft < 0.20 with LoRA target_parameters, where TRL 1.16
    skips it; a TRL that does not make one) this does nothing."""
    if "ref" in peft_model.peft_config:
        peft_model.delete_adapter("ref")


@contextlib.contextmanager
def no_trl_prompt_filter(args):
    """Inside: TRL's DPOTrainer._prepare_dataset keeps pairs whose prompt alone fills args.max_length.

    TRL 1.x has no max_prompt_length (TRL 0.x cut prompts to it) and drops those pairs after tokenising them (its
    keep_start filter, TRL 1.16). The filter is the only use of args.max_length there, so it is set to None for the
    call and restored after: the caller cuts the prompts itself."""
    max_length, args.max_length = args.max_length, None
    try:
        yield
    finally:
        args.max_length = max_length


# -------------------------------------------------------------------------------------------------
# bitsandbytes


def quiet_bnb_kernels_warning() -> None:
    """bitsandbytes' CPU backend (since its fused 4-bit CPU kernel, bitsandbytes#1804, late 2025; 0.50.2 here)
    logs a warning on import, on AVX512-BF16 CPUs, when the optional `kernels` package is missing. `kernels`
    fetches code from the hub at run time, which we never want, so the warning is noise: its logger is set to
    errors only. Call before bitsandbytes is imported (transformers and PEFT import it).

    transformers >= 5.25 requires `kernels`, so it is usually installed: bitsandbytes then asks it for that kernel,
    and offline `kernels` logs "Skipping publisher trust check ... offline mode" before the fetch fails and
    bitsandbytes falls back to its own code (the warning above follows). Both are noise to a user: errors only."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)


def disable_bnb_cpu_inference_repack(model) -> None:
    """Switch off bitsandbytes' CPU inference repack on every 4-bit layer of `model`.

    bitsandbytes (the same fused CPU 4-bit kernel as above; 0.50.2 here), on AVX512-BF16 CPUs, repacks a
    Linear4bit's weights into an inference-only layout on its first forward without gradients in eval mode; LoRA
    training on those layers afterwards silently loses its gradients. A bitsandbytes without the switch
    (support_avx512bf16_for_cpu) gets an attribute it never reads; without bitsandbytes, nothing is 4-bit."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
