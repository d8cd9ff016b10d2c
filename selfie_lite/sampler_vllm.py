"""Optional vLLM sampling for stage 1 (docs/method.md, "The loop"): the same rows as Backend.generate, faster.

`--sampler vllm` draws the K responses per prompt with vLLM (paged KV cache, continuous batching) instead of
transformers' generate; `--sampler generate` (the default) keeps the backend's own generate; `--sampler auto` takes
vLLM when it is installed and a CUDA GPU is present, and says which it took. Judging, training and merging always
use the backend: vLLM only samples.

vLLM runs in a child process of its own for the length of the sample stage (vllm_process.py), so that its GPU
memory is returned, whole, when the stage ends and before the judge loads. `sample.tensor_parallel_size = k` shards
the engine over k GPUs (vLLM's tensor parallelism). Under `accelerate launch` (distributed.py) every process, or
with k > 1 the first of every k processes, runs an engine on its own GPUs and samples its share of the chunks: data
parallelism over engines.

What stays the same as the generate path, so that the two samplers are interchangeable inside a run:
  - prompts are tokenised by OUR tokenizer and chat template (chat.chat_prompt_ids) and handed to vLLM as
    token ids, and responses are decoded by our tokenizer: vLLM's own tokenizer never shapes the data;
  - a response ends at (and includes) the first end-of-sequence token, like the generate path's cut;
  - every prompt has its own seed, derived from the chunk seed (sample.chunk_seed) and its place in the chunk, so a
    resumed stage redraws exactly the same samples, whichever process or engine draws the chunk.

Reads: the previous round's model folder (16-bit, or 4-bit in flight with bitsandbytes when load_in_4bit is set).
Writes nothing itself: sample.py writes the rows.
"""

from __future__ import annotations

import importlib.util
import os

from selfie_lite import distributed
from selfie_lite.config import Sampler, choices
from selfie_lite.errors import UserError

SAMPLERS = choices(Sampler)


def vllm_device() -> str | None:
    """The kind of device vLLM would run on here ("cuda", "cpu", ...), as vLLM itself detects it; None when vLLM is
    not installed or finds no device it supports."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        from vllm.platforms import current_platform

        return getattr(current_platform, "device_type", None) or None
    except Exception:  # noqa: BLE001  a vLLM that cannot even detect its platform cannot sample
        return None


def get_sampler(choice: str, backend, cfg) -> tuple[object, str]:
    """(sampler, why). The sampler has the backend's load / generate / free for sampling; "generate" is the backend."""
    if choice not in SAMPLERS:
        raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}, got {choice!r}")
    if choice == "generate":
        return backend, "asked for"
    installed = importlib.util.find_spec("vllm") is not None
    if choice == "auto":
        if installed and vllm_device() == "cuda":
            return VLLMSampler(cfg), "auto: vLLM and a CUDA GPU found"
        return backend, "auto: no vLLM with a CUDA GPU, using generate"
    if not installed:
        raise UserError("--sampler vllm: vLLM is not installed", hint="pip install vllm on a CUDA machine, or use --sampler generate")
    device = vllm_device()
    if device is None:
        raise UserError("--sampler vllm: vLLM finds no device it can run on here (no CUDA GPU, and not vLLM's CPU build)",
                        hint="use --sampler generate on this machine")
    return VLLMSampler(cfg), f"asked for, on {device}"


def engine_devices(tensor_parallel_size: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for this process's engine under a launcher: the GPUs of the processes it serves, this
    one's (LOCAL_RANK) and the next k - 1 (through the launcher's own CUDA_VISIBLE_DEVICES, where it set one). One
    process: None, and vLLM takes the first k GPUs the run sees."""
    if not distributed.active():
        return None
    local = int(os.environ.get("LOCAL_RANK", distributed.rank()))
    wanted = range(local, local + tensor_parallel_size)
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:  # the launcher left every GPU visible: process i's is GPU i
        return ",".join(str(i) for i in wanted)
    if wanted[-1] >= len(visible):
        raise UserError(f"= {tensor_parallel_size} needs GPUs {local}..{wanted[-1]} of CUDA_VISIBLE_DEVICES="
                        f"{','.join(visible)}, which has {len(visible)}", key="sample.tensor_parallel_size",
                        hint="make CUDA_VISIBLE_DEVICES list one GPU per process")
    return ",".join(visible[i] for i in wanted)


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
    """The engine's completions (per prompt, in order: per sample, (token ids, finish reason); vllm_process.serve)
    -> Backend.generate's rows, and the number of new tokens."""
    rows, n_tokens = [], 0
    if len(outputs) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
    for prompt, p_ids, completions in zip(prompts, prompt_ids, outputs, strict=True):
        if len(completions) != num_samples:
            raise RuntimeError(f"vLLM returned {len(completions)} samples for a prompt, expected {num_samples}")
        resp_ids = [cut_response(ids, eos_ids, finish) for ids, finish in completions]
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


