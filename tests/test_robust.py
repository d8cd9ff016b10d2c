"""Counter-measures against drift (config section `robust`, docs/method.md): each OFF value is exactly the paper's
behaviour, each ON value does what it says, on hand-made rows and tensors and the tiny random Llama of
test_train.py (no tiny-preset build)."""

import math
import random

import pytest
import torch
from conftest import TWO_ROUNDS, tiny_model, tiny_pairs, tiny_tokenizer

from selfie_lite.config import RefineConfig, RobustConfig, load_config, parse_override, to_dict
from selfie_lite.errors import RunError, UserError
from selfie_lite.judge import fit_length_penalty, judge_pairs, length_gap
from selfie_lite.loss import dpo_losses
from selfie_lite.reference import reference_table, training_sequences
from selfie_lite.refine import LowConfidencePicker, extrapolated_margin, sequence_logps
from selfie_lite.robust import consistency_smoothing, gold_pair_id, gold_replay, kendall_tau, round_learning_rate
from selfie_lite.smoothing import Consistency, LowConfidence, smoothing_of
from selfie_lite.trainer import PairCollator, SPADPOTrainer, to_conversation

# ---------------------------------------------------------------------------------------------
# Settings


def test_defaults_are_the_measured_best_and_method_paper_turns_every_one_off():
    cfg = load_config()
    assert cfg.robust == RobustConfig(gold_replay=0.5, lr_decay=1.0, length_debias=False, train_reference="sft",
                                      consistency="pair")
    assert to_dict(cfg)["robust"] == {"gold_replay": 0.5, "lr_decay": 1.0, "length_debias": False,
                                      "train_reference": "sft", "consistency": "pair", "max_steps": 0,
                                      "margin_keep": 1.0, "anchor_rejected": False}
    paper = load_config(None, None, [{"method": "paper"}])
    assert paper.robust == RobustConfig(0.0, 1.0, False, "previous", "off") and paper.guard.select == "last"
    on = load_config(None, None, [parse_override(o) for o in (
        "robust.gold_replay=0.5", "robust.lr_decay=0.5", "robust.length_debias=true", "robust.train_reference=sft",
        "robust.consistency=round")])
    assert on.robust == RobustConfig(0.5, 0.5, True, "sft", "round")
    with pytest.raises(UserError, match="method = paper runs the paper's loop exactly, but robust.lr_decay = 0.5"):
        load_config(None, None, [{"method": "paper"}, parse_override("robust.lr_decay=0.5")])
    with pytest.raises(UserError, match='but robust.consistency = "pair"'):
        load_config(None, None, [{"method": "paper"}, parse_override("robust.consistency='pair'")])


