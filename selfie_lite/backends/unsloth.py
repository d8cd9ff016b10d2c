"""Unsloth backend: the fast GPU path behind the same interface as the transformers backend (backends/base.py).

What Unsloth changes, stage by stage (everything else is inherited from HFBackend):
  load      FastLanguageModel.from_pretrained: its patched Llama/Mistral/Qwen kernels, 4-bit bitsandbytes (nf4)
            loading, and its offloaded gradient checkpointing ("unsloth") when train.gradient_checkpointing is on.
  add_lora  FastLanguageModel.get_peft_model: LoRA with its fused LoRA kernels (the adapter-disabled model is still
            the DPO reference: Unsloth's kernels skip the adapter when PEFT disables it).
  generate  FastLanguageModel.for_inference(model) first (its fast decode path), and back with for_training() when
            the model came in training mode, so sampling in the middle of training is safe.
  train     nothing here: this module imports unsloth before transformers, peft and trl, so TRL's DPOTrainer (and
            train.py's subclass of it) is Unsloth's patched one whenever this backend was selected.
  log-probs (judging, training) never read the patched CausalLM forward's `.logits`: Unsloth's may return an
            empty tensor (its fused-loss path) or hidden states (UNSLOTH_RETURN_HIDDEN_STATES) there. loss.last_hidden
            runs the decoder stack (Unsloth's fast kernels, LoRA included) and applies the output layer itself, in
            chunks (tests/test_unsloth_backend.py checks all three behaviours through the stand-in).
  merge     through 16-bit weights: Unsloth's save_pretrained_merged(..., save_method="merged_16bit") dequantizes a
            4-bit base and merges the adapter layer by layer (a 4-bit merge would re-quantize: lossy, and Unsloth
            refuses it). If that path is missing or fails, the base is loaded in 16-bit (dequantized when the folder
            is pre-quantized) and PEFT merges into it.

This is the only module that imports unsloth, and it does so first thing: Unsloth must patch transformers, peft and
trl before they are imported. Importing it without a GPU raises NotImplementedError (when
UNSLOTH_DISABLE_CPU_FALLBACK=1) or ImportError; both mean "absent" and become one ImportError that
backends.get_backend turns into a one-line error.
"""

from __future__ import annotations

from selfie_lite.errors import describe  # no torch/transformers import: safe before unsloth

try:
    import unsloth  # noqa: F401  (must come before transformers, peft and trl)
    from unsloth import FastLanguageModel
except (ImportError, NotImplementedError) as _e:
    raise ImportError(f"unsloth is not installed or cannot run on this machine ({describe(_e)})") from None
except Exception as _e:  # a broken install (wrong torch/triton/xformers build) is "absent" too, but say what broke
    raise ImportError(f"unsloth failed to import ({describe(_e)})") from None

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from selfie_lite.backends.hf import (  # noqa: E402
    HFBackend,
    _drop_quantization_config,
    lora_targets,
    merge_peft_16bit,
    merged_folder_problem,
)
from selfie_lite.config import LoraConfig, RunConfig  # noqa: E402
from selfie_lite.errors import RunError, UserError  # noqa: E402
from selfie_lite.model_files import check_model_source  # noqa: E402
from selfie_lite.numerics import pick_dtype  # noqa: E402


def unsloth_dtype(precision: str, device: str) -> torch.dtype:
    """Unsloth computes in 16 bits on a GPU: "auto" is bf16 where the card has it, else fp16 (a T4), never fp32."""
    return pick_dtype(precision, device, gpu_fallback="fp16")  # on a CPU (Unsloth's fallback): fp32, as the HF path


