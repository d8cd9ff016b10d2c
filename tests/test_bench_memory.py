"""benchmarks/memory.py: the measurement itself, and a small end-to-end run whose numbers must show the change.

The full table (32K and 152K vocabularies, 512 and 1024 tokens) is in docs/performance.md; here one small column
is enough to see that the chunked loss and judge need a fraction of the memory.
"""

from pathlib import Path

import pytest

from benchmarks import memory as bench


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_peak_extra_bytes_sees_a_torch_allocation():
    import torch

    # 64 MB of fp32 made and freed inside the measured operation; the measure must see it (tracemalloc would not).
    extra = bench.peak_extra_bytes(lambda: torch.ones(16 * 2**20).sum(), lambda: torch.ones(16).sum())
    assert 60 * 2**20 < extra < 120 * 2**20


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_small_column_shows_the_change():
    """One small column, in this process (the benchmark runs each in a fresh one; here that would cost 10 s of
    imports): logits [2, 127, 32000] fp32 are 32 MB; the old loss held about four of them, the chunked one one
    block of [128 response positions, 32000] (16 MB)."""
    spec = {"pairs": 1, "judge_batch": 2, "hidden": 64, "layers": 1, "threads": 1, "vocab": 32000, "seq_len": 128,
            "rows": ["loss only", "train lam>0", "judge"]}
    cell = {path: bench.run_cell({**spec, "path": path}) for path in ("before", "after")}
    for row in spec["rows"]:
        before, after = cell["before"][row]["bytes"], cell["after"][row]["bytes"]
        assert after * 2 < before, (row, before, after)
    assert cell["before"]["loss only"]["bytes"] > 3 * 32 * 2**20
    assert cell["after"]["loss only"]["bytes"] < 24 * 2**20
    printed = bench.table({(32000, 128): cell}, spec)
    assert "| 32,000 | 128 | loss only |" in printed and "Goal for the loss" in printed


def test_unknown_row_is_refused():
    with pytest.raises(SystemExit, match="unknown --rows"):
        bench.main(["--rows", "loss only,nonsense"])

