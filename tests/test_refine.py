"""refine.py: extrapolated margin worked by hand, the low-confidence picker and the smoothing warm-up."""

import math

import pytest
import torch

from selfie_lite.loss import LastHidden
from selfie_lite.refine import (
    LowConfidencePicker,
    alpha_at,
    extrapolated_logps,
    extrapolated_margin,
    sequence_logps,
)


def _hand_batch():
    """One pair, vocabulary of 3, one response token per row plus one padded (masked) position.

    Rows: [chosen, rejected]. Already shifted: logits[:, t] predicts labels[:, t].
      chosen:   h_theta = [2, 0, 0], h_ref = [1, 0, 0], label 0
      rejected: h_theta = [0, 0, 0], h_ref = [0, 0, 0], label 1
    The second position is padding (label -100, mask 0) with junk logits that must be ignored.
    """
    junk = [50.0, -50.0, 7.0]
    policy = torch.tensor([[[2.0, 0.0, 0.0], junk], [[0.0, 0.0, 0.0], junk]])  # [2,T=2,V=3]
    ref = torch.tensor([[[1.0, 0.0, 0.0], junk], [[0.0, 0.0, 0.0], junk]])
    labels = torch.tensor([[0, -100], [1, -100]])
    mask = torch.tensor([[1, 0], [1, 0]])
    return policy, ref, labels, mask


def test_extrapolated_margin_hand_example():
    policy, ref, labels, mask = _hand_batch()
    lam, beta = 1.0, 1.0
    # chosen:   h_g = 2 * [2,0,0] - [1,0,0] = [3,0,0]  ->  log pi_g(0)   = 3 - log(e^3 + 2) = -0.094923
    #           log pi_ref(0) = 1 - log(e + 2) = -0.551445
    # rejected: h_g = [0,0,0]  ->  log pi_g(1) = log pi_ref(1) = -log 3
    # z_g = beta * ((g_c - ref_c) - (g_r - ref_r)) = (-0.094923 + 0.551445) - 0 = 0.456522
    g_c = 3 - math.log(math.exp(3) + 2)
    ref_c = 1 - math.log(math.e + 2)
    assert g_c == pytest.approx(-0.094923, abs=1e-6)
    assert ref_c == pytest.approx(-0.551445, abs=1e-6)

    g = extrapolated_logps(policy, ref, labels, mask, lam, vocab_chunk=3)
    assert g.tolist() == pytest.approx([g_c, -math.log(3)], abs=1e-6)
    assert sequence_logps(ref, labels, mask).tolist() == pytest.approx([ref_c, -math.log(3)], abs=1e-6)

    z_g = extrapolated_margin(policy, ref, labels, mask, beta=beta, lam=lam, vocab_chunk=3)
    assert z_g.shape == (1,)
    assert z_g.item() == pytest.approx(0.456522, abs=1e-6)

    # The plain margin of the same pair: log pi_theta(0) = 2 - log(e^2 + 2) = -0.239545, so
    # z = -0.239545 + 0.551445 = 0.311900, and (1 + lam) * z = 0.623800 != z_g: the normaliser matters.
    z = beta * (sequence_logps(policy, labels, mask) - sequence_logps(ref, labels, mask))
    z = z[0] - z[1]
    assert z.item() == pytest.approx(0.311900, abs=1e-6)
    assert (1 + lam) * z.item() - z_g.item() > 0.1


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_chunked_normaliser_equals_unchunked(chunk):
    policy, ref, labels, mask = _hand_batch()
    full = extrapolated_logps(policy, ref, labels, mask, 1.0, vocab_chunk=3)
    assert torch.allclose(extrapolated_logps(policy, ref, labels, mask, 1.0, vocab_chunk=chunk), full, atol=1e-6)

    # A bigger random case against a direct log_softmax over the whole vocabulary.
    g = torch.Generator().manual_seed(0)
    B, T, V, lam = 4, 5, 37, 0.25
    pol, rf = torch.randn(B, T, V, generator=g) * 3, torch.randn(B, T, V, generator=g) * 3
    lab = torch.randint(0, V, (B, T), generator=g)
    msk = torch.rand(B, T, generator=g) > 0.3
    h_g = (1 + lam) * pol - lam * rf
    direct = (torch.log_softmax(h_g, -1).gather(-1, lab.unsqueeze(-1)).squeeze(-1) * msk).sum(-1)
    got = extrapolated_logps(pol, rf, lab, msk, lam, vocab_chunk=chunk)
    torch.testing.assert_close(got, direct, atol=1e-5, rtol=1e-6)


