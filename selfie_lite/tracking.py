"""`--report-to tensorboard|wandb|none`: experiment tracking.

Training steps (loss, margins, smoothing, learning rate) are logged by transformers' own integrations, switched on
through DPOConfig's `report_to` (train.py). This module adds what the Trainer does not see: each finished round's
metrics (sample, judge, guard, train and merge figures, the same numbers as the round table), as `round/<stage>/<key>`
at step = round index.

tensorboard: event files under RUN/tensorboard/rounds (the Trainer's under RUN/round-<i>/trainer/runs):
`tensorboard --logdir RUN`. wandb: one W&B run per run folder (project $WANDB_PROJECT, default selfie-lite), resumed
by `--resume`; the Trainer's step logs join it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import typing
from pathlib import Path
from typing import Literal

from selfie_lite.errors import UserError

ReportTo = Literal["none", "tensorboard", "wandb"]  # `run --report-to`
KINDS = typing.get_args(ReportTo)
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_available(kind: str) -> None:
    """Before anything is written: the tracker's package must be installed."""
    if kind not in KINDS:
        raise UserError(f"--report-to {kind!r}: expected one of {', '.join(KINDS)}")
    pkg = _PACKAGE.get(kind)
    if pkg and importlib.util.find_spec(pkg) is None:
        raise UserError(f"--report-to {kind} needs the {pkg} package, which is not installed",
                        hint=f"pip install {pkg}  (or pip install 'selfie-lite[track]')")


def flat_metrics(metrics: dict) -> dict[str, float]:
    """round/<stage>/<key> -> value for every finite number in a round's metrics (lists and text left out)."""
    out = {}
    for stage, values in metrics.items():
        if not isinstance(values, dict):
            continue
        for k, v in values.items():
            if isinstance(v, bool):
                v = float(v)
            if isinstance(v, (int, float)) and math.isfinite(v) and k != "config_rev":
                out[f"round/{stage}/{k}"] = float(v)
    return out


class Tracker:
    def __init__(self, kind: str, run_dir: Path, config: dict | None = None):
        check_available(kind)
        self.kind = kind
        self.report_to = kind  # what train.py hands to DPOConfig(report_to=...)
        self.run_dir = Path(run_dir)
        self._writer = None
        self._wandb = None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard" / "rounds"))
        elif kind == "wandb":
            import wandb

            # The same W&B run on every --resume of this folder.
            run_id = "selfie-" + hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:12]
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "selfie-lite"), name=self.run_dir.name,
                                     id=run_id, resume="allow", dir=str(self.run_dir), config=config or {})
            self._wandb.define_metric("round/index")
            self._wandb.define_metric("round/*", step_metric="round/index")

    def log_round(self, round_idx: int, metrics: dict) -> None:
        values = flat_metrics(metrics)
        if self._writer is not None:
            for tag, v in values.items():
                self._writer.add_scalar(tag, v, global_step=round_idx)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log({"round/index": round_idx, **values})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
