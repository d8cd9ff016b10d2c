"""The formulas every stage shares, each in one place (docs/method.md; the paper: arXiv 2406.04412). No trainer
imports.

1. Sequence log-probs (E1), the one place they are computed: training, the judge, eval scoring and both backends call
   `sequence_logps`, usually through `last_hidden` (the last hidden states and the output layer, not logits). Every
   other formula builds on them: the judge's reward, the DPO margin and, with extrapolated logits, the noise detector
   (refine.py).

2. The implicit reward (E2), the DPO margin (E4) and the per-pair smoothed loss (E5): four sequence log-probs per
   pair (policy/reference x chosen/rejected) and a per-pair smoothing a (smoothing.py) in, per-pair losses and
   rewards out. The caller reduces (mean over pairs).

Memory (docs/performance.md, "Memory of the loss and the judge"). The logits of a micro-batch are
[rows, T, V]: with a 152K vocabulary and 1K-token pairs that is 1.2 GB per pair (2 rows) in fp32, several times
what the rest of a LoRA step needs. So `sequence_logps` never builds them: it takes the last hidden states
[rows, T, H] and the output layer, keeps only the response positions, and computes logits for `chunk_tokens`
positions at a time, with the gradient with respect to the hidden states computed in the same pass (a custom
autograd function). Peak extra memory is the hidden states of the response positions, their gradient, and one
[chunk, V] fp32 block.

Why our own code and not a library's fused kernel (Liger-Kernel's fused linear cross-entropy, Unsloth's, TRL's
`fused_lm_head`): those return per-token log-probs of the label only, need Triton (a GPU), and expose no logits;
the noise detector needs the full-vocabulary normaliser of the extrapolated logits of TWO models (refine.py),
and everything here must also run on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Logits computed at once: chunk_tokens = CHUNK_ELEMENTS // V positions (64 MB of fp32 per block; at V = 152K,
# 110 positions). Big enough that the [chunk, H] x [H, V] product runs at full speed on a GPU, small enough to
# be noise next to a 7B model.
CHUNK_ELEMENTS = 2**24

# Architectures whose logits are exactly output_layer(last hidden state): no soft-capping, no logit scale. For
# these we compute logits from the hidden states ourselves; every other model computes its own logits (memory
# [rows, T, V], but right whatever the model does after its output layer).
PLAIN_HEAD_MODELS = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "olmo2", "starcoder2",
})
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


@dataclass(frozen=True)
class LastHidden:
    """A causal LM's last hidden states and its output layer: logits = hidden @ weight.T (+ bias), never built whole.

    hidden [rows, T, H] is already shifted like labels: hidden[:, t] gives the logits that predict labels[:, t].
    """

    hidden: torch.Tensor  # [rows, T, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None  # [V] or None

    @property
    def vocab_size(self) -> int:
        return self.weight.size(0)

    def detach(self) -> LastHidden:
        return LastHidden(self.hidden.detach(), self.weight.detach(), None if self.bias is None else self.bias.detach())

    def logits(self, hidden: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Logits [N, end - start] of vocabulary entries start..end for hidden states [N, H]."""
        bias = None if self.bias is None else self.bias[start:end]
        return F.linear(hidden, self.weight[start:end], bias)


Logits = torch.Tensor | LastHidden  # full logits [rows, T, V] (small models, hand examples) or LastHidden


def response_positions(source: Logits, labels: torch.Tensor, mask: torch.Tensor):
    """(rows [N], cols [N], inputs [N, H or V], labels [N]) at the N masked positions, row-major order.

    Only response tokens count, so prompt and padding positions never reach the output layer: for pairs whose
    prompt is half the sequence, half the logits are never computed."""
    rows, cols = mask.bool().nonzero(as_tuple=True)
    x = source.hidden if isinstance(source, LastHidden) else source
    return rows, cols, x[rows, cols], labels[rows, cols]