def test_extrapolated_logps_has_no_gradient():
    policy, ref, labels, mask = _hand_batch()
    policy.requires_grad_(True)
    assert not extrapolated_logps(policy, ref, labels, mask, 0.5).requires_grad


def test_normaliser_changes_who_is_low_confidence_but_a_rescale_would_not():
    # Two pairs A and B, vocabulary of 3, one response token per row, lam = 1, beta = 1.
    # Rows: [chosen_A, chosen_B, rejected_A, rejected_B]; the reference is uniform everywhere.
    #   A: the policy only pushes the rejected token down:   rejected h_theta = [0, 0, -1]   (label 2)
    #   B: the policy makes the chosen token nearly certain: chosen   h_theta = [0.5, -3, -3] (label 0)
    # Plain margins: z_A = 0.763, z_B = 1.040  -> A is the least confident.
    # Extrapolated:  z_g_A = 1.660 (pushing further down keeps paying),
    #                z_g_B = 1.097 (log pi(0) cannot exceed 0: the chosen side saturates at log 3 = 1.0986)
    #                -> B is the least confident.
    policy = torch.tensor(
        [
            [[0.0, 0.0, 0.0]],  # chosen A
            [[0.5, -3.0, -3.0]],  # chosen B
            [[0.0, 0.0, -1.0]],  # rejected A
            [[0.0, 0.0, 0.0]],  # rejected B
        ]
    )
    ref = torch.zeros_like(policy)
    labels = torch.tensor([[0], [0], [2], [1]])
    mask = torch.ones_like(labels)
    beta, lam = 1.0, 1.0

    ratios = sequence_logps(policy, labels, mask) - sequence_logps(ref, labels, mask)  # [4]
    z = beta * (ratios[:2] - ratios[2:])  # [2]
    z_g = extrapolated_margin(policy, ref, labels, mask, beta=beta, lam=lam, vocab_chunk=2)
    assert z.tolist() == pytest.approx([0.7634, 1.0400], abs=1e-3)
    assert z_g.tolist() == pytest.approx([1.6601, 1.0968], abs=1e-3)

    def picked(values):  # bottom half of a fresh window of these two pairs
        return LowConfidencePicker(frac=0.5, window=50).pick(values).tolist()

    assert picked(z) == [True, False]  # the plain margin flags A
    assert picked(z_g) == [False, True]  # the extrapolated margin flags B
    assert picked((1 + lam) * z) == picked(z)  # a pure rescale changes no ranking, so no set


def test_picker_marks_about_frac_of_a_long_stream():
    g = torch.Generator().manual_seed(0)
    picker = LowConfidencePicker(frac=0.1, window=50)
    picked = total = 0
    for _ in range(1000):
        mask = picker.pick(torch.randn(8, generator=g))
        picked += int(mask.sum())
        total += mask.numel()
    assert len(picker.values) == 50  # the window holds the last 50 PAIRS, not batch means
    assert abs(picked / total - 0.1) < 0.015


