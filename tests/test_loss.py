"""loss.py: the per-pair smoothed DPO loss, worked by hand.

(The check that zero smoothing equals TRL's stock DPOTrainer loss on a real batch lives in test_train.py,
next to the tiny model it needs.)
"""

import math

import pytest
import torch
import torch.nn.functional as F

from selfie_lite.loss import dpo_losses


def test_hand_example_with_and_without_smoothing():
    # Two identical pairs; the second is smoothed with a = 0.1.
    #   chosen reward   = beta * (pc - rc) = 0.5 * (-1.0 - -1.5) =  0.25
    #   rejected reward = beta * (pr - rr) = 0.5 * (-2.0 - -1.5) = -0.25
    #   z = 0.25 - (-0.25) = 0.5
    #   a = 0:   L = -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077
    #   a = 0.1: L = 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5) = 0.426669 + 0.097408 = 0.524077
    #            (= L(a=0) + a * z, since log(1 + e^z) - log(1 + e^-z) = z)
    pc = torch.tensor([-1.0, -1.0])
    pr = torch.tensor([-2.0, -2.0])
    rc = torch.tensor([-1.5, -1.5])
    rr = torch.tensor([-1.5, -1.5])
    losses, chosen_r, rejected_r, margins = dpo_losses(pc, pr, rc, rr, beta=0.5, smoothing=torch.tensor([0.0, 0.1]))

    assert chosen_r.tolist() == pytest.approx([0.25, 0.25])
    assert rejected_r.tolist() == pytest.approx([-0.25, -0.25])
    assert margins.tolist() == pytest.approx([0.5, 0.5])
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-6)
    assert losses[0].item() == pytest.approx(0.474077, abs=1e-6)
    assert losses[1].item() == pytest.approx(0.524077, abs=1e-6)
    assert losses[1].item() == pytest.approx(losses[0].item() + 0.1 * 0.5, abs=1e-6)


def test_zero_smoothing_is_the_sigmoid_dpo_formula():
    # TRL's sigmoid loss: -logsigmoid(beta * ((pc - rc) - (pr - rr))). Float 0 and a zero tensor agree with it.
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g) * 10 for _ in range(4))
    expected = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))
    losses_float, *_ = dpo_losses(pc, pr, rc, rr, beta=0.1, smoothing=0.0)
    losses_tensor, *_ = dpo_losses(pc, pr, rc, rr, beta=0.1, smoothing=torch.zeros(16))
    torch.testing.assert_close(losses_float, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(losses_tensor, expected, atol=1e-6, rtol=1e-6)


def test_smoothing_pulls_the_gradient_back_and_only_losses_carry_it():
    # With smoothing the gradient in z is -(1 - a) * sigmoid(-z) + a * sigmoid(z): weaker push for a noisy pair.
    pc = torch.tensor([0.0, 0.0], requires_grad=True)
    zeros = torch.zeros(2)
    losses, chosen_r, rejected_r, margins = dpo_losses(pc, zeros, zeros, zeros, beta=1.0, smoothing=torch.tensor([0.0, 0.4]))
    losses.sum().backward()
    # at z = 0: d/dz = -(1 - a) * 0.5 + a * 0.5
    assert pc.grad.tolist() == pytest.approx([-0.5, -0.1])
    assert not chosen_r.requires_grad and not rejected_r.requires_grad and not margins.requires_grad


def test_large_margins_stay_finite():
    big = torch.tensor([1e4, -1e4])
    zero = torch.zeros(2)
    losses, *_ = dpo_losses(big, zero, zero, zero, beta=1.0, smoothing=0.1)
    assert torch.isfinite(losses).all()
    assert losses.tolist() == pytest.approx([0.1 * 1e4, 0.9 * 1e4], rel=1e-6)
