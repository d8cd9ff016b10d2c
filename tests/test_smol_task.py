"""The smol preset's task, checker, writers and gold-set builder (selfie_lite/smol), and its scorer in eval.

Everything here runs offline in seconds: the builder is exercised on the toy model (selfie_lite.testing), not on
SmolLM2 (the real model's tests are tests/test_real_model.py)."""

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

from selfie_lite.errors import UserError
from selfie_lite.smol import build as smol_build
from selfie_lite.smol import checker, task, writers
from selfie_lite.smol.build import BuildSizes, build_key, build_smol, generate_prompts
from selfie_lite.testing import build_toy_model

BASE = "Explain sleep in simple terms."
I = {kind: " " + text for kind, text in task.INSTRUCTIONS.items()}  # noqa: E741  the instruction sentences


def prompt(*parts: str) -> str:
    return BASE + "".join(parts)


# ---------------------------------------------------------------------------------------------
# Prompts: generated deterministically, parsed back from the text alone


def test_generated_prompts_parse_back_to_what_was_generated():
    rng = random.Random(1)
    seen_kinds, counts = set(), set()
    for _ in range(2000):
        p = task.make_prompt(rng)
        assert task.parse_prompt(p.text()) == p
        assert task.parse_prompt("  " + p.text() + "\n") == p  # surrounding whitespace is not part of the prompt
        kinds = [i.kind for i in p.instructions]
        assert len(set(kinds)) == len(kinds)
        assert not any(frozenset((a, b)) in task.CONFLICTS for a in kinds for b in kinds if a != b)
        if "forbid" in kinds:  # the forbidden word is the topic's own word
            assert p.instructions[kinds.index("forbid")].args["word"] == p.topic.split()[-1]
        seen_kinds.update(kinds)
        counts.add(len(kinds))
    assert seen_kinds == set(task.KINDS) and counts == {1, 2}


def test_generation_is_deterministic_and_held_out_prompts_are_held_out():
    sizes = BuildSizes(n_bases=20, per_base=4, n_eval=30, n_val=30)
    a, b = generate_prompts(sizes), generate_prompts(sizes)
    assert a == b
    assert generate_prompts(BuildSizes(n_bases=20, per_base=4, n_eval=30, n_val=30, seed=1)) != a
    gold = [p for group in a["gold"] for p in group]
    assert len(gold) == len(set(gold)) == 80 and len(a["eval"]) == len(a["val"]) == 30
    assert not set(gold) & set(a["eval"]) and not set(gold) & set(a["val"]) and not set(a["eval"]) & set(a["val"])
    for (request, topic), group in zip(a["bases"], a["gold"], strict=True):  # a base's prompts share its request
        assert all(task.parse_prompt(p).base == request.format(t=topic) for p in group)


def test_parse_prompt_reads_any_topic_and_refuses_what_is_not_ours():
    p = task.parse_prompt("Why is quantum physics important? Answer with less than 20 words.")
    assert (p.topic, p.instructions) == ("quantum physics", (task.Instruction("max_words", {"n": 20}),))
    p = task.parse_prompt(prompt(I["include"].format(w="happy"), I["end"].format(p="Hope this helps.")))
    assert [(i.kind, i.args) for i in p.instructions] == [("include", {"word": "happy"}),
                                                          ("end", {"phrase": "Hope this helps."})]
    bad = [
        BASE,  # no instruction
        prompt(" Answer with less than 20 words.", " Answer with less than 20 words."),  # the same one twice
        "Explain sleep. Answer with less than 20 words.",  # not one of our requests
        prompt(" Answer with less than 0 words."),
        prompt(" Answer with less than 20 words. Thanks!"),  # something after the instructions
        prompt(" answer with less than 20 words."),
        "Add 3 and 5.",  # a tiny-preset prompt
        "",
    ]
    for text in bad:
        with pytest.raises(ValueError, match="not a smol-preset prompt"):
            task.parse_prompt(text)


# ---------------------------------------------------------------------------------------------
# The checks, on hand-written responses (IFEval's semantics)