def test_picker_window_is_per_pair_and_edges():
    picker = LowConfidencePicker(frac=0.2, window=5)
    picker.pick(torch.tensor([5.0, 6.0, 7.0, 8.0, 9.0]))
    # Window is now [5..9]; a new batch [1, 100] pushes 5 and 6 out: [7, 8, 9, 1, 100].
    # 0.2-quantile of {1, 7, 8, 9, 100} = 1 + 0.8 * (7 - 1) = 5.8 -> only 1 is at or below.
    assert picker.pick(torch.tensor([1.0, 100.0])).tolist() == [True, False]
    assert list(picker.values) == [7.0, 8.0, 9.0, 1.0, 100.0]
    assert LowConfidencePicker(frac=0.0).pick(torch.tensor([1.0, 2.0])).tolist() == [False, False]
    assert LowConfidencePicker(frac=1.0).pick(torch.tensor([1.0, 2.0])).tolist() == [True, True]


def test_alpha_warmup_schedule():
    # 10 optimizer steps, warm-up 20%: steps 0 and 1 are unsmoothed, 2..9 get alpha.
    assert [alpha_at(s, 10, 0.1, 0.2) for s in range(10)] == [0.0, 0.0] + [0.1] * 8
    assert alpha_at(0, 10, 0.1, 0.0) == 0.1  # no warm-up
    assert alpha_at(9, 10, 0.1, 1.0) == 0.0  # all warm-up
    assert alpha_at(5, 10, 0.0, 0.2) == 0.0  # alpha 0 = no smoothing at all


# ---------------------------------------------------------------------------------------------
# From hidden states, in chunks of positions and of the vocabulary, against the direct computation


def direct_extrapolated_logps(policy_logits, ref_logits, labels, mask, lam):
    """The unchunked reference: log_softmax over the whole vocabulary of h_g = (1+lam) h_theta - lam h_ref."""
    h_g = (1 + lam) * policy_logits.double() - lam * ref_logits.double()
    token = torch.log_softmax(h_g, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask.bool(), token, 0.0).sum(-1).float()


@pytest.mark.parametrize("vocab_chunk,chunk_tokens", [(8192, None), (5000, 3), (32000, 64), (777, 1)])
def test_extrapolated_margin_from_hidden_equals_direct_32k(vocab_chunk, chunk_tokens):
    g = torch.Generator().manual_seed(0)
    rows, T, H, V, lam, beta = 4, 12, 16, 32000, 0.5, 0.1
    weight = torch.randn(V, H, generator=g) * 0.25
    h_theta, h_ref = torch.randn(rows, T, H, generator=g), torch.randn(rows, T, H, generator=g)
    labels = torch.randint(0, V, (rows, T), generator=g)
    mask = torch.rand(rows, T, generator=g) > 0.3
    labels[~mask] = -100
    policy, ref = LastHidden(h_theta, weight), LastHidden(h_ref, weight)
    pol_logits, ref_logits = h_theta @ weight.T, h_ref @ weight.T  # [rows, T, V]: what the old code held

    got = extrapolated_logps(policy, ref, labels, mask, lam, vocab_chunk, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(got, direct_extrapolated_logps(pol_logits, ref_logits, labels, mask, lam),
                               atol=1e-5, rtol=2**-23)
    # The same from full logits (the path for models that compute their own logits).
    torch.testing.assert_close(extrapolated_logps(pol_logits, ref_logits, labels, mask, lam, vocab_chunk), got,
                               atol=1e-5, rtol=2**-23)
    z_g = extrapolated_margin(policy, ref, labels, mask, beta=beta, lam=lam, vocab_chunk=vocab_chunk,
                              chunk_tokens=chunk_tokens)
    g_d = direct_extrapolated_logps(pol_logits, ref_logits, labels, mask, lam)
    r_d = direct_extrapolated_logps(ref_logits, ref_logits, labels, mask, 0.0)
    expected = beta * ((g_d[:2] - r_d[:2]) - (g_d[2:] - r_d[2:]))
    torch.testing.assert_close(z_g, expected, atol=1e-5, rtol=2**-23)
