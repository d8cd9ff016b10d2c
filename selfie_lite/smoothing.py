"""Who is smoothed, and by how much: the per-pair label smoothing a of the loss (docs/method.md (E5)).

One interface, three implementations, chosen once per round from the config (`smoother_for`):
  - NoSmoothing: a = 0 for every pair (round 0, refine.alpha = 0);
  - LowConfidence: the paper's picker (E6-E8): pairs whose margin (the extrapolated one, z_g, when lam > 0) is in
    the bottom refine.low_conf_frac of a window of recent per-pair values get alpha, after the warm-up;
  - Consistency: CREAM (E9): each pair's a, fixed before training from two judges' agreement (robust.py).
The trainer (trainer.py) calls the round's smoother once per micro-batch and hands its `a` to loss.dpo_losses. A new
counter-measure on the loss side is one more class here, its config key, its line in `smoother_for`, docs/method.md
and a test; the trainer does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from selfie_lite.config import RefineConfig, RunConfig
from selfie_lite.refine import LowConfidencePicker, alpha_at


@dataclass
class Smoothing:
    """What a smoother decided for one micro-batch of B pairs."""

    a: torch.Tensor  # [B] each pair's smoothing strength in [0, 0.5], the loss's a
    low_confidence: torch.Tensor  # [B] bool: the pairs this smoother singled out
    alpha: float  # the strength in force at this step (logged)
    counted: bool  # past the warm-up: the batch counts towards the round's frac_smoothed


class Smoother(Protocol):
    name: str  # the round's metrics call it so ("none", "low-confidence", "consistency")
    lam: float  # > 0: the trainer computes the extrapolated margin z_g (E7) and passes it as `margins`
    vocab_chunk: int  # vocabulary entries per block of that extrapolation

    def __call__(self, pair_ids: list[int], margins: torch.Tensor, step: int, total: int) -> Smoothing:
        """pair_ids [B], margins [B] (detached; z_g when lam > 0, else z), the optimizer step of `total`."""
        ...


@dataclass
class NoSmoothing:
    """a = 0 for every pair: plain sigmoid DPO. warmup_frac (a self-labelled round's refine.warmup_frac) only decides
    from which step a batch counts towards frac_smoothed; None (round 0): never."""

    warmup_frac: float | None = None
    name: str = "none"
    lam: float = 0.0
    vocab_chunk: int = 8192

    def __call__(self, pair_ids, margins, step, total):
        counted = self.warmup_frac is not None and step >= self.warmup_frac * total
        return Smoothing(torch.zeros_like(margins), torch.zeros_like(margins, dtype=torch.bool), 0.0, counted)


class LowConfidence:
    """The paper's smoothing (E6-E8): alpha for the pairs in the bottom low_conf_frac of the last window_pairs margins,
    0 during the first warmup_frac of the steps. Replayed human pairs (gold_ids, robust.gold_replay) are never picked
    and stay out of the window. The picker runs from step 0, so its window is full when the warm-up ends."""

    name = "low-confidence"

    def __init__(self, refine: RefineConfig, lam: float, gold_ids: frozenset[int] = frozenset()):
        self.refine, self.lam, self.vocab_chunk, self.alpha = refine, lam, refine.vocab_chunk, refine.alpha
        self.gold_ids = frozenset(gold_ids)
        self.picker = LowConfidencePicker(refine.low_conf_frac, refine.window_pairs)

    def __call__(self, pair_ids, margins, step, total):
        gold = torch.tensor([i in self.gold_ids for i in pair_ids], dtype=torch.bool) if self.gold_ids else None
        low_conf = self.picker.pick(margins, skip=gold).to(margins.device)  # [B] bool
        alpha = alpha_at(step, total, self.refine.alpha, self.refine.warmup_frac)  # (E8)
        return Smoothing(low_conf.to(margins.dtype) * alpha, low_conf, alpha, step >= self.refine.warmup_frac * total)


class Consistency:
    """CREAM (E9): each pair's own a, given before training (robust.consistency_smoothing); pairs without one (the
    replayed human pairs) get 0. No picker, no warm-up."""

    name = "consistency"
    lam = 0.0
    vocab_chunk = 8192

    def __init__(self, smoothing: dict[int, float]):
        self.smoothing = smoothing
        self.alpha = max(smoothing.values(), default=0.0)  # the largest a given (logged as the round's alpha)

    def __call__(self, pair_ids, margins, step, total):
        given = [self.smoothing.get(i, 0.0) for i in pair_ids]
        low_conf = torch.tensor([a > 0 for a in given], dtype=torch.bool, device=margins.device)
        a = torch.tensor(given, dtype=margins.dtype, device=margins.device)
        return Smoothing(a, low_conf, max(given, default=0.0), True)


def smoother_for(cfg: RunConfig, round_index: int, pairs: list[dict]) -> Smoother:
    """Round i's smoothing, chosen once from the settings (train.train_stage): none in the seed round (0), else
    smoothing_of the round's refine settings and lambda. A new loss-side counter-measure adds its branch here."""
    from selfie_lite.robust import round_lambda

    if round_index == 0:
        return NoSmoothing()
    return smoothing_of(cfg.refine, round_lambda(cfg.refine.lambdas, round_index), pairs)


def smoothing_of(refine: RefineConfig | None, lam: float, pairs: list[dict]) -> Smoother:
    """refine None: no smoothing. Pairs that carry a "smoothing" field (robust.training_pairs adds it where the
    consistency stage ran): Consistency. Else the paper's picker when refine.alpha > 0, and none when it is 0."""
    if any("smoothing" in p for p in pairs):
        return Consistency({int(p["pair_id"]): float(p.get("smoothing", 0.0)) for p in pairs})
    if refine is None:
        return NoSmoothing()
    if refine.alpha > 0:
        return LowConfidence(refine, lam, frozenset(int(p["pair_id"]) for p in pairs if p.get("gold")))
    return NoSmoothing(refine.warmup_frac)