CHECKS = [
    # instruction kind, its sentence, responses that follow it, responses that do not
    ("lowercase", I["lowercase"], ["sleep helps your body rest.", "  sleep is good.\n", "<<sleep>>\n* rest well, 8 hours"],
     ["Sleep helps.", "sleep helps. I know.", "", "123 ..."]),
    ("capital", I["capital"], ["SLEEP HELPS YOUR BODY REST.", "SLEEP, 8 HOURS!\n"], ["SLEEP helps", "", "123"]),
    ("max_words", I["max_words"].format(n=5), ["Sleep helps you rest.", "Rest.  \n", ""],
     ["Sleep helps you rest well.", "Sleep helps, don't stop."]),  # IFEval counts \w+ runs: don't = 2 words
    ("min_words", I["min_words"].format(n=5), ["Sleep helps you rest well.", "Sleep helps, don't stop."],
     ["Sleep helps you rest.", "a-b-c-d", ""]),
    ("include", I["include"].format(w="happy"), ["It makes me HAPPY.", "An unhappy night."],  # any case, any part of a word
     ["It makes me glad.", "hap py", ""]),
    ("forbid", I["forbid"].format(w="sleep"), ["Rest well.", "Sleeping is good.", ""],  # whole words only
     ["SLEEP well.", "Good sleep.", "sleep"]),
    ("end", I["end"].format(p="Any other questions?"),
     ["Sleep well. Any other questions?", "Sleep well. any other questions?  \n", '"Sleep well. Any other questions?"'],
     ["Any other questions? Bye.", "Sleep well. Any other questions", ""]),
    ("quotes", I["quotes"], ['"Sleep well."', '  "Sleep well."\n', '""'], ['"Sleep well.', 'Sleep "well"', '"', ""]),
    ("bullets", I["bullets"].format(n=3), ["* a\n* b\n* c", "Intro:\n* a\n* b\n- c", "  * a\n* b\n* c\n"],
     ["* a\n* b", "1. a\n2. b\n3. c", "* a\n* b\n* c\n* d", "**bold**\n* a\n* b", ""]),
    ("title", I["title"], ["<<Sleep>>\nRest well.", "Rest. <<Good Sleep>>"],
     ["<<>>\nRest.", "<< >>", "<Sleep>", "<<Sleep\n>>", "Title: Sleep", ""]),
    ("no_comma", I["no_comma"], ["Sleep well.", ""], ["Sleep, then rest.", ","]),
    ("json", I["json"], ['{"answer": "rest"}', '```json\n{"a": 1}\n```', "```\n[1, 2]\n```  ", '"rest"'],
     ['{"answer": "rest"', "answer: rest", "", "```json\n```"]),
]


def test_every_kind_has_hand_written_cases():
    assert [c[0] for c in CHECKS] == list(task.KINDS)


@pytest.mark.parametrize("kind,sentence,good,bad", CHECKS, ids=[c[0] for c in CHECKS])
def test_each_check_on_hand_written_responses(kind, sentence, good, bad):
    p = prompt(sentence)
    for r in good:
        assert checker.score_details(p, r) == {"kinds": [kind], "met": [True], "score": 1.0, "strict": True}, r
    for r in bad:
        assert checker.score(p, r) == 0.0, r


