"""smoothing.py: the round's smoothing chosen once from the settings, and what each smoother decides for a hand-made
batch of margins (no model: the trainer's use of it is pinned in test_train.py and test_robust.py)."""

import pytest
import torch

from selfie_lite.config import RefineConfig, RunConfig
from selfie_lite.smoothing import Consistency, LowConfidence, NoSmoothing, smoother_for, smoothing_of

PAIRS = [{"pair_id": i} for i in range(4)]


def test_the_choice_follows_the_round_and_the_settings():
    cfg = RunConfig()
    assert isinstance(smoother_for(cfg, 0, PAIRS), NoSmoothing)  # the seed round: plain DPO
    paper = smoother_for(cfg, 2, PAIRS)
    assert isinstance(paper, LowConfidence) and paper.lam == cfg.refine.lambdas[1] and paper.name == "low-confidence"
    off = RunConfig(refine=RefineConfig(alpha=0.0))
    assert isinstance(smoother_for(off, 1, PAIRS), NoSmoothing)
    given = [dict(p, smoothing=0.25) for p in PAIRS[:3]] + [{"pair_id": -1, "gold": True}]
    cream = smoother_for(cfg, 2, given)
    assert isinstance(cream, Consistency) and cream.smoothing == {0: 0.25, 1: 0.25, 2: 0.25, -1: 0.0}
    gold = smoothing_of(cfg.refine, 0.5, [*PAIRS, {"pair_id": -3, "gold": True}])
    assert gold.gold_ids == frozenset({-3})


def test_no_smoothing_counts_only_after_a_rounds_warmup():
    z = torch.tensor([-1.0, 0.5, 2.0])
    s = NoSmoothing()([0, 1, 2], z, step=9, total=10)
    assert s.a.tolist() == [0.0] * 3 and not s.low_confidence.any() and s.alpha == 0.0 and not s.counted
    assert NoSmoothing(warmup_frac=0.2)([0, 1, 2], z, step=2, total=10).counted
    assert not NoSmoothing(warmup_frac=0.2)([0, 1, 2], z, step=1, total=10).counted


def test_the_papers_picker_smooths_the_lowest_margins_after_the_warmup():
    refine = RefineConfig(alpha=0.1, low_conf_frac=0.25, warmup_frac=0.5, window_pairs=8)
    smoother = LowConfidence(refine, lam=0.5, gold_ids=frozenset({3}))
    z = torch.tensor([-2.0, 1.0, 0.5, -5.0])  # pair 3 (a replayed human pair) has the lowest margin
    early = smoother([0, 1, 2, 3], z, step=1, total=10)
    assert early.low_confidence.tolist() == [True, False, False, False]  # picked, never the human pair
    assert early.a.tolist() == [0.0] * 4 and not early.counted  # but no smoothing during the warm-up
    late = smoother([0, 1, 2, 3], z, step=5, total=10)
    assert late.a.tolist() == pytest.approx([0.1, 0.0, 0.0, 0.0]) and late.alpha == 0.1 and late.counted
    assert list(smoother.picker.values) == [-2.0, 1.0, 0.5] * 2  # the human pair stays out of the window


def test_consistency_gives_each_pair_its_own_a():
    s = Consistency({0: 0.5, 1: 0.0, 2: 0.2})([0, 1, 2, 7], torch.tensor([0.1, 0.2, 0.3, 0.4]), step=0, total=10)
    assert s.a.tolist() == pytest.approx([0.5, 0.0, 0.2, 0.0])  # 7: no value given (a replayed pair): 0
    assert s.low_confidence.tolist() == [True, False, True, False] and s.alpha == 0.5 and s.counted
