"""loss.py: the per-pair smoothed DPO loss, worked by hand.

(The check that zero smoothing equals TRL's stock DPOTrainer loss on a real batch lives in test_train.py,
next to the tiny model it needs.)
"""

import math

import pytest
import torch
import torch.nn.functional as F

from selfie_lite.loss import LastHidden, dpo_losses, last_hidden, sequence_logps


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


# ---------------------------------------------------------------------------------------------
# Sequence log-probs: the chunked path against the direct one, values and gradients
#
# The direct versions below are the unchunked code the package used before the chunked one (full logits
# [rows, T, V], log_softmax, gather); they stay here as the reference the chunked code must equal.


def direct_sequence_logps(logits, labels, mask):
    """sum over masked t of log_softmax(logits_t)[labels_t], from full logits [rows,T,V]."""
    mask = mask.bool()
    labels = labels.masked_fill(~mask, 0)
    token = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, token, 0.0).sum(-1)


def _random_case(vocab=32000, rows=4, T=24, H=32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g)
    weight = torch.randn(vocab, H, generator=g) * 0.2  # logits of std ~1.1, like a real model's
    b = torch.randn(vocab, generator=g) if bias else None
    labels = torch.randint(0, vocab, (rows, T), generator=g)
    mask = torch.zeros(rows, T, dtype=torch.bool)
    for r in range(rows):  # a prompt, a response, then padding (label -100), different per row
        mask[r, 5 + r : T - 2 * r] = True
    labels[~mask] = -100
    return hidden, weight, b, labels, mask


def _grads(*tensors):
    return [None if t is None else t.grad.clone() for t in tensors]


EPS32 = torch.finfo(torch.float32).eps  # 2**-23


def assert_logp_sums_close(got, want, mask, *, vocab: int, inner: int):
    """Two float32 computations of the same per-row sums of token log-probs, in different orders (chunked or not,
    another kernel). How far apart they may be follows from the floats, not from one CPU: every token log-prob is a
    dot product of length `inner` (a logit) and a log-sum-exp over `vocab` logits, and a row adds up n of them; by the
    standard bound for recursive float summation (Higham, gamma_m ~ m * eps), each of those reductions may move a
    result by its length times eps times the sum of the magnitudes it adds. Token log-probs are <= 0, so that sum is
    |want| itself: tolerance = eps * (n + inner + log2(vocab)) * |want| per row. Kernels that pick another
    vectorisation (AVX2, AVX-512, MKL's code paths) differ by far less; an indexing or masking bug moves a row by a
    whole token log-prob (about 1 to 10), far more. Measured: 6.1e-5 on a row of about -365 (AVX2) against a
    tolerance of about 7e-3 here."""
    n = mask.bool().sum(-1).to(want.dtype)
    tol = EPS32 * (n + inner + math.log2(vocab)) * want.abs() + 1e-7  # + 1e-7: an empty row is exactly 0 on both
    diff = (got - want).abs()
    assert bool((diff <= tol).all()), f"log-prob sums differ by {diff.tolist()}, allowed {tol.tolist()}"


def assert_grads_close(got, want, *, depth: int, msg: str = ""):
    """Gradients computed in another order: each element is a reduction of up to `depth` float32 terms (tokens,
    the vocabulary, a dot product), so by the same bound they may differ by eps * depth times the magnitude of what is
    summed, for which the tensor's largest gradient stands in. A wrong gradient (a lost token, a detached path)
    is off by a sizeable share of that magnitude. Measured: LoRA gradients up to 1.76 on the tiny model differ by
    5.5e-6 on this AVX2 CPU (6.0e-6 with ATEN_CPU_CAPABILITY=default), under a tolerance of about 6e-5."""
    tol = EPS32 * depth * want.abs().max().item() + 1e-12
    diff = (got - want).abs().max().item()
    assert diff <= tol, f"{msg}: gradients differ by {diff:.3g}, allowed {tol:.3g}"


