"""vLLM in a child process of its own, for the sample stage (sampler_vllm.py): started when sampling starts, stopped
when it ends, so that every byte of GPU memory vLLM took (weights, KV cache, CUDA graphs, its tensor-parallel
workers) goes back to the driver when the process exits, before the judge and the trainer load. vLLM's own clean-up
inside a process (destroy_model_parallel, empty_cache) is best effort and leaves memory behind; a process exit is
not. This is the one place where selfie-lite starts a process itself: accelerate and torchrun start the training
processes, vLLM starts its own workers; a Python multiprocessing child (spawn: a fresh interpreter, no CUDA state
copied from the parent) is the plain way to give an engine a life of its own.

The parent (EngineProcess) and the child (serve) talk over a pipe:
    parent -> child: ("generate", prompt token ids, sampling params as dicts) | ("stop",)
    child -> parent: ("ready", None) once the engine is up | ("ok", completions) | ("error", "Type: first line")
where completions holds, per prompt, per sample, (token ids, finish reason): plain lists, so nothing of vLLM's
crosses the pipe. The child ignores Ctrl-C (the parent decides when to stop, at a finished chunk) and exits by
itself when the parent is gone (a kill -9 of the run), so an engine never outlives its run holding a GPU.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import threading
import time
import weakref
from contextlib import contextmanager

from selfie_lite.errors import RunError

_LIVE: weakref.WeakSet = weakref.WeakSet()  # engines to stop if the run exits without freeing them


def serve(conn, llm_kwargs: dict, parent_pid: int) -> None:
    """The child's whole life: start the engine, answer generate requests until told to stop or the parent is gone.
    Nothing here touches CUDA before vLLM does (vLLM then starts its tensor-parallel workers as it prefers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(**llm_kwargs)
    except BaseException as e:  # noqa: BLE001  told to the parent, which prints it as one line
        _send(conn, ("error", _describe(e)))
        return
    _send(conn, ("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed its end
        if message[0] == "stop":
            del llm  # vLLM's own shutdown (its engine-core and worker processes) before the interpreter exits
            return
        _, prompt_ids, params = message
        try:
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids],
                                   [SamplingParams(**p) for p in params], use_tqdm=False)
            completions = [[(list(c.token_ids), getattr(c, "finish_reason", None)) for c in out.outputs]
                           for out in outputs]
        except BaseException as e:  # noqa: BLE001
            _send(conn, ("error", _describe(e)))
            continue
        _send(conn, ("ok", completions))


def _send(conn, message) -> None:
    try:
        conn.send(message)
    except (BrokenPipeError, OSError):
        os._exit(0)  # the parent is gone: nobody to answer


def _exit_with_parent(parent_pid: int) -> None:
    """The child's watchdog: a parent killed with -9 cannot stop its engine, so the engine stops itself."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _describe(e: BaseException) -> str:
    from selfie_lite.errors import describe

    return describe(e)


@contextmanager
def _env(**values: str | None):
    """os.environ with `values` set while a child starts (a spawned child copies the environment at start)."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class EngineProcess:
    """The parent's handle on one engine in its child process: start (returns once the engine is up), generate,
    close. Every failure of the child reaches the caller as one RunError line."""

    def __init__(self, llm_kwargs: dict, devices: str | None = None, start_timeout_s: float | None = None):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=serve, name="selfie-lite-vllm", daemon=False,  # vLLM starts workers: not a daemon
                                args=(child_conn, llm_kwargs, os.getpid()))
        with _env(CUDA_VISIBLE_DEVICES=devices):
            self.proc.start()
        child_conn.close()
        self.busy = False  # a request sent and not answered yet: the engine cannot read a "stop" until it is done
        _LIVE.add(self)
        where = f" on GPU {devices}" if devices else ""
        self._reply(f"vLLM could not start in its sampling process{where}", start_timeout_s)

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def generate(self, prompt_ids: list[list[int]], params: list[dict]) -> list[list[tuple[list[int], str | None]]]:
        """Per prompt, per sample: (token ids, finish reason). params: one SamplingParams' keyword dict per prompt."""
        try:
            self.conn.send(("generate", prompt_ids, params))
        except (BrokenPipeError, OSError):
            self._died()
        self.busy = True
        result = self._reply("vLLM failed in its sampling process")
        self.busy = False
        return result

    def _reply(self, failed: str, timeout_s: float | None = None):
        start = time.monotonic()
        while not self.conn.poll(0.5):
            if not self.proc.is_alive():
                self._died()
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                self.close()
                raise RunError(f"{failed}: no answer in {timeout_s:.0f} s")
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            self._died()
        if kind == "error":
            self.close()
            raise RunError(f"{failed}: {payload}",
                           hint="out of GPU memory: lower sample.max_new_tokens or train.max_prompt_length, or free "
                                "the GPU" if "memory" in payload.lower() else None)
        return payload

    def _died(self):
        self.proc.join(5)
        code = self.proc.exitcode
        self.close()
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise RunError(f"the vLLM sampling process died ({how}) before it answered",
                       hint="the system may have run out of memory (see dmesg); resume the run: finished chunks are kept")

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the engine and wait for its process to exit (its GPU memory is then free); kill it if it hangs. An
        engine in the middle of a request (the run was interrupted: Ctrl-C, an error elsewhere) is terminated at
        once: its answer would be thrown away."""
        if self.proc.is_alive() and not self.busy:
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.conn.close()
        _LIVE.discard(self)


@atexit.register
def _close_all() -> None:
    """A run that stops with an engine still up (an error between start and close) stops it here, before
    multiprocessing's own exit hook would wait forever for a child that waits for a request."""
    for engine in list(_LIVE):
        engine.close(timeout_s=10)
