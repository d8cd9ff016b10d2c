"""Numerics a run can rely on: the device and dtype a model runs in (one place for that choice), the same CPU
floats in every process, and a thread count that suits the model.

Why this exists (measured with benchmarks/numerics.py, docs/performance.md "Reproducible numerics"): torch's CPU
matrix products go through Intel MKL, whose kernels pick their blocking by thread count (and, for unaligned
inputs, by memory alignment). The same sampling pass on the same weights gave log-probs that differed in the fifth
significant digit with 1 thread and with 2, so a run resumed in a process with another thread count (a pytest
session that set 1 thread, a notebook, a busy machine) no longer reproduced its own judge labels bit for bit.
MKL's conditional numerical reproducibility mode (MKL_CBWR=AUTO,STRICT) makes the results independent of the
thread count and alignment; it cost nothing measurable on the tiny preset. MKL reads the variable once, at its
first call, so it is set when selfie_lite is imported, before torch runs anything; a process that used torch
before importing selfie_lite keeps whatever MKL chose then.

Threads: on a CPU a small model runs best on ONE torch thread. Two threads are slightly faster on an idle 2-core
machine and many times slower on a busy one (two OpenMP threads that wait for each other at every op), see
docs/performance.md "Threads". So `auto` means 1 thread for a model under SMALL_MODEL_BYTES on a CPU, else torch's
default. A GPU run leaves the CPU thread count alone.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

MKL_CBWR = "AUTO,STRICT"
SMALL_MODEL_BYTES = 400 * 2**20  # about 100M fp32 parameters: below this, one thread wins on a shared CPU


def pick_device() -> str:
    """Where models run: the first CUDA GPU if torch sees one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(precision: str, device: str, gpu_fallback: str = "fp32"):
    """train.precision -> torch dtype. "auto": bf16 on a GPU that has it, else gpu_fallback on a GPU (fp32 for
    transformers; Unsloth computes in 16 bits, so fp16 there), and fp32 on a CPU."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision == "auto":
        if device != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else dtypes[gpu_fallback]
    return dtypes[precision]


def pin_mkl_reproducibility() -> None:
    """Ask MKL for thread-count- and alignment-independent results, unless the user chose a mode already."""
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)


def weights_bytes(model_dir) -> int | None:
    """Size of a local model folder's weights; None for a hub id (not on disk yet)."""
    path = Path(str(model_dir)).expanduser()
    if not path.is_dir():
        return None
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def auto_threads(model_dir, device: str) -> int | None:
    """The torch thread count for this model on this device; None = leave torch's default."""
    if device != "cpu":
        return None
    size = weights_bytes(model_dir)
    return 1 if size is not None and size < SMALL_MODEL_BYTES else None


def resolve_threads(setting: int, model_dir, device: str) -> int | None:
    """setting 0 = auto; a positive number is taken as given."""
    return setting if setting > 0 else auto_threads(model_dir, device)


@contextmanager
def torch_threads(n: int | None):
    """Run the block on n torch threads (None: unchanged) and restore the caller's count afterwards, so a notebook
    or a test session that calls the API keeps its own setting."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