@pytest.mark.parametrize("override,message", [
    ("robust.gold_replay=1", "robust.gold_replay must be in [0, 1), got 1.0"),
    ("robust.gold_replay=-0.1", "robust.gold_replay must be in [0, 1), got -0.1"),
    ("robust.lr_decay=0", "robust.lr_decay must be in (0, 1], got 0"),
    ("robust.lr_decay=1.5", "robust.lr_decay must be in (0, 1], got 1.5"),
    ("robust.train_reference='init'", "robust.train_reference must be one of previous, sft, got 'init'"),
    ("robust.length_debias=1", "robust.length_debias: expected bool"),
    ("robust.consistency='cream'", "robust.consistency must be one of off, pair, round, got 'cream'"),
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(UserError) as e:
        load_config(None, None, [parse_override(override)])
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------
# gold_replay


def _self_pairs(n):
    return [{"pair_id": i, "prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "reward_chosen": 0.1}
            for i in range(n)]


def _seed_pairs(n):
    return [{"pair_id": k, "prompt": f"seed prompt {k}", "chosen": f"good {k}", "rejected": f"bad {k}"}
            for k in range(n)]


def test_gold_replay_off_is_the_papers_set():
    pairs = _self_pairs(6)
    assert gold_replay(pairs, _seed_pairs(10), 0.0, 42, 1) is pairs


def test_gold_replay_adds_the_share_of_seed_pairs_with_fresh_ids():
    pairs, seed = _self_pairs(6), _seed_pairs(10)
    out = gold_replay(pairs, seed, 0.5, 42, 1)
    assert out[:6] == pairs  # the self-labelled pairs, untouched
    gold = out[6:]
    assert len(gold) == 6  # half of the 12 training pairs are human pairs
    assert all(g["gold"] is True for g in gold) and not any(p.get("gold") for p in pairs)
    ids = [p["pair_id"] for p in out]
    assert len(set(ids)) == len(ids) and all(g["pair_id"] < 0 for g in gold)
    for g in gold:  # the right seed pair, labels as the humans gave them
        k = g["seed_index"]
        assert g["pair_id"] == gold_pair_id(k) == -1 - k
        assert (g["prompt"], g["chosen"], g["rejected"]) == (seed[k]["prompt"], seed[k]["chosen"], seed[k]["rejected"])
    # Deterministic in (random seed, round); another round or seed draws others.
    assert gold_replay(pairs, seed, 0.5, 42, 1) == out
    assert gold_replay(pairs, seed, 0.5, 42, 2) != out or gold_replay(pairs, seed, 0.5, 7, 1) != out
    # 0.25 of the total: 2 gold for 6 self-labels; never more than the seed set holds.
    assert len(gold_replay(pairs, seed, 0.25, 42, 1)) == 8
    assert len(gold_replay(pairs, seed, 0.9, 42, 1)) == 6 + 10


def test_the_picker_skips_replayed_pairs_and_without_them_is_unchanged():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, generator=g) for _ in range(5)]
    plain, none_skipped = LowConfidencePicker(0.25, 8), LowConfidencePicker(0.25, 8)
    for z in batches:  # skip = all False: bitwise the paper's picker
        assert torch.equal(plain.pick(z), none_skipped.pick(z, skip=torch.zeros(4, dtype=torch.bool)))
    assert list(plain.values) == list(none_skipped.values)
    picker = LowConfidencePicker(1.0, 8)  # frac 1: every self-labelled pair is low-confidence
    skip = torch.tensor([True, False, True, False])
    picked = picker.pick(torch.tensor([-5.0, 1.0, -9.0, 2.0]), skip=skip)
    assert picked.tolist() == [False, True, False, True]
    assert list(picker.values) == [1.0, 2.0]  # the human pairs' margins stay out of the window


def test_replayed_pairs_are_never_smoothed_in_the_trainer(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    pairs = tiny_pairs(8)
    gold_ids = {p["pair_id"] for p in pairs[:3]}
    # low_conf_frac 1 and no warm-up: every pair the picker sees is smoothed, unless it is a human pair.
    refine = RefineConfig(alpha=0.1, low_conf_frac=1.0, warmup_frac=0.0, window_pairs=50, vocab_chunk=100)
    trainer = _trainer(tmp_path, model, tok, pairs, smoother=LowConfidence(refine, 0.5, gold_ids))
    model.train()
    trainer.compute_loss(model, _batch(trainer, 8))
    stats = trainer.pair_stats
    assert all(stats[i]["smoothing"] == 0.0 and not stats[i]["low_confidence"] for i in gold_ids)
    assert all(stats[p["pair_id"]]["smoothing"] == pytest.approx(0.1) for p in pairs[3:])


# ---------------------------------------------------------------------------------------------
# lr_decay


def test_round_learning_rate():
    for i in range(5):  # off: the same rate, bitwise, every round
        assert round_learning_rate(2e-4, 1.0, i) == 2e-4
    assert [round_learning_rate(1e-3, 0.5, i) for i in range(5)] == [1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4]


# ---------------------------------------------------------------------------------------------
# length_debias (judge)


def _rows(specs):
    """specs: per prompt, [(reward, length)] per response. beta = 1 and reference 0, so policy log-prob = reward."""
    rows, pol = [], []
    for i, resp in enumerate(specs):
        rows.append({"id": i, "prompt": f"p{i}", "responses": [f"r{i}-{j}" for j in range(len(resp))],
                     "response_ids": [[7] * n for _, n in resp]})
        pol += [rw for rw, _ in resp]
    return rows, pol, [0.0] * len(pol)


def test_length_penalty_zero_is_the_papers_choice():
    rng = random.Random(0)
    rows, pol, ref = _rows([[(rng.gauss(0, 1), rng.randint(1, 30)) for _ in range(3)] for _ in range(20)])
    assert judge_pairs(rows, pol, ref, 1.0, 0.0) == judge_pairs(rows, pol, ref, 1.0)
    # and that is: chosen = highest reward, rejected = lowest
    for p, r in zip(judge_pairs(rows, pol, ref, 1.0)[0], rows, strict=False):
        rewards = p["rewards"]
        assert p["chosen"] == r["responses"][rewards.index(max(rewards))]


def test_length_penalty_prefers_the_shorter_answer_on_a_small_reward_gap():
    rows, pol, ref = _rows([[(0.30, 10), (0.25, 4)], [(0.90, 10), (0.25, 4)]])
    (p1, p2), _ = judge_pairs(rows, pol, ref, 1.0, 0.01)  # a * length gap = 0.06
    assert p1["chosen"] == "r0-1" and p1["rejected"] == "r0-0"  # 0.05 < 0.06: the shorter one wins
    assert p1["reward_chosen"] == 0.25 and p1["reward_rejected"] == 0.30  # stored rewards stay the true ones
    assert p1["p_chosen"] == pytest.approx(1 / (1 + math.exp(0.05)))
    assert p2["chosen"] == "r1-0"  # 0.65 > 0.06: the reward still decides


def test_fitted_length_penalty_closes_the_length_gap():
    rng = random.Random(1)
    # A judge with a length bias: reward grows 0.02 per token, plus noise.
    specs = [[(0.02 * n + rng.gauss(0, 0.1), n) for n in (rng.randint(5, 40), rng.randint(5, 40))] for _ in range(200)]
    rows, pol, ref = _rows(specs)
    plain = length_gap(judge_pairs(rows, pol, ref, 1.0)[0], rows)
    a, gap = fit_length_penalty(rows, pol, ref, 1.0)
    assert plain > 5  # the plain choice prefers the longer answer
    assert a > 0 and abs(gap) < 0.5 and gap == length_gap(judge_pairs(rows, pol, ref, 1.0, a)[0], rows)
    # No a does much better: a is (near) the best on a fine grid.
    grid = [a * f for f in (0.5, 0.8, 0.9, 1.1, 1.25, 2.0)]
    assert all(abs(gap) <= abs(length_gap(judge_pairs(rows, pol, ref, 1.0, x)[0], rows)) + 1e-9 for x in grid)
    # No bias to remove (all lengths equal): a = 0.
    rows0, pol0, ref0 = _rows([[(rng.gauss(0, 1), 9), (rng.gauss(0, 1), 9)] for _ in range(10)])
    assert fit_length_penalty(rows0, pol0, ref0, 1.0)[0] == 0.0


# ---------------------------------------------------------------------------------------------
# train_reference (trainer)


def _trainer(tmp_path, model, tok, pairs, max_length=64, max_prompt_length=None, **kwargs):
    from datasets import Dataset
    from trl import DPOConfig

    args = DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", beta=0.1,
                     max_length=max_length, per_device_train_batch_size=8, disable_tqdm=True)
    return SPADPOTrainer(model=model, args=args, train_dataset=Dataset.from_list([to_conversation(p) for p in pairs]),
                         processing_class=tok, data_collator=PairCollator(pad_token_id=tok.pad_token_id,
                                                                          max_length=max_length),
                         max_prompt_length=max_prompt_length, beta=0.1, **kwargs)


def _batch(trainer, n):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _moved(model):
    """Move the policy away from the reference, so margins (and losses) are not trivially 0 / log 2."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return model


def test_training_sequences_are_the_tokens_the_trainer_scores(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    pairs = tiny_pairs(8)
    pairs[0]["prompt"] = " ".join([pairs[0]["prompt"]] * 6)  # long: cut to its end
    pairs[1]["chosen"] = " ".join([pairs[1]["chosen"]] * 12)  # long: truncated by max_length
    trainer = _trainer(tmp_path, model, tok, pairs, max_length=40, max_prompt_length=16)
    batch = _batch(trainer, 8)
    from selfie_lite.config import TrainConfig

    seqs = training_sequences(tok, pairs, TrainConfig(max_length=40, max_prompt_length=16))
    for row in range(16):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        comp = batch["completion_mask"][row][batch["attention_mask"][row].bool()].bool().tolist()
        prompt = [t for t, c in zip(ids, comp, strict=True) if not c]
        completion = [t for t, c in zip(ids, comp, strict=True) if c]
        assert (prompt, completion) == seqs[row], row
    assert len(seqs[0][0]) == 16 and len(seqs[1][0]) + len(seqs[1][1]) == 40  # both cuts happened


def test_given_reference_of_the_same_model_gives_the_papers_loss(tmp_path):
    """The previous-round reference precomputed outside the trainer (backend pass on training_sequences) gives the
    loss of the adapter-off forward: the given log-probs reach the margin where the paper's would."""
    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.config import RunConfig, TrainConfig

    tok, model = tiny_tokenizer(), _moved(tiny_model())
    pairs = tiny_pairs(8)
    seqs = training_sequences(tok, pairs, TrainConfig(max_length=64, max_prompt_length=512))
    with model.disable_adapter():
        logps = HFBackend(RunConfig()).sequence_logps(model, seqs, batch_size=3)
    table = reference_table(pairs, logps, seqs)
    refine = RefineConfig(alpha=0.1, low_conf_frac=0.25, warmup_frac=0.0, vocab_chunk=100)
    paper = _trainer(tmp_path, model, tok, pairs, max_prompt_length=512, smoother=LowConfidence(refine, 0.5))
    given = _trainer(tmp_path, model, tok, pairs, max_prompt_length=512, smoother=LowConfidence(refine, 0.5),
                     ref_logps=table)
    model.train()
    batch = _batch(paper, 8)
    assert paper.compute_loss(model, batch).item() == pytest.approx(given.compute_loss(model, batch).item(), abs=1e-5)
    for pid in paper.pair_stats:
        for key in ("margin", "extrapolated_margin", "loss"):
            assert paper.pair_stats[pid][key] == pytest.approx(given.pair_stats[pid][key], abs=1e-5)
        assert paper.pair_stats[pid]["low_confidence"] == given.pair_stats[pid]["low_confidence"]


def test_sft_reference_log_probs_are_the_ones_in_the_margin(tmp_path):
    tok, model = tiny_tokenizer(), _moved(tiny_model())
    pairs = tiny_pairs(4)
    trainer = _trainer(tmp_path, model, tok, pairs)
    batch = _batch(trainer, 4)
    counts = batch["completion_mask"][:, 1:].sum(-1).tolist()
    # Made-up pi_init log-probs, far from the model's own: the loss must follow them.
    table = {p["pair_id"]: {"chosen": -20.0 - i, "rejected": -25.0 + 2 * i, "chosen_tokens": counts[i],
                            "rejected_tokens": counts[4 + i]} for i, p in enumerate(pairs)}
    trainer.ref_logps = table
    model.train()
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        pol = sequence_logps(logits, batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:])
    ref_c = torch.tensor([table[p["pair_id"]]["chosen"] for p in pairs])
    ref_r = torch.tensor([table[p["pair_id"]]["rejected"] for p in pairs])
    by_hand, *_ = dpo_losses(pol[:4], pol[4:], ref_c, ref_r, 0.1)
    assert loss.item() == pytest.approx(by_hand.mean().item(), abs=1e-6)
    for i, p in enumerate(pairs):
        assert trainer.pair_stats[p["pair_id"]]["loss"] == pytest.approx(by_hand[i].item(), abs=1e-6)
    # Scored on other tokens than the trainer sees: refused, not silently wrong.
    table[pairs[2]["pair_id"]]["rejected_tokens"] += 1
    with pytest.raises(RunError, match="other response tokens"):
        trainer.compute_loss(model, batch)
    del table[pairs[2]["pair_id"]]
    with pytest.raises(RunError, match="no precomputed reference"):
        trainer.compute_loss(model, batch)


