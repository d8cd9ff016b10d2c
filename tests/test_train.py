"""train.py: LoRA DPO through our DPOTrainer subclass, on a tiny random Llama built here (no downloads).

Fixtures: a byte-level BPE tokenizer with a chat template, trained in well under a second on generated
text; a 2-layer LlamaForCausalLM (hidden 64) with a LoRA adapter; pairs whose chosen response starts with
"yes" and rejected with "no", so there is something to learn.
"""


import pytest
import torch
from conftest import tiny_model, tiny_pairs, tiny_tokenizer, tiny_train_config
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from selfie_lite.config import RefineConfig, TrainConfig
from selfie_lite.errors import RunError
from selfie_lite.smoothing import smoothing_of
from selfie_lite.train import TrainResult, train_dpo
from selfie_lite.trainer import PairCollator, SPADPOTrainer, to_conversation

TRAIN = tiny_train_config()


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------------------------------------
# (a) zero smoothing and lam 0: exactly TRL's stock sigmoid DPO loss


@pytest.mark.parametrize("refine,lam", [(None, 0.0), (RefineConfig(alpha=0.0), 0.5)])
def test_zero_smoothing_equals_trl_stock_sigmoid_loss(tmp_path, refine, lam):
    tok, model = tiny_tokenizer(), tiny_model()
    # Move the policy away from the reference so the margins (and the loss) are not trivially 0 / log 2.
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    dataset = Dataset.from_list([to_conversation(p) for p in tiny_pairs(8)])

    def args():
        return DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", beta=0.1,
                         max_length=64, per_device_train_batch_size=8, disable_tqdm=True)

    ours = SPADPOTrainer(model=model, args=args(), train_dataset=dataset, processing_class=tok,
                         data_collator=PairCollator(pad_token_id=tok.pad_token_id, max_length=64),
                         beta=0.1, smoother=smoothing_of(refine, lam, []))
    assert set(model.peft_config) == {"default"}  # we dropped TRL's "ref" adapter copy
    stock = DPOTrainer(model=model, args=args(), train_dataset=dataset.remove_columns("pair_id"), processing_class=tok)
    # Stock TRL copies the adapter into a "ref" adapter and uses it as the reference; without it, it falls back
    # to the adapter-disabled model, which is our reference.
    model.delete_adapter("ref")

    batch = ours.data_collator([ours.train_dataset[i] for i in range(8)])
    stock_batch = stock.data_collator([stock.train_dataset[i] for i in range(8)])
    assert torch.equal(batch["input_ids"], stock_batch["input_ids"])  # same tokenisation and layout
    assert batch["pair_id"].tolist() == list(range(100, 108))

    model.train()
    our_loss = ours.compute_loss(model, batch)
    stock_loss = stock.compute_loss(model, stock_batch)
    assert abs(our_loss.item() - 0.6931) > 0.01  # a real, non-trivial loss
    assert our_loss.item() == pytest.approx(stock_loss.item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# train_dpo end to end


def test_train_dpo_learns_and_smooths_about_low_conf_frac(tmp_path):
    model = tiny_model()
    pairs = tiny_pairs(32)
    # window_pairs = 2 micro-batches: see the note on drift at the frac_smoothed check below.
    refine = RefineConfig(alpha=0.1, low_conf_frac=0.25, warmup_frac=0.2, window_pairs=8, vocab_chunk=100)
    calls = []
    result = train_dpo(
        model, tiny_tokenizer(), pairs, beta=0.1, train=TRAIN, smoother=smoothing_of(refine, 0.5, []), epochs=3,
        out_dir=tmp_path, seed=0, on_step=lambda step, total, logs: calls.append((step, total, logs)),
    )
    m = result.metrics
    assert isinstance(result, TrainResult)
    # 32 pairs / (4 per micro-batch * 2 accumulation) = 4 optimizer steps per epoch.
    assert m["steps"] == 12 and m["pairs"] == 32 and m["pairs_dropped"] == 0
    assert [c[0] for c in calls] == list(range(1, 13)) and {c[1] for c in calls} == {12}
    assert {"loss", "rewards/margins", "smoothed_frac"} <= set(calls[-1][2])

    # It learned: at step 1 pi_theta == pi_ref, so the loss is log 2 and the margin 0.
    assert m["loss_start"] == pytest.approx(0.693147, abs=1e-5)
    assert m["loss_end"] < m["loss_start"] - 0.03
    assert m["mean_margin"] > m["margin_start"] + 0.05
    assert m["pairs_per_s"] > 0 and m["seconds"] > 0

    # Every pair has its statistics; the extrapolated margin is a different number from the margin.
    assert set(result.pair_stats) == {p["pair_id"] for p in pairs}
    for s in result.pair_stats.values():
        assert {"margin", "extrapolated_margin", "smoothed", "chosen_reward", "rejected_reward"} <= set(s)
        assert s["margin"] == pytest.approx(s["chosen_reward"] - s["rejected_reward"], abs=1e-5)
        assert s["smoothing"] in (0.0, pytest.approx(0.1))
        assert s["smoothed"] == (s["smoothing"] > 0)
    assert any(abs(s["extrapolated_margin"] - s["margin"]) > 1e-4 for s in result.pair_stats.values())

    # After the warm-up, about low_conf_frac of the pairs were smoothed. Margins grow during training, so the
    # newest batch tends to sit above the older pairs in the window and the realised share runs BELOW K; the
    # longer the window spans relative to the run, the lower (window 50 here: ~0.07-0.15 for K = 0.25).
    assert 0.5 * 0.25 <= m["frac_smoothed"] <= 1.5 * 0.25
    # Only our adapter is left on the model (TRL's "ref" copy was dropped).
    assert set(model.peft_config) == {"default"}


def test_plain_dpo_when_refine_is_none(tmp_path):
    model = tiny_model()
    result = train_dpo(model, tiny_tokenizer(), tiny_pairs(16), beta=0.1, train=TRAIN, smoother=smoothing_of(None, 0.5, []),
                       epochs=1, out_dir=tmp_path, seed=0)
    assert result.metrics["frac_smoothed"] == 0.0
    assert not any(s["smoothed"] for s in result.pair_stats.values())
    # No detection: the value recorded as extrapolated_margin is the plain margin.
    assert all(s["extrapolated_margin"] == s["margin"] for s in result.pair_stats.values())


def test_same_seed_same_adapter(tmp_path):
    # Smoothing on, picked by the plain margin (lam = 0): the other code path from the test above.
    refine = RefineConfig(alpha=0.1, low_conf_frac=0.25, warmup_frac=0.2, window_pairs=16)
    runs = []
    for seed in (0, 0, 1):
        model = tiny_model(seed=0)
        result = train_dpo(model, tiny_tokenizer(), tiny_pairs(16), beta=0.1, train=TRAIN, smoother=smoothing_of(refine, 0.0, []),
                           epochs=2, out_dir=tmp_path, seed=seed)
        runs.append((_lora_weights(model), result.pair_stats))
    (w0, s0), (w1, s1), (w2, _) = runs
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert s0 == s1
    assert any(not torch.equal(w0[k], w2[k]) for k in w0)  # the seed does matter (data order)


def test_gradient_checkpointing_works_on_cpu_and_changes_nothing(tmp_path):
    weights = []
    for checkpointing in (False, True):
        model = tiny_model()
        train = TrainConfig(**{**TRAIN.__dict__, "gradient_checkpointing": checkpointing})
        train_dpo(model, tiny_tokenizer(), tiny_pairs(16), beta=0.1, train=train, smoother=smoothing_of(RefineConfig(), 0.5, []),
                  epochs=2, out_dir=tmp_path, seed=0)
        weights.append(_lora_weights(model))
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])
    assert any(w.abs().sum() > 0 for k, w in weights[1].items() if "lora_B" in k)  # it did train


