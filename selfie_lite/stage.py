"""What every stage of a round is handed, and the progress reporter that reports nothing.

Every stage of a round (sample.py, judge.py, guard.py, robust.py's consistency and reference passes, train.py,
merge.py) has the same shape, as torchtune's recipes build their components from one config:

    def <name>_stage(r: Round) -> dict        # the stage's metrics, which the loop writes to done/<name>.json

A stage reads its inputs from the run folder (the previous stages' outputs), writes its outputs atomically into
round-<i>/, and returns its metrics; the loop (loop.py) only orders the stages and skips finished ones (those whose
done-marker reads and whose declared outputs, loop.STAGE_OUTPUTS, are there and whole).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfie_lite.config import RunConfig


class NullProgress:
    """The progress reporter for code run without a display (tests, notebooks, benchmarks): same methods as
    progress.Reporter, does nothing, so stages never check `if progress`."""

    def start(self, name: str, total: int, done: int = 0, unit: str = "") -> int:
        return 0

    def advance(self, task: int, n: int = 1, tokens: int | None = None, **fields) -> None:
        pass

    def set_total(self, task: int, total: int) -> None:
        pass

    def finish(self, task: int) -> None:
        pass


NULL_PROGRESS = NullProgress()


@dataclass
class Round:
    """Round i of a run: the settings, where it lives, which models it starts from, and the tools it runs with."""

    cfg: RunConfig
    run_dir: Path
    index: int  # i: 0 = the seed DPO, 1..T = the self-labelled rounds
    backend: Any  # backends.base.Backend
    init_dir: Path  # pi_init, the SFT model
    gold: Callable[[str, str], float] | None = None  # an oracle scorer where one exists (the tiny preset)
    progress: Any = field(default=NULL_PROGRESS)

    @property
    def dir(self) -> Path:
        return self.run_dir / f"round-{self.index}"

    def model(self, i: int) -> Path:
        """pi_i's folder (round-<i>/model); i = -1 is pi_init."""
        return self.init_dir if i < 0 else self.run_dir / f"round-{i}" / "model"

    @property
    def prev_dir(self) -> Path:
        """pi_{i-1}: the model this round samples from, judges with and trains on (pi_init for the seed round)."""
        return self.model(self.index - 1)