def device_bytes() -> int:
    """The memory of this process's GPU (the engine's first GPU), 0 without CUDA (vLLM's CPU build). Asked here, in
    the run's process, which has CUDA up already, so that the engine's process touches CUDA only through vLLM."""
    try:
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def release_cached_gpu_memory() -> None:
    """Give the blocks torch's caching allocator keeps in this process (the previous stage's model, freed) back to the
    driver, so that the engine's process finds them free: vLLM refuses to start, or starts with a smaller KV cache,
    when another process holds memory it counted on."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


class VLLMSampler:
    """load / generate / free with Backend's signatures, for sample.py; everything else stays with the backend.
    load starts the engine in its child process, free stops it (and the process exits, returning its memory)."""

    name = "vllm"

    def release_memory(self) -> None:
        """Called on every process before the engines load (the processes that lend their GPU to another's engine
        too): vLLM sizes its KV cache from the memory free when it starts."""
        release_cached_gpu_memory()

    def __init__(self, cfg, memory_budget_gb: float = 20.0):
        self.cfg = cfg
        self.memory_budget_gb = memory_budget_gb
        tp = cfg.sample.tensor_parallel_size
        # Under a launcher an engine with k GPUs serves k processes: the first of them samples, the others wait.
        self.processes_per_engine = tp if distributed.active() else 1

    def load(self, model_dir, *, trainable: bool = False):
        from selfie_lite.backends.hf import HFBackend
        from selfie_lite.model_files import check_model_source
        from selfie_lite.vllm_process import EngineProcess

        if trainable:
            raise UserError("the vLLM sampler only samples; training loads through the backend")
        check_model_source(model_dir)
        tok = HFBackend(self.cfg).load_tokenizer(model_dir)
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(self.cfg.train.precision, "auto")
        kwargs = dict(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype=dtype,
            seed=self.cfg.random_seed,
            trust_remote_code=self.cfg.trust_remote_code,
            max_model_len=self.cfg.train.max_prompt_length + self.cfg.sample.max_new_tokens,
            tensor_parallel_size=self.cfg.sample.tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_fraction(self.memory_budget_gb, device_bytes()),
        )
        if self.cfg.load_in_4bit:
            kwargs["quantization"] = "bitsandbytes"
        engine = EngineProcess(kwargs, devices=engine_devices(self.cfg.sample.tensor_parallel_size))
        engine.eos_ids = model_eos_ids(model_dir, tok)  # the generate path cuts at the model's eos ids too
        return engine, tok

    def generate(self, engine, tokenizer, prompts, *, num_samples, temperature, top_p, max_new_tokens, batch_size,
                 seed, on_batch=None):
        from selfie_lite.chat import chat_prompt_ids

        eos_ids = set(getattr(engine, "eos_ids", None) or ())
        if not eos_ids and tokenizer.eos_token_id is not None:
            eos_ids = {tokenizer.eos_token_id}
        prompt_ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
        # Prompts longer than the context vLLM was sized for keep their END (the turn markers next to the response),
        # like train.py's prompt cut.
        limit = self.cfg.train.max_prompt_length
        prompt_ids = [p[-limit:] if len(p) > limit else p for p in prompt_ids]
        params = [dict(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=s)
                  for s in per_prompt_seeds(seed, len(prompts))]
        # One request for the whole chunk: vLLM batches by itself (batch_size is the generate path's knob).
        outputs = engine.generate(prompt_ids, params)
        rows, n_tokens = rows_from_outputs(prompts, prompt_ids, outputs, tokenizer, eos_ids, num_samples)
        if on_batch:
            on_batch(len(prompts), n_tokens)
        return rows

    def free(self, *objs):
        """Stop the engines among objs: their processes exit, and the GPU memory they held is free on return."""
        for obj in objs:
            if hasattr(obj, "close"):
                obj.close()
