"""Peak resident memory (RSS) of this process per stage, recorded in each stage's done/<stage>.json as peak_rss_mb.

Linux keeps a process's peak RSS (VmHWM in /proc/self/status) and lets the process reset it (writing 5 to
/proc/self/clear_refs, Linux >= 4.0), so each stage's own peak can be read without a sampling thread. Elsewhere
(macOS, Windows, a /proc that refuses the write) the figure is None: a missing number, never a wrong one.
"""

from __future__ import annotations

import re

_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.M)


def reset_peak() -> bool:
    """Start a new peak from the current RSS. False where the platform cannot."""
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