def test_nan_loss_raises_run_error(tmp_path):
    model = tiny_model()
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.data.fill_(float("nan"))
            break
    with pytest.raises(RunError, match="DPO loss became nan") as err:
        train_dpo(model, tiny_tokenizer(), tiny_pairs(8), beta=0.1, train=TRAIN, smoother=smoothing_of(None, 0.0, []),
                  epochs=1, out_dir=tmp_path, seed=0)
    assert "learning_rate" in err.value.hint and "pairs" in err.value.hint


def test_collator_adds_pair_id_to_trls_layout():
    collator = PairCollator(pad_token_id=0)
    batch = collator([
        {"pair_id": 7, "prompt_ids": [1, 2], "chosen_ids": [5], "rejected_ids": [6, 6]},
        {"pair_id": 9, "prompt_ids": [8], "chosen_ids": [5, 5], "rejected_ids": [6]},
    ])
    assert batch["pair_id"].tolist() == [7, 9]
    # rows: chosen 7, chosen 9, rejected 7, rejected 9; right-padded
    assert batch["input_ids"].tolist() == [[1, 2, 5, 0], [8, 5, 5, 0], [1, 2, 6, 6], [8, 6, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]]


def test_long_prompts_are_cut_to_their_end_not_dropped(tmp_path, monkeypatch):
    # TRL alone would drop a pair whose prompt fills max_length; we keep its last max_prompt_length tokens.
    pairs = tiny_pairs(4)
    pairs[0]["prompt"] = " ".join(["why is the big red dog on the mat"] * 12)  # ~100 tokens
    train = TrainConfig(**{**TRAIN.__dict__, "max_length": 32, "max_prompt_length": 12, "grad_accum": 1})
    model, tok = tiny_model(), tiny_tokenizer()
    seen = []
    original = SPADPOTrainer._prepare_dataset

    def spy(self, *args):
        out = original(self, *args)
        seen.extend(out["prompt_ids"])
        return out

    monkeypatch.setattr(SPADPOTrainer, "_prepare_dataset", spy)
    result = train_dpo(model, tok, pairs, beta=0.1, train=train, smoother=smoothing_of(None, 0.0, []), epochs=1, out_dir=tmp_path,
                       seed=0)
    assert result.metrics["pairs_dropped"] == 0 and set(result.pair_stats) == {p["pair_id"] for p in pairs}
    full_prompt = tok.apply_chat_template([{"role": "user", "content": pairs[0]["prompt"]}],
                                          add_generation_prompt=True)["input_ids"]
    assert len(full_prompt) > 32
    assert seen[0] == full_prompt[-12:]  # the end: the generation prompt stays next to the response
    assert all(len(ids) <= 12 for ids in seen)