def test_extrapolated_margin_with_given_reference():
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(4, 5, 11, generator=g), torch.randn(4, 5, 11, generator=g)
    labels, mask = torch.randint(0, 11, (4, 5), generator=g), torch.ones(4, 5, dtype=torch.bool)
    plain = extrapolated_margin(pol, ref, labels, mask, beta=0.1, lam=0.5, vocab_chunk=4)
    own = extrapolated_margin(pol, ref, labels, mask, beta=0.1, lam=0.5, vocab_chunk=4,
                              ref_logps=sequence_logps(ref, labels, mask))
    assert torch.equal(plain, own)  # off: the adapter-off log-probs, as before
    shifted = extrapolated_margin(pol, ref, labels, mask, beta=0.1, lam=0.5, vocab_chunk=4,
                                  ref_logps=sequence_logps(ref, labels, mask) + torch.tensor([1.0, 0, 0, 2.0]))
    # rows: chosen 0, 1 then rejected 0, 1: pair 0 loses beta * 1 (its chosen ref rose), pair 1 gains beta * 2
    assert torch.allclose(shifted, plain + 0.1 * torch.tensor([-1.0, 2.0]))


# ---------------------------------------------------------------------------------------------
# consistency (CREAM)


def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    assert kendall_tau([1.0, 2.0], [5.0, 5.0]) == 0.0  # the only pair ties: no order to agree on
    # tau-b with a tie in one scoring: (C - D) / sqrt((n0 + tx)(n0 + ty)) = (2 - 0) / sqrt(2 * 3)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 6 ** 0.5)


