"""Self-refinement: decoupled noise detection (docs/method.md (E6, E7)) and the low-confidence pick with its warm-up
(E8); the paper: arXiv 2406.04412, section 4.2. smoothing.LowConfidence puts them together for the trainer.

Pure tensor functions, no model or trainer: trainer.py feeds them what one forward pass gave (loss.last_hidden).

Why the full vocabulary: log pi_g(y) - log pi_ref(y) = (1+lam) * (log pi_theta(y) - log pi_ref(y)) plus a
per-position difference of log-normalisers. Without that normaliser term z_g would be (1+lam) * z, a pure
rescale that ranks pairs exactly as z does. The normaliser needs every vocabulary entry of h_g.

Memory: h_theta and h_ref are never materialised whole. Both models' logits come from their last hidden states
and the (shared) output layer (loss.LastHidden), for the response positions only, `chunk_tokens` positions by
`vocab_chunk` vocabulary entries at a time: peak extra memory is two [chunk_tokens, vocab_chunk] fp32 blocks.
Full logits [rows, T, V] are accepted too (hand examples, models whose logits the output layer alone does not
give) and chunked the same way.

Alignment convention (causal LM): every function here takes ALREADY-SHIFTED inputs, i.e. logits[:, t] is the
distribution that predicts labels[:, t] (loss.last_hidden returns them so).
"""

from __future__ import annotations

from collections import deque

import torch

from selfie_lite.loss import CHUNK_ELEMENTS, LastHidden, Logits, dpo_margin, response_positions, sequence_logps

__all__ = ["LowConfidencePicker", "alpha_at", "extrapolated_logps", "extrapolated_margin", "sequence_logps"]