def test_two_instructions_score_the_share_met_and_the_figures_add_up():
    two = prompt(I["lowercase"], I["end"].format(p="Hope this helps."))
    assert checker.score(two, "sleep well. hope this helps.") == 1.0
    assert checker.score_details(two, "Sleep well. Hope this helps.") == {
        "kinds": ["lowercase", "end"], "met": [False, True], "score": 0.5, "strict": False}
    assert checker.score(two, "Sleep well.") == 0.0
    one = prompt(I["no_comma"])
    s = checker.summarize([two, two, one], ["Sleep well. Hope this helps.", "sleep well. hope this helps.", "A, b"])
    assert s["constraint_accuracy"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert s["instruction_accuracy"] == pytest.approx(3 / 5)  # pooled: 1 + 2 + 0 of 2 + 2 + 1 instructions
    assert s["strict_accuracy"] == pytest.approx(1 / 3)
    assert s["mean_words"] == pytest.approx((5 + 5 + 2) / 3)
    assert s["by_kind"] == {"end": 1.0, "lowercase": 0.5, "no_comma": 0.0}
    with pytest.raises(ValueError):
        checker.score("Add 3 and 5.", "8")


def test_ifeval_scorer_is_registered_and_refuses_foreign_prompts():
    from selfie_lite.scorers import parse_scorer

    s = parse_scorer("ifeval")
    p = prompt(I["no_comma"])
    s.check([p])
    assert s.score([p, p], ["Sleep well.", "Sleep, well."]) == [1.0, 0.0]
    assert s.good_score == 1.0 and s.metrics([p], ["Sleep well."])["strict_accuracy"] == 1.0
    with pytest.raises(UserError, match="only the smol preset's prompts"):
        s.check([p, "Add 3 and 5."])


# ---------------------------------------------------------------------------------------------
# Writers

SOURCES = [
    "Sleep is the time when your body rests, and your brain sorts out the day. Most adults need seven to nine hours "
    "of sleep. Without enough sleep, you feel tired and",
    "* Go to bed at the same time.\n* Keep your room dark, cool and quiet.\n* Avoid screens before bed.\n* Do",
    '"Sleep matters because it lets the body repair itself."',
    "1. Rest\n2.",
    "",
    "SLEEP!!!",
]


def test_the_careful_writer_follows_every_instruction_and_the_others_are_labelled_by_the_checker():
    rng = random.Random(0)
    met = {w: [] for w in writers.WRITERS}
    for k in range(400):
        p = task.make_prompt(rng)
        source = SOURCES[k % len(SOURCES)]
        assert checker.score_details(p.text(), writers.careful(p, source, rng))["strict"], (p.text(), source)
        for w in writers.WRITERS:
            met[w].append(checker.score(p.text(), writers.write(w, p, source, rng)))
    mean = {w: sum(v) / len(v) for w, v in met.items()}
    assert mean["careful"] == 1.0
    assert mean["careless"] < mean["partial"] < mean["careful"] and mean["policy"] < mean["careful"]


def test_drop_unfinished_cuts_what_the_token_limit_cut_off():
    assert writers.drop_unfinished("Sleep well. Then") == "Sleep well."
    assert writers.drop_unfinished("<<Sleep>>\n\nRest now. The night") == "<<Sleep>>\n\nRest now."
    assert writers.drop_unfinished("* Rest.\n* Sleep early\n3.") == "* Rest."
    assert writers.drop_unfinished("No end here") == "No end here"  # nothing finished to fall back on
    assert writers.drop_unfinished("Done.  ") == "Done."


# ---------------------------------------------------------------------------------------------
# The builder, on the toy model

SMALL = BuildSizes(n_bases=8, per_base=3, n_eval=6, n_val=6, max_new_tokens=12, batch_size=8)


@pytest.fixture(scope="module")
def toy_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    model = build_toy_model(root / "model")
    stages = []
    preset = build_smol(model, progress=lambda s, f: stages.append((s, f)), cache_dir=root / "cache", sizes=SMALL)
    return root, model, preset, stages


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_writes_the_gold_set_and_prompts(toy_build):
    root, model, preset, stages = toy_build
    rows = _rows(preset.preferences)
    m = preset.manifest
    assert m["labels"]["pairs"] == len(rows) > 0 and len(rows) + m["labels"]["dropped_ties"] == 8 * 3
    assert len(_rows(preset.eval_prompts)) == len(_rows(preset.val_prompts)) == 6
    assert len(_rows(preset.root / "sft_samples.jsonl")) == m["sampling"]["prompts"] == 8
    assert preset.model_dir == model.resolve() and preset.root.parent == root / "cache"
    assert m["files"]["preferences.jsonl"]["sha256"] == hashlib.sha256(preset.preferences.read_bytes()).hexdigest()
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and stages[-1] == ("done", 1.0)
    # The project's loader takes the file as it is: no bad rows, nothing dropped as identical.
    from selfie_lite.data import drop_identical, load_rows, validate_rows

    good, bad = validate_rows(load_rows(str(preset.preferences), "train"), 0.0, "gold")
    assert not bad and drop_identical(good)[1] == 0 and len(good) == len(rows)


def test_gold_labels_are_the_checkers(toy_build):
    _, _, preset, _ = toy_build
    rows = _rows(preset.preferences)
    for r in rows:
        assert r["score_chosen"] == checker.score(r["prompt"], r["chosen"]) == preset.score(r["prompt"], r["chosen"])
        assert r["score_rejected"] == checker.score(r["prompt"], r["rejected"])
        assert r["score_chosen"] > r["score_rejected"] and r["chosen"].strip() != r["rejected"].strip()
        assert r["chosen"].strip() and r["rejected"].strip()
        assert {r["writer_chosen"], r["writer_rejected"]} <= set(writers.WRITERS)
    stats = smol_build.label_stats(rows, 0)
    assert stats["mean_score_chosen"] > stats["mean_score_rejected"]
    # The toy model's own answers (the policy writer) are among the candidates, as in the real build.
    samples = {r["response"].strip() for r in _rows(preset.root / "sft_samples.jsonl")}
    policy = [r[side] for r in rows for side in ("chosen", "rejected") if r[f"writer_{side}"] == "policy"]
    assert policy and all(text in samples for text in policy)


def test_build_is_cached_and_deterministic(toy_build, monkeypatch, tmp_path):
    root, model, preset, _ = toy_build

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt a cached build")

    monkeypatch.setattr(smol_build, "_build_into", no_rebuild)
    again = build_smol(model, cache_dir=root / "cache", sizes=SMALL)
    assert again.root == preset.root and again.manifest == preset.manifest
    monkeypatch.undo()
    # The same model copied elsewhere: the same key (its content, not its path), the same bytes when built afresh.
    copy = shutil.copytree(model, tmp_path / "copy")
    assert build_key(copy, SMALL) == build_key(model, SMALL)
    fresh = build_smol(copy, cache_dir=tmp_path / "cache", sizes=SMALL)
    for name in ("preferences.jsonl", "eval_prompts.jsonl", "val_prompts.jsonl", "sft_samples.jsonl"):
        assert (fresh.root / name).read_bytes() == (preset.root / name).read_bytes(), name
    # Another model, or other sizes: another build.
    other = build_toy_model(tmp_path / "other", seed=1)
    assert build_key(other, SMALL) != build_key(model, SMALL)
    assert build_key(model, BuildSizes(n_bases=9)) != build_key(model, SMALL)


# ---------------------------------------------------------------------------------------------
# Eval of a smol run: its eval prompts and the ifeval scorer by default


def test_eval_of_a_smol_run_uses_its_prompts_and_checker(toy_build, tmp_path):
    from selfie_lite import api

    _, model, _, _ = toy_build
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "builtin:smollm2", "data": {"source": "builtin:smol"},
                                                 "sample": {"max_new_tokens": 6, "batch_size": 4}}))
    (run / "data" / "split.json").write_text(json.dumps({"sft_model": str(model)}))
    shutil.copytree(model, run / "round-0" / "model")
    (run / "round-0" / "done").mkdir()
    (run / "round-0" / "done" / "merge.json").write_text("{}")
    plan = api.plan_evaluation([run], limit=3)
    assert plan.scorer.name == "ifeval" and plan.gold is checker.score
    assert plan.prompts == generate_prompts()["eval"][:3] and plan.record["prompts_file"] == "smol eval prompts"
    assert plan.baseline == model
    result = api.evaluate(plan).result
    for name in ("sft", "round-0"):
        m = result["models"][name]
        assert {"constraint_accuracy", "instruction_accuracy", "strict_accuracy", "by_kind"} <= set(m)
        assert m["constraint_accuracy"] == pytest.approx(m["mean_score"])
        assert m["strict_accuracy"] == pytest.approx(m["frac_good"])