def _judged(rewards_by_prompt):
    return [{"pair_id": pid, "rewards": rw} for pid, rw in rewards_by_prompt.items()]


def test_consistency_smoothing_per_pair_and_per_round():
    pairs = _judged({0: [2.0, 1.0], 1: [0.5, 3.0], 2: [1.0, 2.0, 3.0, 4.0]})
    previous = {0: [1.5, -1.0], 1: [0.9, 0.1], 2: [1.0, 2.0, 4.0, 3.0]}  # agrees, reversed, tau 2/3
    a, m = consistency_smoothing(pairs, previous, "pair")
    # C = (tau + 1) / 2, a = min(0.5, 1 - C): agreeing -> 0; reversed -> C = 0, capped at 0.5; tau 2/3 -> 1/6
    assert a == {0: 0.0, 1: 0.5, 2: pytest.approx(1 / 6)}
    assert m["mean_consistency"] == pytest.approx((1 + 0 + 5 / 6) / 3) and m["disagreeing"] == pytest.approx(1 / 3)
    r, m2 = consistency_smoothing(pairs, previous, "round")  # CREAM's form: one a for the round
    assert list(r.values()) == pytest.approx([1 - m["mean_consistency"]] * 3) and m2["mode"] == "round"
    same, m3 = consistency_smoothing(pairs, {k: [2 * x for x in p["rewards"]] for k, p in
                                             zip((0, 1, 2), pairs, strict=True)}, "pair")
    assert set(same.values()) == {0.0} and m3["mean_consistency"] == 1.0  # two judges in full accord: no smoothing


