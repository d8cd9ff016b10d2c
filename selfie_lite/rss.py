"""Peak resident memory (RSS) of this process per stage, recorded in each stage's done/<stage>.json as peak_rss_mb.

Linux keeps a process's peak RSS (VmHWM in /proc/self/status) and lets the process reset it (writing 5 to
/proc/self/clear_refs, Linux >= 4.0), so each stage's own peak can be read without a sampling thread. Elsewhere
(macOS, Windows, a /proc that refuses the write) the figure is None: a missing number, never a wrong one.
"""

from __future__ import annotations

import re

_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.M)


def trim() -> bool:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim). False where there is no glibc.

    Why: glibc keeps memory that tensors freed (its mmap threshold grows after large frees, so later tensors come
    from the heap), so without a trim a process that trained once holds its peak for the rest of the run: on
    SmolLM2, sampling after the seed DPO sat at 5.3 GB resident (docs/performance.md). No effect on any value."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018  (musl and others lack it: AttributeError)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True


_libc = None


def reset_peak() -> bool:
    """Start a new peak from the current RSS, after trimming the heap (so the peak is the stage's own, not what
    the allocator kept from earlier stages). False where the platform cannot."""
    trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float | None:
    """Peak RSS since the last reset_peak (or since the process started), in MB; None where unknown."""
    try:
        with open("/proc/self/status") as f:
            m = _HWM.search(f.read())
    except OSError:
        return None
    return round(int(m.group(1)) / 1024, 1) if m else None