# ---------------------------------------------------------------------------------------------
# The reference scored once before training when nothing else needs its logits


@pytest.mark.parametrize("refine,lam", [(None, 0.5), (RefineConfig(alpha=0.1, low_conf_frac=0.25, warmup_frac=0.2,
                                                                    window_pairs=16), 0.0)])
def test_reference_pass_once_equals_the_reference_in_every_step(tmp_path, monkeypatch, refine, lam):
    import selfie_lite.reference as reference_mod
    import selfie_lite.trainer as trainer_mod

    calls = []
    original = trainer_mod.last_hidden
    for module in (reference_mod, trainer_mod):  # the reference pass (reference.py) and the loss (trainer.py)
        monkeypatch.setattr(module, "last_hidden", lambda *a, **k: calls.append(1) or original(*a, **k))
    runs = {}
    for precompute in (True, False):
        calls.clear()
        model = tiny_model()
        result = train_dpo(model, tiny_tokenizer(), tiny_pairs(16), beta=0.1, train=TRAIN, smoother=smoothing_of(refine, lam, []),
                           epochs=2, out_dir=tmp_path, seed=0, precompute_reference=precompute)
        runs[precompute] = (_lora_weights(model), result, len(calls))
    (w_once, r_once, n_once), (w_step, r_step, n_step) = runs[True], runs[False]
    # 16 pairs / 4 per micro-batch = 4 micro-batches per epoch, 2 epochs: 8 policy forwards either way; the
    # reference: 4 forwards (one pass) instead of 8 (one per step).
    assert (n_once, n_step) == (4 + 8, 8 + 8)
    assert r_once.metrics["reference_pass_seconds"] > 0 and r_step.metrics["reference_pass_seconds"] is None
    assert r_once.metrics["train_reference"] == r_step.metrics["train_reference"] == "adapter-off"
    # The same training up to float rounding (the pass batches the pairs in another order than the epochs do).
    for k in w_once:
        torch.testing.assert_close(w_once[k], w_step[k], atol=1e-6, rtol=1e-5)
    for pid, s in r_once.pair_stats.items():
        assert s["margin"] == pytest.approx(r_step.pair_stats[pid]["margin"], abs=1e-5)
        assert s["smoothed"] == r_step.pair_stats[pid]["smoothed"]


def test_noise_detection_keeps_the_reference_forward_in_every_step(tmp_path):
    result = train_dpo(tiny_model(), tiny_tokenizer(), tiny_pairs(8), beta=0.1, train=TRAIN,
                       smoother=smoothing_of(RefineConfig(alpha=0.1), 0.5, []), epochs=1, out_dir=tmp_path, seed=0)
    assert result.metrics["reference_pass_seconds"] is None  # h_ref is needed in every step: no pass before
