"""Sampling and judging stages on the tiny SFT model."""

import json

import pytest

from selfie_lite.backends.hf import HFBackend
from selfie_lite.config import load_config, parse_override
from selfie_lite.judge import flat_sequences, judge_round


@pytest.fixture(scope="module")
def loaded(tiny_preset):
    be = HFBackend(load_config("tiny"))
    model, tok = be.load(tiny_preset.model_dir)
    prompts = [json.loads(line)["prompt"] for line in tiny_preset.val_prompts.read_text().splitlines()[:12]]
    return be, model, tok, prompts


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (0.3, 0.5)])
def test_log_probs_from_sampling_equal_a_separate_forward_pass(loaded, temperature, top_p):
    be, model, tok, prompts = loaded
    rows = be.generate(model, tok, prompts, num_samples=2, temperature=temperature, top_p=top_p, max_new_tokens=24,
                       batch_size=5, seed=3)
    one_pass = [lp for r in rows for lp in r["policy_logps"]]
    two_pass = be.sequence_logps(model, flat_sequences(rows), batch_size=7)
    # Log-probs of the model itself (not of the tempered / top-p distribution it was sampled from).
    assert one_pass == pytest.approx(two_pass, abs=2e-3)
    assert all(lp < 0 for lp in one_pass)


def test_sampling_is_seeded_and_trims_at_end_of_sequence(loaded):
    be, model, tok, prompts = loaded
    kw = dict(num_samples=2, temperature=0.7, top_p=1.0, max_new_tokens=24, batch_size=4)
    a = be.generate(model, tok, prompts, seed=1, **kw)
    b = be.generate(model, tok, prompts, seed=1, **kw)
    c = be.generate(model, tok, prompts, seed=2, **kw)
    assert [r["response_ids"] for r in a] == [r["response_ids"] for r in b]
    assert [r["response_ids"] for r in a] != [r["response_ids"] for r in c]
    for r in a:
        for ids in r["response_ids"]:
            assert tok.eos_token_id not in ids[:-1]  # nothing after the end of the answer
            assert len(ids) <= 24


def test_judge_with_and_without_the_sampling_shortcut_agree(loaded, tmp_path):
    be, model, tok, prompts = loaded
    rows = be.generate(model, tok, prompts, num_samples=3, temperature=1.0, top_p=1.0, max_new_tokens=24,
                       batch_size=6, seed=5)
    for i, r in enumerate(rows):
        r["id"] = i
    cfg = load_config("tiny")
    cfg_two = load_config("tiny", None, [parse_override("judge.policy_from_sampling=false")])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # A reference that differs from the policy (the SFT weights, perturbed), so that rewards are not all zero.
    import torch

    policy_dir, ref_dir = tok.name_or_path, tmp_path / "ref"
    ref_model, ref_tok = be.load(policy_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref_model.save_pretrained(ref_dir)
    ref_tok.save_pretrained(ref_dir)
    pairs_one, m_one = judge_round(cfg, tmp_path / "a", be, rows, policy_dir, ref_dir)
    pairs_two, m_two = judge_round(cfg_two, tmp_path / "b", be, rows, policy_dir, ref_dir)
    assert m_one["policy_from_sampling"] and not m_two["policy_from_sampling"]
    assert [(p["chosen"], p["rejected"]) for p in pairs_one] == [(p["chosen"], p["rejected"]) for p in pairs_two]
    assert [p["reward_chosen"] for p in pairs_one] == pytest.approx([p["reward_chosen"] for p in pairs_two], abs=1e-3)
    assert not (tmp_path / "a" / "policy_logps.json").exists() and (tmp_path / "b" / "policy_logps.json").exists()