def test_given_pair_smoothing_replaces_the_low_confidence_pick(tmp_path):
    tok, model = tiny_tokenizer(), _moved(tiny_model())
    pairs = tiny_pairs(8)
    given = {p["pair_id"]: a for p, a in zip(pairs, [0.0, 0.5, 0.25, 0.0, 0.1, 0.0, 0.0, 0.5], strict=True)}
    del given[pairs[6]["pair_id"]]  # a pair without a value (a replayed human pair): not smoothed
    # The paper's pick would smooth every pair (frac 1, no warm-up); the given values win.
    refine = RefineConfig(alpha=0.1, low_conf_frac=1.0, warmup_frac=0.5, window_pairs=50, vocab_chunk=100)
    with_given = [dict(p, smoothing=given[p["pair_id"]]) if p["pair_id"] in given else p for p in pairs]
    trainer = _trainer(tmp_path, model, tok, pairs, smoother=smoothing_of(refine, 0.0, with_given))
    assert isinstance(trainer.smoother, Consistency)
    model.train()
    batch = _batch(trainer, 8)
    loss = trainer.compute_loss(model, batch)
    stats = trainer.pair_stats
    for p in pairs:
        assert stats[p["pair_id"]]["smoothing"] == pytest.approx(given.get(p["pair_id"], 0.0))
        assert stats[p["pair_id"]]["smoothed"] == (given.get(p["pair_id"], 0.0) > 0)
    # The loss is dpo_losses with exactly those per-pair a's.
    with torch.no_grad(), model.disable_adapter():
        ref = sequence_logps(model(input_ids=batch["input_ids"]).logits[:, :-1], batch["input_ids"][:, 1:],
                             batch["completion_mask"][:, 1:])
    with torch.no_grad():
        pol = sequence_logps(model(input_ids=batch["input_ids"]).logits[:, :-1], batch["input_ids"][:, 1:],
                             batch["completion_mask"][:, 1:])
    a = torch.tensor([given.get(p["pair_id"], 0.0) for p in pairs])
    by_hand, *_ = dpo_losses(pol[:8], pol[8:], ref[:8], ref[8:], 0.1, a)
    assert loss.item() == pytest.approx(by_hand.mean().item(), abs=1e-6)
    assert trainer.smoothed_after_warmup == 4 and trainer.seen_after_warmup == 8  # no warm-up for given values