@pytest.mark.parametrize("chunk_tokens", [None, 3, 7, 1000])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_logps_from_hidden_equal_direct_32k(chunk_tokens, train_head):
    """32K vocabulary, fp32: the chunked log-probs and their gradients equal the direct ones (atol 1e-5), with a
    frozen output layer (LoRA: gradient computed in the forward pass) and a trained one (recomputed in backward)."""
    hidden, weight, bias, labels, mask = _random_case(bias=train_head)
    upstream = torch.tensor([0.3, -1.0, 2.0, 0.5])  # d loss / d logps, different per row

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_head)
    b1 = None if bias is None else bias.clone().requires_grad_()
    logits = torch.nn.functional.linear(h1, w1, b1)
    direct = direct_sequence_logps(logits, labels.clamp(min=0), mask)
    (direct * upstream).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_head)
    b2 = None if bias is None else bias.clone().requires_grad_()
    chunked = sequence_logps(LastHidden(h2, w2, b2), labels, mask, chunk_tokens=chunk_tokens)
    (chunked * upstream).sum().backward()

    assert_logp_sums_close(chunked, direct, mask, vocab=32000, inner=hidden.shape[-1])
    depth = mask.numel() + 32000  # a row's tokens and, per token, the vocabulary
    assert_grads_close(h2.grad, h1.grad, depth=depth, msg="hidden")
    assert h2.grad[~mask].abs().max() == 0  # prompt and padding positions get no gradient
    if train_head:
        assert_grads_close(w2.grad, w1.grad, depth=depth, msg="weight")
        assert_grads_close(b2.grad, b1.grad, depth=depth, msg="bias")
    else:
        assert w2.grad is None


def test_chunked_logps_from_full_logits_equal_direct():
    """Full logits in (hand examples, models that compute their own logits): same values and gradients."""
    hidden, weight, _, labels, mask = _random_case(vocab=1000)
    logits = torch.nn.functional.linear(hidden, weight)
    l1, l2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    direct = direct_sequence_logps(l1, labels.clamp(min=0), mask)
    chunked = sequence_logps(l2, labels, mask, chunk_tokens=5)
    direct.sum().backward()
    chunked.sum().backward()
    assert_logp_sums_close(chunked, direct, mask, vocab=1000, inner=1)  # the logits are given: no dot product
    assert_grads_close(l2.grad, l1.grad, depth=1000, msg="logits")  # softmax over the vocabulary
    assert torch.equal(logits, l2.detach())  # the input was not modified in place


def test_logps_hand_example_and_empty_response():
    # Vocabulary 2, one row, logits [0, log 3] at the one response position: p(token 1) = 3/4.
    logits = torch.tensor([[[0.0, math.log(3.0)], [9.0, -9.0]]])
    got = sequence_logps(logits, torch.tensor([[1, -100]]), torch.tensor([[1, 0]]))
    assert got.tolist() == pytest.approx([math.log(0.75)], abs=1e-7)
    # No response token at all: log-prob 0 (an empty sum), and a zero gradient, not an error.
    h = torch.randn(2, 3, 4, requires_grad=True)
    out = sequence_logps(LastHidden(h, torch.randn(5, 4)), torch.zeros(2, 3, dtype=torch.long),
                         torch.zeros(2, 3, dtype=torch.bool))
    out.sum().backward()
    assert out.tolist() == [0.0, 0.0] and h.grad.abs().max() == 0


def test_bf16_logps_stay_close_to_fp32():
    hidden, weight, _, labels, mask = _random_case(vocab=4096)
    ref = direct_sequence_logps(torch.nn.functional.linear(hidden, weight), labels.clamp(min=0), mask)
    h = hidden.bfloat16().requires_grad_()
    got = sequence_logps(LastHidden(h, weight.bfloat16()), labels, mask, chunk_tokens=16)
    got.sum().backward()
    assert got.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0.5)  # bf16 logits: ~3 significant digits per token


# ---------------------------------------------------------------------------------------------
# last_hidden on real models: the tiny preset's SFT model and a random model with a 32K vocabulary, with LoRA


