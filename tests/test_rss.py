"""rss.trim: freed tensors' pages go back to the OS, so a stage's peak RSS is its own (rss.py)."""

import os
import subprocess
import sys

import pytest

from selfie_lite import rss

# In a fresh process (a test worker's allocator has a history: its arenas and glibc's moving mmap threshold decide
# where a 64 KB block comes from), with the mmap threshold fixed so that the blocks come from the heap.
SCRIPT = """
import re, torch
from selfie_lite import rss
def mb():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
xs = [torch.ones(16384) for _ in range(4000)]  # 4,000 x 64 KB: 256 MB
keep = xs[-1]  # the heap's top stays in use, so free() alone cannot shrink it
del xs
held = mb()
rss.trim()
print(held, mb())
"""


@pytest.mark.cpu_agnostic
def test_trim_returns_freed_tensor_memory_to_the_os():
    if not sys.platform.startswith("linux") or not rss.trim():
        pytest.skip("malloc_trim is glibc's (Linux)")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=env)
    held, after = map(int, out.stdout.split())
    assert held - after > 150, f"the freed 256 MB stayed resident: {held} MB before the trim, {after} MB after"