def chunk_tokens_for(vocab: int, chunk_tokens: int | None = None) -> int:
    return chunk_tokens if chunk_tokens else max(1, CHUNK_ELEMENTS // vocab)


def sequence_logps(source: Logits, labels: torch.Tensor, mask: torch.Tensor, *,
                   chunk_tokens: int | None = None) -> torch.Tensor:
    """docs/method.md (E1): log pi(y | x), a SUM over the masked (response) positions. -> [rows] fp32, with gradient.

    source: a LastHidden (hidden [rows,T,H] and the output layer) or full logits [rows,T,V], already shifted
    (source[:, t] predicts labels[:, t]). labels, mask: [rows,T]; where mask is False the label is ignored (it may
    be -100). Positions are processed chunk_tokens at a time (default CHUNK_ELEMENTS // V).

    Equal to the direct log_softmax(logits).gather(labels) sum up to float rounding, values and gradients
    (tests/test_loss.py keeps that direct version and compares both).
    """
    rows, cols, x, y = response_positions(source, labels, mask)
    head = source if isinstance(source, LastHidden) else None
    vocab = head.vocab_size if head is not None else x.size(-1)
    weight, bias = (head.weight, head.bias) if head is not None else (None, None)
    token_logps = _LabelLogps.apply(x, y, weight, bias, chunk_tokens_for(vocab, chunk_tokens))  # [N] fp32
    # Back to [rows, T] and summed along T, like the direct version (a dense sum, not index_add: deterministic on
    # a GPU too, where index_add's atomics are not).
    dense = token_logps.new_zeros(mask.shape).index_put((rows, cols), token_logps)
    return dense.sum(-1)


class _LabelLogps(torch.autograd.Function):
    """log_softmax(x @ W.T + b)[y] per row of x [N, H] (or of logits x [N, V] when W is None), chunk by chunk.

    Forward, per chunk of positions: logits [c, V] in fp32, their log-normaliser, the label's log-prob, and, when
    x needs a gradient and W does not (LoRA: the output layer is frozen), the gradient of the log-prob with
    respect to x, d/dx log_softmax(xW^T)[y] = (onehot(y) - softmax(xW^T)) W, stored as [N, H] in x's dtype. The
    backward pass then only scales it by the incoming per-position gradient: no [N, V] tensor is ever held, and
    the output layer's matmul runs twice per chunk, as in an unchunked forward and backward. When W needs a
    gradient too, the backward pass recomputes each chunk's softmax instead (one matmul more).
    """

    @staticmethod
    def forward(ctx, x, labels, weight, bias, chunk):
        n = x.size(0)
        out = torch.empty(n, dtype=torch.float32, device=x.device)
        keep_grad = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[2:4])
        grad_x = torch.empty_like(x) if keep_grad else None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            y = labels[start:end, None]  # [c, 1]
            probs, lse, label_logit = _softmax_chunk(x[start:end], y, weight, bias)
            out[start:end] = label_logit - lse
            if keep_grad:
                probs.scatter_add_(-1, y, torch.full_like(y, -1, dtype=probs.dtype))  # softmax - onehot
                grad = probs if weight is None else probs.to(weight.dtype) @ weight  # [c, H] (or [c, V])
                grad_x[start:end] = grad.neg_().to(x.dtype)
            del probs
        ctx.chunk, ctx.keep_grad, ctx.has_bias = chunk, keep_grad, bias is not None
        ctx.save_for_backward(grad_x if keep_grad else x, labels, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out [N]: d loss / d log-prob of each position
        saved, labels, weight, bias = ctx.saved_tensors
        if ctx.keep_grad:
            # fp32 product, one rounding to x's dtype (bf16 training keeps the precision of the unchunked path)
            return (grad_out[:, None] * saved).to(saved.dtype), None, None, None, None
        x = saved
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if ctx.has_bias and ctx.needs_input_grad[3] else None
        for start in range(0, x.size(0), ctx.chunk):
            end = min(start + ctx.chunk, x.size(0))
            y = labels[start:end, None]
            probs, _, _ = _softmax_chunk(x[start:end], y, weight, bias)
            probs.scatter_add_(-1, y, torch.full_like(y, -1, dtype=probs.dtype))
            d_logits = probs.mul_(-grad_out[start:end, None].float())  # [c, V] d loss / d logits
            if grad_x is not None:
                grad_x[start:end] = (d_logits if weight is None else d_logits.to(weight.dtype) @ weight).to(x.dtype)
            if grad_w is not None:
                grad_w += d_logits.T @ x[start:end].float()
            if grad_b is not None:
                grad_b += d_logits.sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_x, None, grad_w, grad_b, None


def _softmax_chunk(x, y, weight, bias):
    """(softmax [c, V] fp32, logsumexp [c], logit of the label [c]) of one chunk, in ONE [c, V] fp32 buffer: the
    max-shifted exponentials are computed in place, as torch.logsumexp does internally."""
    if weight is None:
        logits = x.to(torch.float32, copy=True)  # a copy: the in-place steps below must not touch the input
    else:
        logits = F.linear(x, weight, bias).float()  # [c, V]; the model-dtype product is freed right away
    label_logit = logits.gather(-1, y).squeeze(-1)  # [c]
    peak = logits.amax(-1, keepdim=True)  # [c, 1]
    total = logits.sub_(peak).exp_().sum(-1, keepdim=True)  # logits now holds exp(logits - peak)
    lse = (peak + total.log()).squeeze(-1)
    return logits.div_(total), lse, label_logit


def causal_lm(model):
    """The transformers CausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_output_layer(model) -> torch.nn.Linear | None:
    """The model's output layer when its logits are exactly that layer applied to the last hidden states, else None
    (a model family outside PLAIN_HEAD_MODELS, a logit scale or soft-cap in its config, an output layer that is
    not a plain nn.Linear: 4-bit, or wrapped by LoRA), or where the training engine shards the weights (DeepSpeed
    ZeRO-3, FSDP: the layer's weight is whole only inside its own forward, so the model's own logits are used)."""
    from selfie_lite.distributed import shards_weights

    if shards_weights():
        return None
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    decoder = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if type(head) is not torch.nn.Linear or decoder is None or decoder is lm or _partitioned(head.weight):
        return None
    return head


def _partitioned(weight: torch.Tensor) -> bool:
    """A weight that a sharding engine holds in pieces (ZeRO-3's placeholder, FSDP2's DTensor, an empty flat view)."""
    return hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor" or weight.numel() == 0


def last_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Logits:
    """What sequence_logps needs from one forward pass of `model` on [rows, T] ids, shifted so that [:, t]
    predicts input_ids[:, t + 1]: a LastHidden [rows, T-1, H] where plain_output_layer allows, else the model's
    own logits [rows, T-1, V].

    The LastHidden path runs the decoder stack alone (the transformers model under the CausalLM, with the LoRA
    layers PEFT put into it), so the CausalLM's forward never runs: no [rows, T, V] logits are made, and it makes
    no difference whether a patched forward (Unsloth's) returns logits, hidden states, or nothing in `.logits`.
    Adapter state, train/eval mode and gradient checkpointing live on the decoder's layers and apply as usual.
    """
    head = plain_output_layer(model)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        if not isinstance(logits, torch.Tensor) or logits.shape[:2] != input_ids.shape or logits.dim() != 3:
            raise RuntimeError(
                f"{type(causal_lm(model)).__name__}'s forward returned no [rows, T, V] logits (got "
                f"{getattr(logits, 'shape', type(logits).__name__)}) and its output layer is not a plain linear map")
        return logits[:, :-1]
    lm = causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]  # [rows, T, H]
    return LastHidden(hidden[:, :-1], head.weight, head.bias)


# ---------------------------------------------------------------------------------------------
# The loss


def implicit_reward(policy_logp, reference_logp, beta: float):
    """docs/method.md (E2): r = beta * (log pi(y|x) - log pi_ref(y|x)), elementwise on floats or tensors. The judge,
    the round guard, consistency weighting, eval's seed-pair accuracy and the loss below all take it from here."""
    return beta * (policy_logp - reference_logp)


def implicit_rewards(policy_logps: list[float], reference_logps: list[float], beta: float) -> list[float]:
    """implicit_reward over lists of sequence log-probs (one per response), as the judge and eval hold them."""
    return [implicit_reward(p, r, beta) for p, r in zip(policy_logps, reference_logps, strict=True)]


def dpo_margin(policy_chosen, ref_chosen, policy_rejected, ref_rejected, beta: float):
    """The DPO margin z = r(yw) - r(yl), elementwise (docs/method.md (E4); with pi_g's log-probs in place of pi's it
    is the extrapolated margin z_g of (E7)). The loss, the paper's picker and the margin logs all take it from here."""
    return implicit_reward(policy_chosen, ref_chosen, beta) - implicit_reward(policy_rejected, ref_rejected, beta)


def dpo_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    smoothing: torch.Tensor | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/method.md (E5): per-pair DPO losses with per-pair label smoothing a.

    All log-prob tensors are [B] (one value per pair). `smoothing` is a float or a [B] tensor in [0, 0.5).
    Returns (losses[B], chosen_rewards[B], rejected_rewards[B], margins[B]); only `losses` carries gradient,
    the rewards and margins are detached (they are for logging and for picking low-confidence pairs).
    """
    # Implicit rewards: how much more likely the policy makes each response than the reference does.
    chosen_rewards = implicit_reward(policy_chosen_logps, ref_chosen_logps, beta)  # [B]
    rejected_rewards = implicit_reward(policy_rejected_logps, ref_rejected_logps, beta)  # [B]
    z = dpo_margin(policy_chosen_logps, ref_chosen_logps, policy_rejected_logps, ref_rejected_logps, beta)  # [B] (E4)

    a = torch.as_tensor(smoothing, dtype=z.dtype, device=z.device)  # scalar or [B]
    # logsigmoid is stable for large |z|, unlike log(sigmoid(z)).
    losses = -(1 - a) * F.logsigmoid(z) - a * F.logsigmoid(-z)  # [B] (E5)
    return losses, chosen_rewards.detach(), rejected_rewards.detach(), z.detach()
