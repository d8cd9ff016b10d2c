"""transformers + PEFT (+ bitsandbytes 4-bit) backend: runs on a CPU or a CUDA GPU.

Safety: weights load only from safetensors, trust_remote_code only when the user asks, nothing is unpickled.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from selfie_lite import compat, hub, rss
from selfie_lite.config import LoraConfig, RunConfig
from selfie_lite.errors import RunError, UserError, describe, first_line
from selfie_lite.loss import last_hidden, sequence_logps
from selfie_lite.numerics import pick_device, pick_dtype

compat.quiet_bnb_kernels_warning()  # before transformers (and through it bitsandbytes) is imported

import torch  # noqa: E402
from transformers import GenerationConfig, LogitsProcessorList  # noqa: E402

from selfie_lite.chat import chat_prompt_ids  # noqa: E402


def check_model_source(model_dir: str | Path) -> None:
    """Fail before loading anything: a missing folder, a hub id while offline, pickled weights only, a config.json
    that is not JSON, a safetensors file that is truncated or not one (headers and lengths only: cheap on a 7B
    model, and run before every load)."""
    from selfie_lite import gguf

    if gguf.is_gguf_model(model_dir):  # a .gguf file, a folder holding one, builtin:NAME: converted on resolve
        return gguf.check_gguf_model(model_dir)  # (gguf.resolve_model); the file and the gguf package, here
    path = Path(model_dir).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model folder {model_dir} is a file, expected a model folder (config.json, "
                            "*.safetensors, tokenizer files)")
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a model folder (no config.json)")
        try:
            config = json.loads((path / "config.json").read_bytes())
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise UserError(f"{path / 'config.json'} is not valid JSON ({first_line(e)})",
                            hint="download or copy the model again") from None
        if not isinstance(config, dict):
            raise UserError(f"{path / 'config.json'} is not a model config (a JSON object)")
        has_st = any(path.glob("*.safetensors"))
        if not has_st:
            if any(path.glob("*.bin")) or any(path.glob("*.pt")):
                raise UserError(
                    f"{path} holds only pickled weights (.bin/.pt); selfie-lite loads safetensors only",
                    hint="convert it once: AutoModelForCausalLM.from_pretrained(p).save_pretrained(p, safe_serialization=True)",
                )
            raise UserError(f"{path} has no *.safetensors weights")
        safetensors_headers(path)
        return
    if not hub.looks_like_hub_id(str(model_dir)):
        raise UserError(f"model folder {model_dir} does not exist")
    if hub.offline():
        raise UserError(
            f"{model_dir!r} is a hub model but the hub is offline (HF_HUB_OFFLINE=1)",
            hint="download it once with network access (huggingface-cli download), or pass a local folder",
        )


MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses headers over 100 MB too


def safetensors_headers(folder: Path) -> dict[Path, dict]:
    """Each *.safetensors file's header ({tensor: {dtype, shape, data_offsets}}), read without the weights, after
    checking that the file is whole: an 8-byte length, a JSON header of that length, and data that reaches the last
    tensor's end offset. A shard index (model.safetensors.index.json) must name only shards that are there.
    Written here rather than with safetensors.safe_open, which maps the file and says only "invalid header" or
    fails later, on a read past the end, for a truncated copy."""
    fix = "download or copy the model again (the copy is incomplete or damaged)"
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
                raise UserError(f"{f} is truncated or not a safetensors file ({size:,} bytes)", hint=fix)
            try:
                header = json.loads(fh.read(n))
                tensors = {k: v for k, v in header.items() if k != "__metadata__"}
                end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
                for v in tensors.values():
                    str(v["dtype"]), list(v["shape"])
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError):
                raise UserError(f"{f} is damaged: its safetensors header is not valid", hint=fix) from None
        if 8 + n + end > size:
            raise UserError(f"{f} is truncated: {size:,} bytes, but its tensors need {8 + n + end:,}", hint=fix)
        out[f] = tensors
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_bytes())["weight_map"].values())
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is not a valid shard index", hint=fix) from None
        missing = sorted(s for s in shards if not (Path(folder) / s).is_file())
        if missing:
            raise UserError(f"{Path(folder)} is missing the weight shard {missing[0]} that {index.name} names"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), hint=fix)
    return out


# Non-finite values in the float dtypes safetensors stores (F8 types are rare in SFT models and are skipped).
FULL_CHECK_BYTES = 64 * 2**20  # weight files up to this size are checked whole (the tiny preset, test models)
SAMPLE_BYTES = 64 * 2**10  # else the first and last 64 KiB of every tensor: ~40 MB read for a 7B model


def nonfinite_weights(folder: Path, headers: dict[Path, dict] | None = None) -> tuple[Path, str] | None:
    """(file, tensor) of the first tensor found holding NaN or inf, else None; without loading the model.

    A diverged fine-tune or a bad conversion leaves whole tensors NaN, which the start of a tensor shows; reading a
    7B model whole (15 GB) to find a lone NaN would cost a minute before every run, so over FULL_CHECK_BYTES each
    tensor's first and last SAMPLE_BYTES are read (a sample: a few scattered NaN can pass, and then the loss check
    in training stops the run)."""
    import numpy as np

    kinds = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
    for f, tensors in (headers if headers is not None else safetensors_headers(folder)).items():
        whole = f.stat().st_size <= FULL_CHECK_BYTES
        with open(f, "rb") as fh:
            data_start = 8 + int.from_bytes(fh.read(8), "little")
            for name, t in tensors.items():
                kind = kinds.get(t["dtype"])
                if kind is None:
                    continue
                a, b = (data_start + int(x) for x in t["data_offsets"])
                size = np.dtype(kind).itemsize
                spans = [(a, b)] if whole or b - a <= 2 * SAMPLE_BYTES else [(a, a + SAMPLE_BYTES), (b - SAMPLE_BYTES, b)]
                for lo, hi in spans:
                    fh.seek(lo)
                    x = np.frombuffer(fh.read((hi - lo) // size * size), dtype=kind)
                    # bfloat16 has no numpy type: all-ones exponent bits (0x7F80) mean inf or NaN.
                    bad = ((x & 0x7F80) == 0x7F80).any() if t["dtype"] == "BF16" else not np.isfinite(x).all()
                    if bad:
                        return f, name
    return None


def check_model_files(model_dir: Path, lora: LoraConfig, trust_remote_code: bool = False) -> None:
    """The preflight's checks of a local model folder beyond check_model_source, still without loading a weight:
    tokenizer files present and readable, LoRA targets that exist (from the tensor names in the safetensors
    headers), no NaN or inf in the weights (nonfinite_weights)."""
    folder = Path(model_dir)
    vocab = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model", "*tiktoken*")
    if not trust_remote_code and not any(any(folder.glob(pattern)) for pattern in vocab):
        raise UserError(f"{folder} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json or vocab.txt)",
                        hint="copy the tokenizer files of the model it was fine-tuned from into the folder")
    if (folder / "tokenizer.json").is_file():
        try:
            json.loads((folder / "tokenizer.json").read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{folder / 'tokenizer.json'} is not valid JSON ({first_line(e)})",
                            hint="download or copy the tokenizer again") from None
    headers = safetensors_headers(folder)
    leaves = {name.rsplit(".", 2)[-2] for tensors in headers.values() for name in tensors if "." in name}
    check_lora_targets(lora, leaves, f"the model in {folder}")
    bad = nonfinite_weights(folder, headers)  # the headers read above: each file's header is read once here
    if bad is not None:
        raise UserError(f"{bad[0]}: tensor {bad[1]} holds NaN or infinite values",
                        hint="the weights are broken (a diverged fine-tune or a bad conversion): use another checkpoint")


def check_lora_targets(lora: LoraConfig, present: set[str], where: str = "this model") -> list[str]:
    """The configured LoRA targets present among the model's module names (`present`: the last part of each
    module's name, as PEFT matches them). None present is an error; with targets of the user's own choosing (not the
    default list, which covers several families of models), each one must exist, or it would be dropped silently."""
    targets = [t for t in lora.target_modules if t in present]
    linear = sorted(p for p in present if "proj" in p or p in ("fc1", "fc2", "c_attn", "c_proj", "c_fc", "dense"))
    hint = f"set lora.target_modules to some of: {', '.join(linear[:12])}" if linear else None
    if not targets:
        raise UserError(f"none of the LoRA targets {lora.target_modules} exist in {where}", hint=hint)
    missing = [t for t in lora.target_modules if t not in present]
    if missing and lora.target_modules != LoraConfig().target_modules:
        raise UserError(f"lora.target_modules names {', '.join(missing)}, which {where} does not have", hint=hint)
    return targets


def check_chat_template(tok, where: str) -> None:
    """Lay out a one-turn conversation as sampling and training will (chat.py): a template with a Jinja syntax
    error, or one that raises on a plain user/assistant exchange, is found before the run starts."""
    from selfie_lite.chat import chat_prompt_ids, chat_response_ids

    try:
        chat_prompt_ids(tok, "Hello?")
        chat_response_ids(tok, "Hello?", "Hi.")
    except Exception as e:  # jinja2's TemplateSyntaxError / TemplateError, or what the template raises itself
        line = getattr(e, "lineno", None)
        raise UserError(f"the chat template {where} does not work: {describe(e)}"
                        + (f" (template line {line})" if line else ""),
                        hint="fix the template, or pass a working one with --chat-template FILE") from None


def read_chat_template(path: str) -> str:
    """A chat_template file's text: a Jinja template, UTF-8 (as Jinja reads it)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text", hint="save the template as UTF-8", key="chat_template") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})", key="chat_template") from None


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
                kwargs["device_map"] = {"": 0}
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
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=self.dtype
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

    def save_adapter(self, model, out_dir):
        model.save_pretrained(str(out_dir), safe_serialization=True)

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
