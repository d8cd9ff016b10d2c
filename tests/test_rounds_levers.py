"""The levers for later rounds (docs/method.md (E12, E13), "Rounds beyond the pools"): each OFF value is bitwise
today's pairs and loss, each ON value does what it says on a hand-made batch; rounds = 5 with the prompts left over
(and a clear error when they do not fit); the round guard still stops a scripted drifting round of a 5-round run
(FakeBackend)."""

import json

import pytest
import torch
from conftest import fake_run, tiny_model, tiny_pairs, tiny_tokenizer, tiny_train_config, toy_config

from selfie_lite.config import DataConfig, RobustConfig, load_config, parse_override
from selfie_lite.data import pool_sizes, split_rows
from selfie_lite.errors import UserError
from selfie_lite.robust import round_lambda, round_max_steps, select_by_margin, training_pairs
from selfie_lite.rundir import atomic_write_jsonl
from selfie_lite.stage import Round
from selfie_lite.testing import FakeBackend, hashed_logp
from selfie_lite.train import train_dpo

TRAIN = tiny_train_config()


def _lora(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def _judged(margins: list[float]) -> list[dict]:
    return [{"pair_id": i, "prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "reward_chosen": m,
             "reward_rejected": 0.0, "rewards": [m, 0.0]} for i, m in enumerate(margins)]


# ---------------------------------------------------------------------------------------------
# Settings: off values are today's, and method = paper keeps them off


def test_new_settings_default_off_and_method_paper_refuses_them():
    cfg = load_config()
    assert cfg.robust.max_steps == 0 and cfg.robust.margin_keep == 1.0 and cfg.data.extra_pools == "off"
    assert RobustConfig().max_steps == 0 and DataConfig().extra_pools == "off"
    paper = load_config(None, None, [{"method": "paper"}])
    assert paper.robust.max_steps == 0 and paper.robust.margin_keep == 1.0
    for o in ("robust.max_steps=10", "robust.margin_keep=0.5"):
        with pytest.raises(UserError, match="method = paper runs the paper's loop exactly"):
            load_config(None, None, [{"method": "paper"}, parse_override(o)])


@pytest.mark.parametrize("override,message", [
    ("robust.max_steps=-1", "robust.max_steps must be >= 0, got -1"),
    ("robust.margin_keep=0", "robust.margin_keep must be in (0, 1], got 0"),
    ("robust.margin_keep=1.5", "robust.margin_keep must be in (0, 1], got 1.5"),
    ("data.extra_pools='more'", "data.extra_pools must be one of off, last, rest, got 'more'"),
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(UserError) as e:
        load_config(None, None, [parse_override(override)])
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------
# Step budget (robust.max_steps)


def test_round_max_steps():
    assert [round_max_steps(0, i) for i in range(6)] == [-1] * 6  # off: the epochs decide, every round
    assert [round_max_steps(7, i) for i in range(4)] == [-1, 7, 7, 7]  # never the seed round


def test_step_budget_off_or_above_the_epochs_is_bitwise_todays_training(tmp_path):
    """16 pairs, batch 4 x accumulation 2: 2 steps per epoch, 4 in 2 epochs. A budget of 4 or more caps nothing and
    must train exactly as no budget does (the trainer would otherwise loop over the pairs past its epochs)."""
    runs = []
    for max_steps in (-1, 4, 100):
        model = tiny_model()
        res = train_dpo(model, tiny_tokenizer(), tiny_pairs(16), beta=0.1, train=TRAIN,
                        epochs=2, out_dir=tmp_path, seed=0, max_steps=max_steps)
        runs.append((res.metrics, _lora(model)))
    (m0, w0), *others = runs
    assert m0["steps"] == 4
    for m, w in others:
        assert m["steps"] == 4 and m["loss_curve"] == m0["loss_curve"]
        assert all(torch.equal(w0[k], w[k]) for k in w0)


def test_step_budget_stops_the_round_early(tmp_path):
    """3 of the 4 steps the epochs give: the round stops after 3 (the schedule runs over those 3)."""
    weights = []
    for max_steps in (-1, 3):
        model = tiny_model()
        before = _lora(model)
        res = train_dpo(model, tiny_tokenizer(), tiny_pairs(16), beta=0.1, train=TRAIN,
                        epochs=2, out_dir=tmp_path, seed=0, max_steps=max_steps)
        weights.append(_lora(model))
        assert any(not torch.equal(before[k], v) for k, v in weights[-1].items())  # it did train
    assert res.metrics["steps"] == 3 and len(res.metrics["loss_curve"]) == 3
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ---------------------------------------------------------------------------------------------
# Margin selection (robust.margin_keep)


def test_margin_selection_keeps_the_largest_margins_in_order():
    pairs = _judged([0.5, 3.0, -1.0, 2.0, 2.0, 0.1])
    assert select_by_margin(pairs, 1.0) is pairs  # off: the judged pairs themselves
    kept = select_by_margin(pairs, 0.5)  # 3 of 6: margins 3.0, 2.0, 2.0 (ids 1, 3, 4), in their order
    assert [p["pair_id"] for p in kept] == [1, 3, 4]
    assert [p["pair_id"] for p in select_by_margin(pairs, 0.3)] == [1, 3]  # ceil(1.8) = 2; the tie to the lower id
    assert [p["pair_id"] for p in select_by_margin(pairs, 0.01)] == [1]  # never empty
    assert select_by_margin([], 0.5) == []


def test_margin_selection_in_the_training_set(tmp_path):
    """Off: the default's training set, bitwise. On: the kept self-labels, and gold replay follows their count."""
    judged = _judged([0.5, 3.0, -1.0, 2.0])
    atomic_write_jsonl(tmp_path / "round-2" / "judged.jsonl", judged)
    atomic_write_jsonl(tmp_path / "data" / "seed.jsonl",
                       [{"pair_id": k, "prompt": f"s{k}", "chosen": "good", "rejected": "bad"} for k in range(10)])
    default = load_config()
    same = load_config(None, None, [parse_override("robust.margin_keep=1.0")])
    assert training_pairs(Round(same, tmp_path, 2, None, tmp_path)) == \
        training_pairs(Round(default, tmp_path, 2, None, tmp_path))
    on = load_config(None, None, [parse_override("robust.margin_keep=0.5")])
    pairs = training_pairs(Round(on, tmp_path, 2, None, tmp_path))
    assert [p["pair_id"] for p in pairs if not p.get("gold")] == [1, 3]
    assert sum(bool(p.get("gold")) for p in pairs) == 2  # gold replay 0.5: as many human pairs as kept self-labels


# ---------------------------------------------------------------------------------------------
# Rounds beyond the listed pools (data.extra_pools) and noise detection's lam there


def test_extra_pools_off_refuses_as_before_and_last_or_rest_fill_the_rounds():
    with pytest.raises(UserError, match="5 rounds need 5 prompt pools but data.pool_sizes has 3"):
        load_config(None, None, [{"rounds": 5, "data": {"pool_sizes": [400, 1000, 1500]}}])
    with pytest.raises(UserError, match="data.extra_pools = last extends data.pool_sizes, which is not set"):
        load_config(None, None, [{"rounds": 5, "data": {"extra_pools": "last"}}])
    last = DataConfig(pool_sizes=[400, 400, 400], extra_pools="last")
    assert pool_sizes(5302, last, 5) == [400] * 5
    rest = DataConfig(pool_sizes=[400, 1000, 1500], extra_pools="rest")
    assert pool_sizes(5302, rest, 5) == [400, 1000, 1500, 1201, 1201]  # the tiny preset: 2,402 prompts left
    assert pool_sizes(5302, rest, 3) == [400, 1000, 1500]  # as many pools as rounds: nothing extends
    assert pool_sizes(5302, DataConfig(pool_sizes=[400, 1000, 1500]), 3) == [400, 1000, 1500]


def test_extra_pools_that_do_not_fit_are_refused_with_the_sizes():
    with pytest.raises(UserError, match=r"pools of 400\+1000\+1500\+1500\+1500 = 5900 prompts do not fit: only 5302"):
        pool_sizes(5302, DataConfig(pool_sizes=[400, 1000, 1500], extra_pools="last"), 5)
    with pytest.raises(UserError, match=r"rounds 4-5 have no prompts left: the pools of data.pool_sizes "
                       r"\(400\+1000\+1500 = 2900\) leave 0 of the 2900 rows"):
        pool_sizes(2900, DataConfig(pool_sizes=[400, 1000, 1500], extra_pools="rest"), 5)
    with pytest.raises(UserError, match="leave 1 of the 2901 rows .* for 2 more round"):
        pool_sizes(2901, DataConfig(pool_sizes=[400, 1000, 1500], extra_pools="rest"), 5)


def test_the_first_pools_do_not_move_when_rounds_are_added():
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(300)]
    three = split_rows(rows, DataConfig(labelled_share="10", test_size=20, pool_sizes=[40, 40, 40]), 3, 7)
    five = split_rows(rows, DataConfig(labelled_share="10", test_size=20, pool_sizes=[40], extra_pools="last"), 5, 7)
    assert five.pools[:3] == three.pools and [len(p) for p in five.pools] == [40] * 5
    assert five.seed_pairs == three.seed_pairs and five.test_pairs == three.test_pairs


def test_round_lambda_follows_the_list_then_keeps_halving():
    lams = [0.5, 0.25, 0.125]
    assert [round_lambda(lams, i) for i in (1, 2, 3)] == lams  # today's values, bitwise
    assert [round_lambda(lams, i) for i in (4, 5)] == [0.0625, 0.03125]
    cfg = load_config(None, None, [{"rounds": 5, "data": {"pool_sizes": [40], "extra_pools": "last"}}])
    assert cfg.refine.lambdas == lams  # shorter than the rounds is accepted with extra pools


# ---------------------------------------------------------------------------------------------
# The loop: 5 rounds run while they help; the guard stops a scripted drifting round


def drift_at_round_5(tag: str, prompt_ids: list[int], response_ids: list[int]) -> float:
    """pi_0 .. pi_3 rank every sample set alike (pi_init flat); pi_4 reverses them: round 5's self-labels disagree
    with the seed-DPO judge on every pair, rounds 3 and 4's agree on all."""
    s = hashed_logp("x", prompt_ids, response_ids)
    return {"init": 0.0, "round-4": -s}.get(tag, s)


def test_five_rounds_run_until_the_guard_sees_drift(toy, tmp_path):
    cfg = toy_config(toy, rounds=5, data={"pool_sizes": [16], "extra_pools": "last"})
    out = tmp_path / "run"
    summary, _ = fake_run(cfg, toy, out, FakeBackend(cfg, logp=drift_at_round_5))
    assert json.loads((out / "data" / "split.json").read_text())["pools"] == [16] * 5
    for i in (3, 4):
        g = json.loads((out / f"round-{i}" / "done" / "guard.json").read_text())
        assert g["anchor_agreement"] == 1.0 and not g["stop"]
        assert (out / f"round-{i}" / "done" / "train.json").is_file()
    g5 = json.loads((out / "round-5" / "done" / "guard.json").read_text())
    assert g5["anchor_agreement"] == 0.0 and g5["stop"]
    assert not (out / "round-5" / "done" / "train.json").exists()  # stopped BEFORE training round 5
    assert summary["final_round"] == 4 and "round 5's self-labels agree" in summary["final_why"]
    # Noise detection's lam kept halving past the list (round 1 only here: consistency replaces it from round 2).
    assert json.loads((out / "round-1" / "done" / "train.json").read_text())["lam"] == 0.5


def test_a_step_budget_caps_every_self_labelled_round_in_a_run(toy, tmp_path):
    cfg = toy_config(toy, robust={"max_steps": 2})
    out = tmp_path / "run"
    fake_run(cfg, toy, out)
    steps = [json.loads((out / f"round-{i}" / "done" / "train.json").read_text())["steps"] for i in (0, 1, 2)]
    assert steps[0] > 2 and steps[1:] == [2, 2]  # the seed round is never capped


# ---------------------------------------------------------------------------------------------
# Anchored rejected responses (robust.anchor_rejected)


def _row(rid, responses, anchor_from=None):
    row = {"id": rid, "prompt": f"q{rid}", "prompt_ids": [1, 2], "responses": responses,
           "response_ids": [[10 + j] * (j + 1) for j in range(len(responses))]}
    return row if anchor_from is None else dict(row, anchor_from=anchor_from)


def test_anchored_rejected_picks_chosen_among_own_and_rejected_among_pi0s_samples():
    from selfie_lite.judge import judge_pairs

    # rewards = beta * (policy - ref) with ref 0, beta 1: own samples a (2.0), b (-3.0); pi_0's c (1.0), d (-1.0)
    plain, _ = judge_pairs([_row(0, ["a", "b", "c", "d"])], [2.0, -3.0, 1.0, -1.0], [0.0] * 4, 1.0)
    assert (plain[0]["chosen"], plain[0]["rejected"]) == ("a", "b")  # off: best and worst of all
    anchored, _ = judge_pairs([_row(0, ["a", "b", "c", "d"], anchor_from=2)], [2.0, -3.0, 1.0, -1.0], [0.0] * 4, 1.0)
    assert (anchored[0]["chosen"], anchored[0]["rejected"]) == ("a", "d")  # rejected: the worst of pi_0's
    assert anchored[0]["rewards"] == [2.0, -3.0, 1.0, -1.0]
    # An anchored sample scoring above every own one is still never chosen.
    top, _ = judge_pairs([_row(0, ["a", "b", "c", "d"], anchor_from=2)], [0.5, 0.2, 9.0, 3.0], [0.0] * 4, 1.0)
    assert (top[0]["chosen"], top[0]["rejected"]) == ("a", "d")


def test_anchor_samples_merge_into_the_rows_and_off_leaves_them_alone(tmp_path):
    from selfie_lite.loop import round_stages
    from selfie_lite.sample import load_samples, with_anchor_samples

    own = [dict(_row(i, ["x", "y"]), policy_logps=[-1.0, -2.0]) for i in range(3)]
    atomic_write_jsonl(tmp_path / "samples" / "chunk-00000.jsonl", own)
    assert load_samples(tmp_path) == own  # no anchor/ folder: the rows as sampled, bitwise
    anchor = [_row(i, ["u", "v"]) for i in range(3)]
    merged = with_anchor_samples(own, anchor)
    assert [m["responses"] for m in merged] == [["x", "y", "u", "v"]] * 3
    assert all(m["anchor_from"] == 2 and "policy_logps" not in m for m in merged)
    atomic_write_jsonl(tmp_path / "anchor" / "samples" / "chunk-00000.jsonl", anchor)
    assert load_samples(tmp_path) == merged
    assert "anchor" not in [n for n, _ in round_stages(load_config(), 2)]
    on = load_config(None, None, [parse_override("robust.anchor_rejected=true")])
    assert [n for n, _ in round_stages(on, 1)][:2] == ["sample", "judge"]  # round 1: pi_0 is the sampler itself
    assert [n for n, _ in round_stages(on, 2)][:3] == ["sample", "anchor", "judge"]


def test_a_run_with_anchored_rejected_responses(toy, tmp_path):
    cfg = toy_config(toy, robust={"anchor_rejected": True})
    out = tmp_path / "run"
    _, backend = fake_run(cfg, toy, out)
    from selfie_lite.sample import load_samples

    rd = out / "round-2"
    assert ("generate", "round-0") in backend.calls and (rd / "done" / "anchor.json").is_file()
    rows = {r["id"]: r for r in load_samples(rd)}
    pairs = [json.loads(x) for x in (rd / "judged.jsonl").read_text().splitlines()]
    assert pairs
    for p in pairs:
        r = rows[p["pair_id"]]
        a = r["anchor_from"]
        assert p["chosen"] in r["responses"][:a] and p["rejected"] in r["responses"][a:]
        assert p["reward_chosen"] == max(p["rewards"][:a])
