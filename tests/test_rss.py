"""rss.trim: freed tensors' pages go back to the OS, so a stage's peak RSS is its own (rss.py)."""

import re
import sys

import pytest
import torch

from selfie_lite import rss


def _rss_mb() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) // 1024


@pytest.mark.cpu_agnostic
def test_trim_returns_freed_tensor_memory_to_the_os():
    if not sys.platform.startswith("linux") or not rss.trim():
        pytest.skip("malloc_trim is glibc's (Linux)")
    xs = [torch.ones(16384) for _ in range(4000)]  # 4,000 x 64 KB from the heap: 256 MB
    keep = xs[-1]  # the heap's top stays in use, so free() alone cannot shrink it
    del xs
    held = _rss_mb()
    assert rss.trim()
    assert held - _rss_mb() > 150, "the freed 256 MB stayed resident"
    del keep
