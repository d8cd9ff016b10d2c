"""The per-pair smoothed DPO loss (spa-method.md, "Round i", step 3). No trainer imports.

Reads four sequence log-probs per pair (policy/reference x chosen/rejected, each the SUM of the response
tokens' log-probs, no length normalisation) and a per-pair smoothing strength; returns per-pair losses and
rewards. The caller reduces (mean over pairs).

    z    = beta * [ (log pi_theta(yw) - log pi_ref(yw)) - (log pi_theta(yl) - log pi_ref(yl)) ]
    loss = -(1 - a) * log sigmoid(z) - a * log sigmoid(-z)

a = 0 is plain sigmoid DPO (a confident pair, or round 0); a = alpha for a low-confidence pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    smoothing: torch.Tensor | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses with per-pair label smoothing.

    All log-prob tensors are [B] (one value per pair). `smoothing` is a float or a [B] tensor in [0, 0.5).
    Returns (losses[B], chosen_rewards[B], rejected_rewards[B], margins[B]); only `losses` carries gradient,
    the rewards and margins are detached (they are for logging and for picking low-confidence pairs).
    """
    # Implicit rewards: how much more likely the policy makes each response than the reference does.
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)  # [B]
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # [B]
    z = chosen_rewards - rejected_rewards  # [B] the DPO margin

    a = torch.as_tensor(smoothing, dtype=z.dtype, device=z.device)  # scalar or [B]
    # logsigmoid is stable for large |z|, unlike log(sigmoid(z)).
    losses = -(1 - a) * F.logsigmoid(z) - a * F.logsigmoid(-z)  # [B]
    return losses, chosen_rewards.detach(), rejected_rewards.detach(), z.detach()