class UnslothBackend(HFBackend):
    name = "unsloth"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.dtype = unsloth_dtype(cfg.train.precision, self.device)
        # Longest sequence any stage sees: a DPO pair (train.max_length) or a prompt plus its sample.
        self.max_seq_length = max(cfg.train.max_length, cfg.train.max_prompt_length + cfg.sample.max_new_tokens)
        self.last_merge: dict = {}  # which merge path ran, for the benchmark and the logs

    # -- loading --------------------------------------------------------------------------------

    def _from_pretrained(self, model_dir, *, trainable: bool):
        check_model_source(model_dir)
        local = Path(str(model_dir)).expanduser().exists()
        try:
            model, _unsloth_tok = FastLanguageModel.from_pretrained(
                model_name=str(model_dir),
                max_seq_length=self.max_seq_length,
                dtype=self.dtype,
                load_in_4bit=self.cfg.load_in_4bit,
                trust_remote_code=self.cfg.trust_remote_code,
                use_gradient_checkpointing=self._checkpointing() if trainable else False,
                random_state=self.cfg.random_seed,
                fix_tokenizer=False,  # our tokenizer (chat template, pad token) comes from load_tokenizer
                local_files_only=local,
            )
        except OSError as e:
            raise UserError(f"could not load model {model_dir}: {describe(e)}") from None
        except (RuntimeError, ValueError) as e:
            if "Unsloth" in str(e):
                raise UserError(f"unsloth could not load {model_dir}: {describe(e)}",
                                hint="try --backend hf; see docs/gpu.md for the models Unsloth supports") from None
            raise
        return model

    def _checkpointing(self):
        # "unsloth" = Unsloth's checkpointing that offloads activations to CPU RAM (its memory saver for DPO).
        return "unsloth" if self.cfg.train.gradient_checkpointing else False

    def load(self, model_dir, *, trainable: bool = False):
        check_model_source(model_dir)  # a missing folder or pickled weights: one line, before anything loads
        tok = self.load_tokenizer(model_dir)  # same tokenizer, template and pad token as the hf backend
        model = self._from_pretrained(model_dir, trainable=trainable)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tok.pad_token_id
        if trainable:
            FastLanguageModel.for_training(model, use_gradient_checkpointing=bool(self.cfg.train.gradient_checkpointing))
        else:
            FastLanguageModel.for_inference(model)
        return model, tok

    def add_lora(self, model, lora: LoraConfig, seed: int):
        targets = lora_targets(model, lora)
        torch.manual_seed(seed)
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            bias="none",
            use_gradient_checkpointing=self._checkpointing(),
            random_state=seed,  # LoRA A is random: fixed so a resumed stage starts from the same adapter
            max_seq_length=self.max_seq_length,
        )
        FastLanguageModel.for_training(model, use_gradient_checkpointing=bool(self.cfg.train.gradient_checkpointing))
        return model

    # -- generation and scoring: Unsloth's inference mode, then back to where the model was ------------------

    def _inference_mode(self, model):
        was_training = bool(getattr(model, "training", False))
        FastLanguageModel.for_inference(model)
        return was_training

    def _restore(self, model, was_training: bool):
        if was_training:
            FastLanguageModel.for_training(model, use_gradient_checkpointing=bool(self.cfg.train.gradient_checkpointing))

    def generate(self, model, tokenizer, prompts, *, num_samples, temperature, top_p, max_new_tokens, batch_size,
                 seed, on_batch=None):
        was_training = self._inference_mode(model)
        try:
            return super().generate(
                model, tokenizer, prompts, num_samples=num_samples, temperature=temperature, top_p=top_p,
                max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, on_batch=on_batch,
            )
        finally:
            self._restore(model, was_training)

    def sequence_logps(self, model, sequences, *, batch_size, on_batch=None):
        was_training = self._inference_mode(model)
        try:
            return super().sequence_logps(model, sequences, batch_size=batch_size, on_batch=on_batch)
        finally:
            self._restore(model, was_training)

    # -- merging --------------------------------------------------------------------------------

    def merge(self, base_dir, adapter_dir, out_dir):
        """Adapter merged into 16-bit weights: Unsloth's merged_16bit save, else a 16-bit PEFT merge."""
        out_dir = Path(out_dir)
        try:
            self._merge_unsloth(base_dir, adapter_dir, out_dir)
            problem = merged_folder_problem(out_dir)
            if problem is None:
                self.last_merge = {"path": "unsloth merged_16bit"}
                return
            reason = f"unsloth's merged_16bit save wrote an unusable folder: {problem}"
        except (AttributeError, TypeError, NotImplementedError, RuntimeError, ValueError, KeyError) as e:
            if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
                raise
            reason = f"unsloth's merged_16bit save failed: {describe(e)}"
        finally:
            self.free()
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        merge_peft_16bit(base_dir, adapter_dir, out_dir, dtype=self.dtype, device=self.device,
                         trust_remote_code=self.cfg.trust_remote_code)
        self.load_tokenizer(base_dir).save_pretrained(str(out_dir))
        problem = merged_folder_problem(out_dir)
        if problem is not None:
            raise RunError(f"merging {adapter_dir} into {base_dir} failed: {problem}")
        self.last_merge = {"path": "peft 16-bit", "reason": reason}

    def _merge_unsloth(self, base_dir, adapter_dir, out_dir: Path):
        from peft import PeftModel

        model = self._from_pretrained(base_dir, trainable=False)
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        # get_peft_model / from_pretrained(adapter folder) bind the save methods onto the PeftModel; a PeftModel made
        # here must be bound the same way, or save_pretrained_merged would resolve to the inner model's.
        from unsloth.save import patch_saving_functions

        patch_saving_functions(model)
        tok = self.load_tokenizer(base_dir)
        model.save_pretrained_merged(str(out_dir), tok, save_method="merged_16bit")
        _drop_quantization_config(out_dir)
        del model