def test_every_counter_measure_off_trains_on_the_judged_pairs_as_they_are(tmp_path):
    from selfie_lite.config import load_config
    from selfie_lite.robust import training_pairs
    from selfie_lite.rundir import atomic_write_jsonl
    from selfie_lite.stage import Round

    cfg = load_config(None, None, [{"method": "paper"}])
    pairs = _self_pairs(5)
    atomic_write_jsonl(tmp_path / "round-2" / "judged.jsonl", pairs)
    atomic_write_jsonl(tmp_path / "data" / "seed.jsonl", _seed_pairs(4))
    assert training_pairs(Round(cfg, tmp_path, 2, None, tmp_path)) == pairs  # the paper's set, bitwise
    on = load_config(None, None, [])  # the default: gold replay 0.5 adds as many human pairs (here: all 4)
    assert training_pairs(Round(on, tmp_path, 2, None, tmp_path)) == gold_replay(pairs, _seed_pairs(4), 0.5,
                                                                                 on.random_seed, 2)


# ---------------------------------------------------------------------------------------------
# End to end: all four on, tiny preset, small pools


def test_a_tiny_run_with_every_counter_measure_on(tiny_preset, tmp_path):
    import json

    from typer.testing import CliRunner

    from selfie_lite.cli import app

    out = tmp_path / "run"
    on = ["--set", "robust.gold_replay=0.5", "--set", "robust.lr_decay=0.5", "--set", "robust.length_debias=true",
          "--set", "robust.train_reference='sft'", "--set", "robust.consistency='pair'"]
    r = CliRunner().invoke(app, ["run", *TWO_ROUNDS, "--set", "guard.select='last'", *on, "--out", str(out)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["robust"] == {"gold_replay": 0.5, "lr_decay": 0.5, "length_debias": True, "train_reference": "sft",
                             "consistency": "pair", "max_steps": 0, "margin_keep": 1.0,
                             "anchor_rejected": False}
    lr = cfg["train"]["learning_rate"]
    assert json.loads((out / "round-0" / "done" / "train.json").read_text())["learning_rate"] == lr
    for i in (1, 2):
        rd = out / f"round-{i}"
        judge = json.loads((rd / "done" / "judge.json").read_text())
        train = json.loads((rd / "done" / "train.json").read_text())
        assert math.isfinite(judge["length_penalty"]) and abs(judge["length_gap"]) <= abs(judge["length_gap_undebiased"])
        assert train["learning_rate"] == pytest.approx(lr * 0.5 ** (i - 1))
        assert train["train_reference"] == "given" and (rd / "train_reference_logps.json").is_file()
        assert (rd / "done" / "reference.json").is_file()
        pairs = [json.loads(x) for x in (rd / "pairs.jsonl").read_text().splitlines()]
        gold = [p for p in pairs if p.get("gold")]
        assert train["gold_pairs"] == len(gold) == min(48, judge["pairs"]) > 0
        assert train["pairs"] == judge["pairs"] + len(gold)
        assert not any(p["smoothed"] for p in gold) and all(p["pair_id"] < 0 for p in gold)
        table = json.loads((rd / "train_reference_logps.json").read_text())
        assert {int(k) for k in table} == {p["pair_id"] for p in pairs}
        # consistency: round 1 keeps the paper's pick (no previous judge); round 2's pairs carry CREAM's a
        assert train["smoothing_source"] == ("low-confidence" if i == 1 else "consistency")
        assert (rd / "done" / "consistency.json").is_file() == (i == 2)
        if i == 2:
            given = {int(k): v for k, v in json.loads((rd / "consistency.json").read_text()).items()}
            assert {p["pair_id"]: p["smoothing"] for p in pairs if not p.get("gold")} == pytest.approx(given)
            assert all(0.0 <= a <= 0.5 for a in given.values()) and all(p["smoothing"] == 0 for p in gold)
