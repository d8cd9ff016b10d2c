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
import multiprocessing.util  # noqa: F401  its exit hook registered before ours, so ours (below) runs first
import os
import signal
import threading
import time
from contextlib import contextmanager

from selfie_lite.errors import RunError, describe

_LIVE: set = set()  # engines to stop if the run exits without freeing them

# torchrun's and accelerate launch's per-process variables: the engine is not a process of the run's process group,
# and vLLM's workers, seeing them, would join a rendezvous nobody serves (and wait there until it times out).
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def serve(conn, llm_kwargs: dict, parent_pid: int) -> None:
    """The child's whole life: start the engine, answer generate requests until told to stop or the parent is gone.
    Nothing here touches CUDA before vLLM does (vLLM then starts its tensor-parallel workers as it prefers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(**llm_kwargs)
    except BaseException as e:  # noqa: BLE001  told to the parent, which prints it as one line
        kill_descendants(os.getpid())  # whatever vLLM started before it failed
        _send(conn, ("error", describe(e)))
        return
    try:
        _send(conn, ("ready", None))
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the parent closed its end (or is gone)
            if message[0] == "stop":
                return
            _, prompt_ids, params = message
            try:
                outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids],
                                       [SamplingParams(**p) for p in params], use_tqdm=False)
                completions = [[(list(c.token_ids), getattr(c, "finish_reason", None)) for c in out.outputs]
                               for out in outputs]
            except BaseException as e:  # noqa: BLE001
                _send(conn, ("error", describe(e)))
                continue
            _send(conn, ("ok", completions))
    finally:
        _shutdown(llm)


def _shutdown(llm) -> None:
    """vLLM's own shutdown: its engine-core and worker processes (where the weights and the KV cache live) stop now,
    not whenever the interpreter's exit gets to them; whatever is left is killed."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001  a vLLM without that layout: its processes are killed below
        pass
    del llm
    kill_descendants(os.getpid())


def _descendants(pid: int) -> list:
    import psutil  # accelerate's dependency

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def kill_descendants(pid: int, known: list = ()) -> None:
    """SIGKILL every process below pid, and the `known` ones (psutil.Process objects: a pid reused since is left
    alone), vLLM's engine-core and worker processes: an engine that is stopped the hard way (terminated
    mid-request, killed by the system, its run killed) must not leave them holding the GPU."""
    import psutil

    procs = list({p.pid: p for p in (*known, *_descendants(pid))}.values())
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    # Until each is gone or a zombie (its memory is freed then; only its parent can reap it, which may be busy).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(p) for p in procs):
        time.sleep(0.05)


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _send(conn, message) -> None:
    try:
        conn.send(message)
    except (BrokenPipeError, OSError):
        kill_descendants(os.getpid())
        os._exit(0)  # the parent is gone: nobody to answer


def _exit_with_parent(parent_pid: int) -> None:
    """The child's watchdog: a parent killed with -9 cannot stop its engine, so the engine stops itself."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            kill_descendants(os.getpid())
            os._exit(1)


@contextmanager
def _env(values: dict[str, str | None], unset: tuple[str, ...] = ()):
    """os.environ with `values` set (None: left as it is) and `unset` removed while a child starts (a spawned child
    copies the environment at start)."""
    old = {k: os.environ.get(k) for k in (*values, *unset)}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        for k in unset:
            os.environ.pop(k, None)
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
        unset = LAUNCHER_VARIABLES + tuple(k for k in os.environ if k.startswith("TORCHELASTIC_"))
        with _env({"CUDA_VISIBLE_DEVICES": devices}, unset):
            self.proc.start()
        child_conn.close()
        self.busy = True  # starting, or a request sent and not answered yet: it cannot read a "stop" until it is done
        _LIVE.add(self)
        self.family: list = []  # the engine's own processes, as they stood once it was up
        where = f" on GPU {devices}" if devices else ""
        try:
            self._reply(f"vLLM could not start in its sampling process{where}", start_timeout_s)
        except BaseException:  # Ctrl-C while the engine loads, too: never leave it running
            self.close()
            raise
        # Remembered so that they can be stopped even if the engine's process dies first (they are then orphans).
        self.family = _descendants(self.proc.pid)

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
        return self._reply("vLLM failed in its sampling process")

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
        self.busy = False  # answered: the engine reads the next message, a "stop" included
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
        # vLLM's own processes: left behind by an engine that is terminated, killed or dead, and stopped with it.
        kill_descendants(self.proc.pid, self.family)
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
