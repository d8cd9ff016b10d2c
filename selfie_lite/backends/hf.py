"""transformers + PEFT (+ bitsandbytes 4-bit) backend: runs on a CPU or a CUDA GPU.

Safety: weights load only from safetensors, trust_remote_code only when the user asks, nothing is unpickled.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessorList

from selfie_lite import compat, rss
from selfie_lite.chat import chat_prompt_ids
from selfie_lite.config import LoraConfig, RunConfig
from selfie_lite.errors import RunError, UserError, first_line
from selfie_lite.loss import last_hidden, sequence_logps
from selfie_lite.model_files import check_lora_targets, check_model_source, read_chat_template
from selfie_lite.numerics import pick_device, pick_dtype


class HFBackend:
    name = "hf"

    def __init__(self, cfg: RunConfig):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # our Rich bars say what is going on
        transformers.utils.logging.set_verbosity_error()
        self.cfg = cfg
        self.device = pick_device()
        self.dtype = pick_dtype(cfg.train.precision, self.device)
        self._chat_template = read_chat_template(cfg.chat_template) if cfg.chat_template else None

    # -- loading --------------------------------------------------------------------------------

    def load_tokenizer(self, model_dir):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=self.cfg.trust_remote_code)
        if self._chat_template:
            tok.chat_template = self._chat_template
        if not tok.chat_template:
            raise UserError(
                f"the tokenizer in {model_dir} has no chat template",
                hint="pass one with --chat-template FILE (a Jinja file, e.g. from the model card)",
            )
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def load(self, model_dir, *, trainable: bool = False):
        from transformers import AutoModelForCausalLM

        check_model_source(model_dir)
        tok = self.load_tokenizer(model_dir)
        kwargs = dict(trust_remote_code=self.cfg.trust_remote_code, use_safetensors=True, dtype=self.dtype)
        if self.cfg.load_in_4bit:
            kwargs["quantization_config"] = self._bnb_config()
            if self.device == "cuda":
                # this process's GPU: 0 alone, or under accelerate launch the one PartialState set (distributed.py)
                kwargs["device_map"] = {"": torch.cuda.current_device()}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
        except OSError as e:
            raise UserError(f"could not load model {model_dir}: {first_line(e)}") from None
        if self.cfg.load_in_4bit:
            compat.disable_bnb_cpu_inference_repack(model)  # or LoRA training loses its gradients
            if trainable:
                from peft import prepare_model_for_kbit_training

                model = prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=self.cfg.train.gradient_checkpointing
                )
        elif self.device == "cuda":
            model.to(self.device)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tok.pad_token_id
        model.train(trainable)
        return model, tok

    def _bnb_config(self):
        from transformers import BitsAndBytesConfig

        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("needs bitsandbytes", hint="pip install 'selfie-lite[quant]'", key="load_in_4bit") from None
        # Under DeepSpeed ZeRO-3 or FSDP (accelerate launch, docs/scaling.md) the 4-bit weights are sharded with
        # the others, which needs them stored in the compute dtype rather than uint8 (QLoRA + ZeRO-3/FSDP).
        sharded = any(os.environ.get(k, "").lower() in ("1", "true") for k in ("ACCELERATE_USE_DEEPSPEED",
                                                                                "ACCELERATE_USE_FSDP"))
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=self.dtype,
            **({"bnb_4bit_quant_storage": self.dtype} if sharded else {}),
        )

    def add_lora(self, model, lora: LoraConfig, seed: int):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        targets = lora_targets(model, lora)
        torch.manual_seed(seed)  # LoRA A is random: fix it so a resumed stage starts from the same adapter
        pcfg = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
        )
        return get_peft_model(model, pcfg)

    # -- generation -----------------------------------------------------------------------------

    def generate(self, model, tokenizer, prompts, *, num_samples, temperature, top_p, max_new_tokens, batch_size,
                 seed, on_batch=None):
        model.eval()
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tokenizer.eos_token_id])
        prompt_ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
        out: list[dict] = []
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        pad = tokenizer.pad_token_id
        for start in range(0, len(prompts), batch_size):
            batch = prompt_ids[start : start + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, p in enumerate(batch):  # left padding: every prompt ends where generation starts
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            recorder = _LogpRecorder()
            # A bare GenerationConfig: only the paper's sampling settings, none of the model's extra processors
            # (repetition penalty, top_k = 50 by default...). Then the recorder, which runs before the temperature
            # and top-p warpers, sees the model's raw logits, and its log-probs are exactly log pi(y|x).
            gen_cfg = GenerationConfig(
                do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples, pad_token_id=pad, eos_token_id=sorted(eos_ids),
                bos_token_id=model.generation_config.bos_token_id,
            )
            with torch.inference_mode():
                seqs = model.generate(
                    input_ids=ids.to(model.device), attention_mask=mask.to(model.device), generation_config=gen_cfg,
                    logits_processor=LogitsProcessorList([recorder]),
                )
            step_logps = recorder.finish(seqs).tolist()  # [B*K, new tokens]
            new = seqs[:, width:].tolist()
            n_tokens = 0
            for row, p in enumerate(batch):
                resp_ids, resp_logps = [], []
                for k in range(num_samples):
                    toks = new[row * num_samples + k]
                    cut = next((j + 1 for j, t in enumerate(toks) if t in eos_ids), len(toks))
                    resp_ids.append(toks[:cut])
                    resp_logps.append(float(sum(step_logps[row * num_samples + k][:cut])))
                    n_tokens += cut
                out.append({
                    "prompt": prompts[start + row],
                    "prompt_ids": p,
                    "responses": [tokenizer.decode(r, skip_special_tokens=True) for r in resp_ids],
                    "response_ids": resp_ids,
                    "policy_logps": resp_logps,  # log pi_sampler(y|x), sums: the judge's policy term for free
                })
            if on_batch:
                on_batch(len(batch), n_tokens)
        return out

    # -- scoring --------------------------------------------------------------------------------

    def sequence_logps(self, model, sequences, *, batch_size, on_batch=None):
        model.eval()
        pad = 0
        result = [0.0] * len(sequences)
        # Longest first: similar lengths share a batch (less padding) and an OOM shows up on the first batch.
        order = sorted(range(len(sequences)), key=lambda i: -(len(sequences[i][0]) + len(sequences[i][1])))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            seqs = [sequences[i][0] + sequences[i][1] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            labels_mask = torch.zeros_like(ids, dtype=torch.bool)
            for row, i in enumerate(idx):
                p, r = sequences[i]
                ids[row, : len(p) + len(r)] = torch.tensor(p + r)
                attn[row, : len(p) + len(r)] = 1
                labels_mask[row, len(p) : len(p) + len(r)] = True
            ids, attn, labels_mask = ids.to(model.device), attn.to(model.device), labels_mask.to(model.device)
            with torch.inference_mode():
                # loss.sequence_logps from the last hidden states, a chunk of response positions at a time: the
                # judging peak is one [chunk, V] block, not the [batch, T, V] logits (docs/performance.md).
                sums = sequence_logps(last_hidden(model, ids, attn), ids[:, 1:], labels_mask[:, 1:])  # [B]
            for row, i in enumerate(idx):
                result[i] = float(sums[row])
            if on_batch:
                on_batch(len(idx))
        return result

    # -- saving and merging ---------------------------------------------------------------------

    def save_adapter(self, model, out_dir, weights: dict | None = None):
        """The adapter's files; `weights` (name -> tensor, train.adapter_weights) in place of the model's own
        parameters, which under a sharding engine are the main process's shard only."""
        model.save_pretrained(str(out_dir), safe_serialization=True, **({"state_dict": weights} if weights else {}))

    def merge(self, base_dir, adapter_dir, out_dir):
        """Never merge into 4-bit weights (lossy re-quantization): load the base in 16/32-bit, merge, save."""
        merge_peft_16bit(base_dir, adapter_dir, out_dir, dtype=self.dtype, device=self.device,
                         trust_remote_code=self.cfg.trust_remote_code)
        self.load_tokenizer(base_dir).save_pretrained(str(out_dir))
        self.free()

    def free(self, *objs):
        del objs
        gc.collect()
        rss.trim()  # give the freed weights' pages back to the OS, not only to the allocator
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def lora_targets(model, lora: LoraConfig) -> list[str]:
    """The configured LoRA target names this model has (Llama/Mistral/Qwen names by default); none is an error."""
    return check_lora_targets(lora, {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()})


