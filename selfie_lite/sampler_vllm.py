"""Optional vLLM sampling for stage 1 (docs/method.md, "The loop"): the same rows as Backend.generate, faster.

`--sampler vllm` draws the K responses per prompt with vLLM (paged KV cache, continuous batching) instead of
transformers' generate; `--sampler generate` (the default) keeps the backend's own generate; `--sampler auto` takes
vLLM when it is installed and a CUDA GPU is present, and says which it took. Judging, training and merging always
use the backend: vLLM only samples, and frees the GPU before the judge loads.

What stays the same as the generate path, so that the two samplers are interchangeable inside a run:
  - prompts are tokenised by OUR tokenizer and chat template (chat.chat_prompt_ids) and handed to vLLM as
    token ids, and responses are decoded by our tokenizer: vLLM's own tokenizer never shapes the data;
  - a response ends at (and includes) the first end-of-sequence token, like the generate path's cut;
  - every prompt has its own seed, derived from the chunk seed (sample.chunk_seed) and its place in the chunk, so a
    resumed stage redraws exactly the same samples.

Reads: the previous round's model folder (16-bit, or 4-bit in flight with bitsandbytes when load_in_4bit is set).
Writes nothing itself: sample.py writes the rows.
"""

from __future__ import annotations

import gc
import importlib.util

from selfie_lite.config import Sampler, choices
from selfie_lite.errors import UserError

SAMPLERS = choices(Sampler)


def vllm_available() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def get_sampler(choice: str, backend, cfg) -> tuple[object, str]:
    """(sampler, why). The sampler has the backend's load / generate / free for sampling; "generate" is the backend."""
    if choice not in SAMPLERS:
        raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}, got {choice!r}")
    if choice == "auto":
        if vllm_available():
            return VLLMSampler(cfg), "auto: vLLM and a CUDA GPU found"
        return backend, "auto: no vLLM with a CUDA GPU, using generate"
    if choice == "generate":
        return backend, "asked for"
    if importlib.util.find_spec("vllm") is None:
        raise UserError("--sampler vllm: vLLM is not installed", hint="pip install vllm on a CUDA machine, or use --sampler generate")
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        raise UserError("--sampler vllm needs a CUDA GPU", hint="use --sampler generate on this machine")
    return VLLMSampler(cfg), "asked for"


def per_prompt_seeds(seed: int, n: int) -> list[int]:
    """One seed per prompt of a chunk: fixed by the chunk seed and the prompt's place, so a resume redraws the same."""
    return [(seed * 1_000_003 + i * 7_919) % (2**31 - 1) for i in range(n)]


def cut_response(token_ids: list[int], eos_ids: set[int], finish_reason: str | None) -> list[int]:
    """Tokens up to and including the first end-of-sequence token (the generate path's cut).

    vLLM may or may not keep the stop token in token_ids; a response that stopped on it without showing it gets it
    back, so both samplers store responses that end the same way."""
    ids = list(token_ids)
    cut = next((j + 1 for j, t in enumerate(ids) if t in eos_ids), None)
    if cut is not None:
        return ids[:cut]
    if finish_reason == "stop" and eos_ids:
        return ids + [min(eos_ids)]
    return ids


def rows_from_outputs(prompts: list[str], prompt_ids: list[list[int]], outputs, tokenizer, eos_ids: set[int],
                      num_samples: int) -> tuple[list[dict], int]:
    """vLLM RequestOutputs (one per prompt, in order) -> Backend.generate's rows, and the number of new tokens."""
    rows, n_tokens = [], 0
    if len(outputs) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
    for prompt, p_ids, out in zip(prompts, prompt_ids, outputs, strict=True):
        completions = list(out.outputs)
        if len(completions) != num_samples:
            raise RuntimeError(f"vLLM returned {len(completions)} samples for a prompt, expected {num_samples}")
        resp_ids = [cut_response(c.token_ids, eos_ids, getattr(c, "finish_reason", None)) for c in completions]
        n_tokens += sum(len(r) for r in resp_ids)
        rows.append({
            "prompt": prompt,
            "prompt_ids": list(p_ids),
            "responses": [tokenizer.decode(r, skip_special_tokens=True) for r in resp_ids],
            "response_ids": resp_ids,
        })
    return rows, n_tokens


def model_eos_ids(model_dir, tokenizer) -> set[int]:
    """End-of-sequence ids as the generate path sees them: generation_config.json's, else the tokenizer's."""
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except (OSError, ValueError):
        pass
    if not ids and tokenizer.eos_token_id is not None:
        ids = {tokenizer.eos_token_id}
    return ids


def gpu_memory_fraction(budget_gb: float, total_bytes: int, cap: float = 0.85) -> float:
    """vLLM takes a FRACTION of the card up front (weights + KV cache): the share that stays inside budget_gb."""
    if total_bytes <= 0:
        return cap
    return max(0.1, min(cap, budget_gb * 1e9 / total_bytes))


class VLLMSampler:
    """load / generate / free with Backend's signatures, for sample.py; everything else stays with the backend."""

    name = "vllm"

    def __init__(self, cfg, memory_budget_gb: float = 20.0):
        self.cfg = cfg
        self.memory_budget_gb = memory_budget_gb

    def load(self, model_dir, *, trainable: bool = False):
        from vllm import LLM

        from selfie_lite.backends.hf import HFBackend
        from selfie_lite.model_files import check_model_source

        if trainable:
            raise UserError("the vLLM sampler only samples; training loads through the backend")
        check_model_source(model_dir)
        tok = HFBackend(self.cfg).load_tokenizer(model_dir)
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(self.cfg.train.precision, "auto")
        kwargs = dict(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype=dtype,
            seed=self.cfg.random_seed,
            trust_remote_code=self.cfg.trust_remote_code,
            max_model_len=self.cfg.train.max_prompt_length + self.cfg.sample.max_new_tokens,
            gpu_memory_utilization=gpu_memory_fraction(self.memory_budget_gb, total),
        )
        if self.cfg.load_in_4bit:
            kwargs["quantization"] = "bitsandbytes"
        llm = LLM(**kwargs)
        llm._selfie_eos_ids = model_eos_ids(model_dir, tok)  # the generate path cuts at the model's eos ids too
        return llm, tok

    def generate(self, llm, tokenizer, prompts, *, num_samples, temperature, top_p, max_new_tokens, batch_size,
                 seed, on_batch=None):
        from vllm import SamplingParams

        from selfie_lite.chat import chat_prompt_ids

        eos_ids = set(getattr(llm, "_selfie_eos_ids", None) or ())
        if not eos_ids and tokenizer.eos_token_id is not None:
            eos_ids = {tokenizer.eos_token_id}
        prompt_ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
        # Prompts longer than the context vLLM was sized for keep their END (the turn markers next to the response),
        # like train.py's prompt cut.
        limit = self.cfg.train.max_prompt_length
        prompt_ids = [p[-limit:] if len(p) > limit else p for p in prompt_ids]
        params = [
            SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=s)
            for s in per_prompt_seeds(seed, len(prompts))
        ]
        # One call for the whole chunk: vLLM batches by itself (batch_size is the generate path's knob).
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        rows, n_tokens = rows_from_outputs(prompts, prompt_ids, outputs, tokenizer, eos_ids, num_samples)
        if on_batch:
            on_batch(len(prompts), n_tokens)
        return rows

    def free(self, *objs):
        del objs
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # older/newer vLLM layouts: freeing is best effort, the judge reloads anyway
            pass
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