@torch.no_grad()
def extrapolated_logps(
    policy: Logits,
    ref: Logits,
    labels: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
    vocab_chunk: int = 8192,
    *,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """docs/method.md (E6): log pi_g(y), the sequence log-prob (E1) of the extrapolated logits. -> [rows], no gradient.

    policy, ref: loss.LastHidden (hidden [rows,T,H] and the output layer) or full logits [rows,T,V], already
    shifted. labels, mask: [rows,T]; positions where mask is False are ignored (their label may be -100).
    The log-normaliser logsumexp_v h_g[..., v] runs over the whole vocabulary, `vocab_chunk` entries at a time,
    combined with logaddexp, for `chunk_tokens` response positions at a time (default CHUNK_ELEMENTS //
    (2 * vocab_chunk)): at most two [chunk_tokens, vocab_chunk] fp32 blocks exist at once (h_g and the
    reference's block), CHUNK_ELEMENTS floats in all, never [rows, T, V].
    """
    # x_theta, x_ref: [N, H] (or [N, V]) copies of the response positions (advanced indexing copies), so the
    # in-place steps below, which visit each block once, never touch the caller's tensors.
    rows, cols, x_theta, y = response_positions(policy, labels, mask)
    x_ref = response_positions(ref, labels, mask)[2]
    vocab = policy.vocab_size if isinstance(policy, LastHidden) else x_theta.size(-1)
    vocab_chunk = min(vocab_chunk, vocab)
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // (2 * vocab_chunk))

    token_logps = torch.empty(y.size(0), dtype=torch.float32, device=y.device)  # [N]
    for start in range(0, y.size(0), chunk):
        end = min(start + chunk, y.size(0))
        y_c = y[start:end, None]  # [c, 1]
        log_norm = None  # [c] running logsumexp over the vocabulary chunks seen so far
        label_h = torch.zeros(end - start, dtype=torch.float32, device=y.device)  # [c] h_g at the label
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            h_g = _logits(policy, x_theta[start:end], v0, v1).float().mul_(1 + lam)  # [c, C] (E6): (1 + lam) h_theta
            h_g.sub_(_logits(ref, x_ref[start:end], v0, v1).float(), alpha=lam)  # - lam h_ref
            # The label's entry, from the same numbers as the normaliser (so log pi_g <= 0 holds exactly).
            here = (y_c >= v0) & (y_c < v1)  # [c, 1]
            at_label = h_g.gather(-1, (y_c - v0).clamp(0, v1 - v0 - 1)).squeeze(-1)
            label_h = torch.where(here.squeeze(-1), at_label, label_h)
            # logsumexp over the block, in place (torch.logsumexp would allocate a second block)
            peak = h_g.amax(-1)  # [c]
            chunk_lse = peak + h_g.sub_(peak[:, None]).exp_().sum(-1).log()
            log_norm = chunk_lse if log_norm is None else torch.logaddexp(log_norm, chunk_lse)
            del h_g
        token_logps[start:end] = label_h - log_norm
    dense = token_logps.new_zeros(mask.shape).index_put((rows, cols), token_logps)
    return dense.sum(-1)


def _logits(source: Logits, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Logits [c, end - start] of vocabulary entries start..end at the selected positions x ([c, H] or [c, V])."""
    return source.logits(x, start, end) if isinstance(source, LastHidden) else x[:, start:end]


@torch.no_grad()
def extrapolated_margin(
    policy: Logits,
    ref: Logits,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    lam: float,
    vocab_chunk: int = 8192,
    ref_logps: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """docs/method.md (E7): the extrapolated margin z_g per pair, (E4) with pi_g in place of pi_theta. -> [B], no
    gradient.

    Rows come as TRL's preference collator stacks them: the first B rows are the chosen sequences, the
    last B the rejected ones (so the inputs have 2B rows). Shapes: policy/ref [2B,T,H] (LastHidden) or
    [2B,T,V] (logits), labels/mask [2B,T].
    ref_logps [2B]: the DPO reference's log-probs for the margin when the caller has them already (the trainer
    always has: computed from `ref`, or pi_init's precomputed with robust.train_reference = "sft"); None computes
    them from `ref`. h_ref in h_g is `ref` either way.
    """
    g = extrapolated_logps(policy, ref, labels, mask, lam, vocab_chunk, chunk_tokens=chunk_tokens)  # [2B]
    ref_lp = sequence_logps(ref, labels, mask) if ref_logps is None else ref_logps  # [2B]
    g_c, g_r = g.chunk(2)
    ref_c, ref_r = ref_lp.chunk(2)
    return dpo_margin(g_c, ref_c, g_r, ref_r, beta)


class LowConfidencePicker:
    """docs/method.md (E8): marks the pairs whose confidence is in the bottom `frac` of the last `window` pairs seen.

    The window holds per-PAIR values (the public code used micro-batch means, which is a bug: a batch
    mean says nothing about which pair in it is noisy).
    """

    def __init__(self, frac: float, window: int = 50):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.frac = frac
        self.values: deque[float] = deque(maxlen=window)
        # Several processes: True when each micro-step's batches, across the processes, are ONE process's micro-batch
        # split (train.per_process_batch divided the batch), False when they are W consecutive micro-batches.
        self.split_batches = False

    def pick(self, z_g: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Add this batch's z_g [B] to the window, then return a bool [B]: True where z_g <= the frac-quantile.

        skip [B] bool: pairs that are never picked and stay out of the window (replayed human pairs,
        robust.gold_replay: their labels are not noisy, and their margins would shift the self-labels' quantile).
        """
        from selfie_lite import distributed

        z_g = z_g.detach().float().cpu()
        keep = None if skip is None else ~skip.detach().cpu().bool()
        mine = (z_g if keep is None else z_g[keep]).tolist()
        if not distributed.active():
            return self._add_and_pick(mine, z_g, keep)
        # Several processes (distributed.py): the window is the run's, not the process's. Each micro-step the
        # processes hold consecutive batches of one process's order (accelerate deals batch j to process j % W), so
        # the batches are added in rank order and each process picks where its own batch comes: as one process would.
        # Where the batches are the parts of one process's batch (split_batches), one process would have added the
        # whole of it before picking: so does every process here.
        gathered = distributed.gather([(distributed.rank(), mine)])
        if self.split_batches:
            for _, values in gathered:
                self.values.extend(values)
            return self._add_and_pick([], z_g, keep)
        picked = None
        for rank, values in gathered:
            if rank == distributed.rank():
                picked = self._add_and_pick(values, z_g, keep)
            else:
                self.values.extend(values)
        return picked

    def _add_and_pick(self, values: list[float], z_g: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        self.values.extend(values)
        if self.frac <= 0 or not self.values:  # quantile(0) is the minimum, which "at or below" would still pick
            return torch.zeros(z_g.shape, dtype=torch.bool)
        threshold = torch.quantile(torch.tensor(list(self.values)), min(self.frac, 1.0))
        picked = z_g <= threshold
        return picked if keep is None else picked & keep


def alpha_at(step: int, total_steps: int, alpha: float, warmup_frac: float) -> float:
    """docs/method.md (E8): the smoothing strength at optimizer step `step` (0-based, counting completed steps) of
    `total_steps`.

    0 during the first warmup_frac of the steps: at the start pi_theta == pi_ref, every margin is 0 and
    confidence carries no information. alpha afterwards.
    """
    return 0.0 if step < warmup_frac * total_steps else alpha