class _LogpRecorder:
    """A logits processor that keeps log p(token) of every sampled token, from the raw logits.

    At step t it sees the logits for token t and, in input_ids, the token drawn at step t-1: it stores
    log_softmax(previous logits)[that token], so it holds one [N, V] tensor at a time, never the whole history.
    """

    def __init__(self):
        self.prev = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[N, steps] log-probs of the generated tokens (positions after an end-of-sequence are junk)."""
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, sequences[:, -1:]).squeeze(-1))
            self.prev = None
        return torch.stack(self.steps, dim=1).cpu() if self.steps else torch.zeros((sequences.shape[0], 0))


def oom_error(stage: str) -> RunError:
    return RunError(
        f"out of GPU memory during {stage}",
        hint="lower sample.batch_size / judge.batch_size / train.batch_size (raise train.grad_accum to keep the "
        "effective batch), lower train.max_length, add --load-in-4bit, keep train.gradient_checkpointing=true; "
        "then --resume",
    )


# ---------------------------------------------------------------------------------------------
# 16-bit merge without Unsloth, and a check of what a merge wrote (both usable on a CPU)


def merge_peft_16bit(base_dir, adapter_dir, out_dir, *, dtype: torch.dtype, device: str, trust_remote_code: bool):
    """Load the base in 16-bit (dequantizing a pre-quantized bnb folder), merge the adapter with PEFT, save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = dtype if device == "cuda" else torch.float32
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    if device == "cuda":
        kwargs["device_map"] = {"": 0}
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    # A folder (or hub id) saved pre-quantized loads 4-bit whatever we ask: found from the loaded config.
    quantized = getattr(base.config, "quantization_config", None) is not None or getattr(base, "is_quantized", False)
    if quantized:
        base = base.dequantize()  # nf4 -> 16-bit; merging into 4-bit weights would re-quantize (lossy)
        base.to(dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    save_kwargs: dict = {"safe_serialization": True}
    if quantized:
        if hasattr(merged.config, "quantization_config"):
            del merged.config.quantization_config
        save_kwargs.update(compat.dequantized_save_kwargs(merged))  # the weights are plain 16-bit now
    merged.save_pretrained(str(out_dir), **save_kwargs)
    _drop_quantization_config(out_dir)
    del base, merged


def merged_folder_problem(folder) -> str | None:
    """None when `folder` is a merged 16-bit model folder; else what is wrong (lora tensors, 4-bit tensors, ...)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return "no config.json"
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        return "no *.safetensors weights"
    if "quantization_config" in _read_config(folder):
        return "config.json still declares quantized weights"
    from safetensors import safe_open

    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if "lora_" in key:
                    return f"{shard.name} holds unmerged LoRA tensor {key}"
                if key.endswith((".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4")):
                    return f"{shard.name} holds 4-bit tensor {key}"
    return None


def _read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _drop_quantization_config(folder: Path) -> None:
    """A 16-bit merge of a 4-bit model may keep the bnb entry in config.json: the weights are 16-bit now."""
    path = Path(folder) / "config.json"
    cfg = _read_config(folder)
    if "quantization_config" in cfg:
        del cfg["quantization_config"]
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
