"""A stand-in for vLLM in the tests (these machines have no GPU and no vLLM): the surface selfie_lite.vllm_process
uses (LLM(...), SamplingParams, LLM.generate over token-id prompts) and nothing more. Each prompt's samples come
from its own seed alone, as vLLM's per-request seeds do, so a chunk's samples do not depend on the engine or process
that drew them. Every engine logs where it ran (process, GPUs, tensor-parallel size) to $FAKE_VLLM_LOG, and
$FAKE_VLLM_FAIL makes it fail: "load" (an out-of-memory error at start), "die" (killed by the kernel mid-request),
"hang" (a request that takes ten minutes).
Like vLLM's, the engine's work happens in a process of its own (here a stand-in that only waits), stopped by
llm.llm_engine.engine_core.shutdown(); the log gives its pid ("core_pid") and the launcher variables the engine saw. Put tests/fake_vllm on PYTHONPATH (or sys.path) to use it."""

import json
import os
import random
import signal
import subprocess
import sys
import time


class SamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, max_tokens=16, seed=None):
        self.n, self.temperature, self.top_p, self.max_tokens, self.seed = n, temperature, top_p, max_tokens, seed


class _Completion:
    def __init__(self, token_ids, finish_reason):
        self.token_ids, self.finish_reason = token_ids, finish_reason


class _RequestOutput:
    def __init__(self, outputs):
        self.outputs = outputs


# The engine core's stand-in: waits until it is stopped (it gives up by itself after 5 minutes, so that a test that
# fails leaves nothing running for long). It does not watch its parent: the tests check that selfie-lite stops it.
CORE = "import time\ntime.sleep(300)\n"


class _EngineCore:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", CORE])

    def shutdown(self):
        self.proc.kill()
        self.proc.wait()


class _LLMEngine:
    def __init__(self):
        self.engine_core = _EngineCore()


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ").strip()
    except OSError:
        return None


def _log(event, **fields):
    path = os.environ.get("FAKE_VLLM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "pid": os.getpid(), "ppid": os.getppid(), **fields}) + "\n")


class LLM:
    def __init__(self, model, tokenizer=None, dtype="auto", seed=0, trust_remote_code=False, max_model_len=None,
                 gpu_memory_utilization=0.9, tensor_parallel_size=1, quantization=None):
        if os.environ.get("FAKE_VLLM_FAIL") == "load":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(the rest of a long message)")
        with open(os.path.join(model, "config.json")) as f:
            config = json.load(f)
        self.vocab_size = config["vocab_size"]
        eos = config.get("eos_token_id")
        self.eos = eos[0] if isinstance(eos, list) else eos
        self.llm_engine = _LLMEngine()
        _log("load", model=model, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
             gpu_memory_utilization=gpu_memory_utilization, core_pid=self.llm_engine.engine_core.proc.pid,
             cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), parent_cmdline=_cmdline(os.getppid()),
             launcher={k: v for k, v in os.environ.items()
                       if k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT") or k.startswith("TORCHELASTIC_")})

    def generate(self, prompts, params, use_tqdm=True):
        if os.environ.get("FAKE_VLLM_FAIL") == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("FAKE_VLLM_FAIL") == "hang":
            time.sleep(600)
        outputs = []
        for prompt, p in zip(prompts, params, strict=True):
            assert isinstance(prompt["prompt_token_ids"], list)
            rng = random.Random(p.seed)
            completions = []
            for _ in range(p.n):
                length = rng.randint(1, p.max_tokens)
                ids = [rng.randrange(3, self.vocab_size) for _ in range(length)]
                stop = self.eos is not None and length < p.max_tokens and rng.random() < 0.5
                completions.append(_Completion(ids + [self.eos] if stop else ids, "stop" if stop else "length"))
            outputs.append(_RequestOutput(completions))
        _log("generate", prompts=len(prompts))
        return outputs
