"""Self-refinement: decoupled noise detection and the smoothing schedule (spa-method.md, "Round i", step 3).

Pure tensor functions, no model or trainer: train.py feeds them logits it has already computed.

    h_g        = (1 + lam) * h_theta - lam * h_ref        per position, over the FULL vocabulary
    log pi_g   = sum_t log_softmax(h_g,t)[y_t]             no gradient
    z_g        = beta * [ (log pi_g(yw) - log pi_ref(yw)) - (log pi_g(yl) - log pi_ref(yl)) ]

A pair is low-confidence when its z_g is in the bottom `frac` of a running window of recent per-pair values;
those pairs get label smoothing alpha (0 during the first `warmup_frac` of the optimizer steps).

Why the full vocabulary: log pi_g(y) - log pi_ref(y) = (1+lam) * (log pi_theta(y) - log pi_ref(y)) plus a
per-position difference of log-normalisers. Without that normaliser term z_g would be (1+lam) * z, a pure
rescale that ranks pairs exactly as z does. The normaliser needs every vocabulary entry of h_g; we build it
in vocabulary chunks so that h_g is never materialised whole.

Alignment convention (causal LM): every function here takes ALREADY-SHIFTED tensors, i.e. logits[:, t] is
the distribution that predicts labels[:, t]. From a model output that means logits = out.logits[:, :-1] and
labels = input_ids[:, 1:], mask = completion_mask[:, 1:].
"""

from __future__ import annotations

from collections import deque

import torch


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t log_softmax(logits_t)[y_t] over masked positions. logits [B,T,V], labels/mask [B,T] -> [B].

    Keeps the gradient. gather - logsumexp rather than log_softmax(...).gather: autograd then keeps no
    second [B,T,V] tensor for the backward pass (logsumexp saves its input, which exists anyway).
    """
    mask = mask.bool()
    labels = labels.masked_fill(~mask, 0)  # -100 (or any pad) must still be a valid index; masked out below
    logits = logits.float()
    token_logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [B,T]
    return torch.where(mask, token_logps, 0.0).sum(-1)


@torch.no_grad()
def extrapolated_logps(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
    vocab_chunk: int = 8192,
) -> torch.Tensor:
    """log pi_g(y) = sum over masked t of log_softmax((1+lam) h_theta - lam h_ref)_t[y_t]. -> [B], no gradient.

    policy_logits, ref_logits: [B,T,V], already shifted (logits[:, t] predicts labels[:, t]).
    labels, mask: [B,T]; positions where mask is False are ignored (their label may be -100).
    The log-normaliser logsumexp_v h_g[..., v] runs over the whole vocabulary, one chunk of `vocab_chunk`
    entries at a time, combined with logaddexp: peak extra memory is [B,T,vocab_chunk], not [B,T,V].
    """
    mask = mask.bool()
    labels = labels.masked_fill(~mask, 0)
    V = policy_logits.size(-1)

    log_norm = None  # [B,T] running logsumexp over the chunks seen so far
    for start in range(0, V, vocab_chunk):
        h_theta = policy_logits[..., start : start + vocab_chunk].float()  # [B,T,C]
        h_ref = ref_logits[..., start : start + vocab_chunk].float()
        chunk_lse = torch.logsumexp((1 + lam) * h_theta - lam * h_ref, dim=-1)  # [B,T]
        log_norm = chunk_lse if log_norm is None else torch.logaddexp(log_norm, chunk_lse)

    # h_g at the label only: [B,T]
    idx = labels.unsqueeze(-1)
    h_g_label = (1 + lam) * policy_logits.gather(-1, idx).squeeze(-1).float() - lam * ref_logits.gather(
        -1, idx
    ).squeeze(-1).float()
    token_logps = h_g_label - log_norm  # [B,T]
    return torch.where(mask, token_logps, 0.0).sum(-1)


@torch.no_grad()
def extrapolated_margin(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    lam: float,
    vocab_chunk: int = 8192,
    ref_logps: torch.Tensor | None = None,
) -> torch.Tensor:
    """z_g = beta * ((g_c - ref_c) - (g_r - ref_r)) per pair. -> [B], no gradient.

    Rows come as TRL's preference collator stacks them: the first B rows are the chosen sequences, the
    last B the rejected ones (so the tensors have 2B rows). Shapes: logits [2B,T,V], labels/mask [2B,T].
    ref_logps [2B]: the DPO reference's log-probs for the margin when they are not the ref_logits' own
    (robust.train_reference = "sft": pi_init's, precomputed); h_ref in h_g stays ref_logits either way.
    """
    g = extrapolated_logps(policy_logits, ref_logits, labels, mask, lam, vocab_chunk)  # [2B]
    ref = sequence_logps(ref_logits, labels, mask) if ref_logps is None else ref_logps  # [2B]
    g_c, g_r = g.chunk(2)
    ref_c, ref_r = ref.chunk(2)
    return beta * ((g_c - ref_c) - (g_r - ref_r))


class LowConfidencePicker:
    """Marks the pairs whose confidence is in the bottom `frac` of the last `window` pairs seen.

    The window holds per-PAIR values (the public code used micro-batch means, which is a bug: a batch
    mean says nothing about which pair in it is noisy).
    """

    def __init__(self, frac: float, window: int = 50):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.frac = frac
        self.values: deque[float] = deque(maxlen=window)

    def pick(self, z_g: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Add this batch's z_g [B] to the window, then return a bool [B]: True where z_g <= the frac-quantile.

        skip [B] bool: pairs that are never picked and stay out of the window (replayed human pairs,
        robust.gold_replay: their labels are not noisy, and their margins would shift the self-labels' quantile).
        """
        z_g = z_g.detach().float().cpu()
        keep = None if skip is None else ~skip.detach().cpu().bool()
        self.values.extend((z_g if keep is None else z_g[keep]).tolist())
        if self.frac <= 0 or not self.values:  # quantile(0) is the minimum, which "at or below" would still pick
            return torch.zeros(z_g.shape, dtype=torch.bool)
        threshold = torch.quantile(torch.tensor(list(self.values)), min(self.frac, 1.0))
        picked = z_g <= threshold
        return picked if keep is None else picked & keep


def alpha_at(step: int, total_steps: int, alpha: float, warmup_frac: float) -> float:
    """Smoothing strength at optimizer step `step` (0-based, counting completed steps) of `total_steps`.

    0 during the first warmup_frac of the steps: at the start pi_theta == pi_ref, every margin is 0 and
    confidence carries no information. alpha afterwards.
    """
    return 0.0 if step < warmup_frac * total_steps else alpha