def _lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM", init_lora_weights=False))  # B != 0: adapter on != off
    peft.train()
    return peft


def _batch(vocab, rows=4, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, T), generator=g)
    attn = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    for r in range(rows):  # right padding of different lengths, responses after a 12-token prompt
        end = T - 3 * r
        attn[r, end:] = 0
        completion[r, 12:end] = 1
    return ids, attn, completion


def _logps_and_grads(model, ids, attn, completion, via_hidden: bool):
    """Policy log-probs [4] and the gradients of a DPO loss on them (rows: 2 chosen, then 2 rejected; the
    reference is the adapter-off model): the gradient scale training really sees (beta / pairs per row)."""
    model.zero_grad()
    labels, mask = ids[:, 1:], completion[:, 1:].bool()

    def logps():
        if via_hidden:
            return sequence_logps(last_hidden(model, ids, attn), labels, mask)
        return direct_sequence_logps(model(input_ids=ids, attention_mask=attn).logits[:, :-1], labels, mask)

    with torch.no_grad(), model.disable_adapter():
        ref = logps()
    policy = logps()
    dpo_losses(policy[:2], policy[2:], ref[:2], ref[2:], beta=0.1)[0].mean().backward()
    return policy.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_model(model, vocab):
    ids, attn, completion = _batch(vocab)
    assert isinstance(last_hidden(model, ids, attn), LastHidden)  # the chunked path, not the model's logits
    direct, g_direct = _logps_and_grads(model, ids, attn, completion, via_hidden=False)
    chunked, g_chunked = _logps_and_grads(model, ids, attn, completion, via_hidden=True)
    inner = model.config.hidden_size
    assert_logp_sums_close(chunked, direct, completion[:, 1:], vocab=vocab, inner=inner)
    assert g_direct.keys() == g_chunked.keys() and len(g_direct) > 0  # the LoRA matrices
    depth = ids.numel() + inner + vocab  # every token of the batch, a dot product, the vocabulary
    for name in g_direct:
        assert_grads_close(g_chunked[name], g_direct[name], depth=depth, msg=name)
    with torch.no_grad(), model.disable_adapter():  # the reference: adapter off, under no_grad
        off = sequence_logps(last_hidden(model, ids, attn), ids[:, 1:], completion[:, 1:])
        off_direct = direct_sequence_logps(model(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:],
                                           completion[:, 1:])
    assert_logp_sums_close(off, off_direct, completion[:, 1:], vocab=vocab, inner=inner)
    assert (off - chunked).abs().max() > 1e-3  # the adapter was really off


def test_last_hidden_equals_the_logits_path_on_the_tiny_model(tiny_preset):
    from transformers import AutoModelForCausalLM

    model = _lora(AutoModelForCausalLM.from_pretrained(str(tiny_preset.model_dir), dtype=torch.float32))
    _check_model(model, model.config.vocab_size)


def test_last_hidden_equals_the_logits_path_on_a_32k_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    _check_model(_lora(LlamaForCausalLM(config)), 32000)


def test_models_with_other_logits_use_their_own_forward():
    """A logit scale in the config, or a model family we have not checked: the model computes its logits."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from selfie_lite.loss import plain_output_layer

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=0,
                                      eos_token_id=0)).eval()  # eval: no dropout, so two forwards agree
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert plain_output_layer(llama) is llama.lm_head
    llama.config.logit_scale = 0.5
    assert plain_output_layer(llama) is None and plain_output_layer(gpt2) is None
    ids, attn, completion = _batch(100, rows=2, T=16)
    for model in (gpt2, llama):
        out = last_hidden(model, ids, attn)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 15, 100)
        assert_logp_sums_close(sequence_logps(out, ids[:, 1:], completion[:, 1:]),
                               direct_sequence_logps(model(input_ids=ids, attention_mask=attn).logits[:, :-1],
                                                     ids[:, 1:], completion[:, 1:]),
                               completion[:, 1:], vocab=100, inner=32)
