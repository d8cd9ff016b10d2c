"""The tiny preset: oracle, data generation, and one real build (the session's, unless a cache held one)."""

import json
import random
import time

import pytest

from selfie_lite.chat import chat_conversation_ids, chat_prompt_ids
from selfie_lite.rundir import read_jsonl
from selfie_lite.tiny import build, build_tiny, data_hash, default_cache_dir, generate_data, sft_report, task

# ---------------------------------------------------------------------------------------------
# Oracle on hand-written responses, one row per task kind

CASES = [
    # kind, prompt, true answer, a wrong answer
    ("add", "Add 3 and 5.", "8", "9"),
    ("add", "What is 7 plus 9?", "16", "15"),
    ("larger", "Which is larger, 4 or 17?", "17", "4"),
    ("sort", "Sort these digits: 4 1 3.", "1 3 4", "4 3 1"),
    ("count", "How many words are in: cat dog sun?", "3", "2"),
    ("reverse", "Reverse the order of: cat dog sun.", "sun dog cat", "cat dog sun"),
    ("upper", "Write fish in capital letters.", "FISH", "Fish"),
    ("repeat", "Repeat the word moon three times.", "moon moon moon", "moon moon"),
]


@pytest.mark.parametrize("kind,prompt,answer,wrong", CASES)
def test_oracle_parses_each_kind(kind, prompt, answer, wrong):
    parsed = task.parse_prompt(prompt)
    assert (parsed.kind, parsed.answer) == (kind, answer)


@pytest.mark.parametrize("kind,prompt,answer,wrong", CASES)
def test_oracle_scores_hand_written_responses(kind, prompt, answer, wrong):
    def verdict(response):
        d = task.score_details(prompt, response)
        return d["correct"], d["formatted"], d["concise"], d["score"]

    assert verdict(f"The answer is {answer}.") == (True, True, True, 1.0)
    assert verdict(f"The answer is {wrong}.") == (False, True, True, 0.4)
    assert verdict(answer) == (True, False, True, 0.75)  # right but not in the required format
    assert verdict(f"the answer is {answer}") == (True, False, True, 0.75)
    assert verdict(f"Sure! The answer is {answer}.") == (True, True, False, 0.85)  # filler: still good
    assert verdict(f"The answer is {answer}. Hope this helps!") == (True, False, False, 0.6)
    rambling = f"Okay, let me see. I went through it slowly and carefully, so the result is {answer}."
    assert verdict(rambling) == (True, False, False, 0.6)
    assert verdict(f"Hmm, hard one. Well, maybe the result is {wrong}.") == (False, False, False, 0.0)
    assert verdict("") == (False, False, False, 0.0)
    assert task.score(prompt, f"The answer is {answer}.") >= task.GOOD_SCORE > task.score(prompt, answer)


def test_oracle_edge_cases():
    p = "Add 3 and 5."
    assert task.score_details(p, "The answer is 8. The answer is 8.")["formatted"] is False  # one answer only
    assert task.score_details(p, "The answer is 7. The answer is 8.")["correct"] is True  # the last one counts
    assert task.score_details(p, "Answer: 8")["correct"] is True
    assert task.score_details(p, "  The answer is 8.\n")["score"] == 1.0
    assert task.score("Write cat in capital letters.", "The answer is cat.") == 0.4  # case matters


@pytest.mark.parametrize(
    "prompt",
    ["Tell me a joke.", "Add 3 and 5", "add 3 and 5.", "Which is larger, 4 or 4?", "Reverse this list: cat cat.", ""],
)
def test_oracle_rejects_unknown_prompts(prompt):
    with pytest.raises(ValueError, match="not a tiny-preset prompt"):
        task.score(prompt, "The answer is 8.")


def test_generators_hit_the_intended_quality():
    rng = random.Random(1)
    expected = {"canonical": (True, True), "filler": (True, False), "bare": (False, True), "loose": (False, True)}
    expected |= {"trailing": (False, False), "ramble": (False, False)}
    kinds = set()
    for _ in range(300):
        prompt = task.make_prompt(rng)
        kinds.add(task.parse_prompt(prompt).kind)
        for style, (formatted, concise) in expected.items():
            for correct in (True, False):
                d = task.score_details(prompt, task.make_response(prompt, rng, style, correct))
                assert (d["correct"], d["formatted"]) == (correct, formatted), (prompt, style)
                if correct:  # a wrong answer may also be too long (e.g. a word said three times, not two)
                    assert d["concise"] == concise, (prompt, style)
    assert kinds == set(task.KINDS)


# ---------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="module")
def data():
    return generate_data()


def test_generate_data_is_deterministic(data):
    assert data_hash(generate_data()) == data_hash(data)
    assert data_hash(generate_data(seed=1)) != data_hash(data)
    assert {k: len(v) for k, v in data.items()} == {
        "preferences": build.N_PREFERENCES,
        "eval_prompts": build.N_EVAL,
        "val_prompts": build.N_VAL,
        "sft": build.N_SFT,
    }


def test_preference_rows_are_well_formed(data):
    keys = {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    for row in data["preferences"]:
        assert set(row) == keys
        assert all(isinstance(row[k], str) and row[k] for k in ("prompt", "chosen", "rejected"))
        assert row["score_chosen"] == task.score(row["prompt"], row["chosen"])
        assert row["score_rejected"] == task.score(row["prompt"], row["rejected"])
        assert row["score_chosen"] > row["score_rejected"]
    kinds = {task.parse_prompt(r["prompt"]).kind for r in data["preferences"]}
    assert kinds == set(task.KINDS)
    good_chosen = sum(r["score_chosen"] >= task.GOOD_SCORE for r in data["preferences"]) / len(data["preferences"])
    assert 0.3 < good_chosen < 0.9  # gold labels carry signal, and not every pair is trivial


def test_quality_is_a_property_of_who_answers(data):
    """Bench v2's premise: the SFT answers come from responders whose care differs by style, so the SFT model holds
    a mixture that the seed DPO can shift, and correctness travels with form (as in UltraFeedback)."""
    by_style: dict[str, list[bool]] = {}
    for row in data["sft"]:
        d = task.score_details(row["prompt"], row["response"])
        r = row["response"]
        style = ("canonical" if r.startswith("The answer is") and r.endswith(".") and "answer" not in r[13:] else
                 "loose" if r.startswith("the answer is") else "trailing" if r.startswith("The answer is") else None)
        if style:
            by_style.setdefault(style, []).append(d["correct"])
    rate = {k: sum(v) / len(v) for k, v in by_style.items()}
    assert rate["canonical"] > 0.9 > rate["trailing"] > rate["loose"] > 0.45
    assert abs(rate["canonical"] - build.RESPONDERS["canonical"]) < 0.03
    good = sum(task.is_good(r["prompt"], r["response"]) for r in data["sft"]) / len(data["sft"])
    assert 1 / 3 < good < 2 / 3  # something to prefer, something to avoid


def test_held_out_prompts_are_disjoint(data):
    eval_p = [r["prompt"] for r in data["eval_prompts"]]
    val_p = [r["prompt"] for r in data["val_prompts"]]
    train_p = {r["prompt"] for r in data["preferences"]} | {r["prompt"] for r in data["sft"]}
    assert len(set(eval_p)) == len(eval_p) and len(set(val_p)) == len(val_p)
    assert not set(eval_p) & set(val_p)
    assert not (set(eval_p) | set(val_p)) & train_p
    for p in eval_p + val_p:
        task.parse_prompt(p)  # every held-out prompt is one the oracle can score


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFIE_LITE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tiny-v2"
    monkeypatch.delenv("SELFIE_LITE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "selfie-lite" / "tiny-v2"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "selfie-lite" / "tiny-v2"


def test_tokenizer_round_trips_with_chat_template(data, tmp_path):
    from transformers import AutoTokenizer

    tok = build.train_tokenizer(build.tokenizer_corpus(data))
    assert len(tok) == build.VOCAB_SIZE
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Add 3 and 5."}, {"role": "assistant", "content": "The answer is 8."}]
    text = again.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|user|>Add 3 and 5.<|assistant|>The answer is 8.</s>"
    full = chat_conversation_ids(again, "Add 3 and 5.", "The answer is 8.")
    prompt = chat_prompt_ids(again, "Add 3 and 5.")
    assert full == chat_conversation_ids(tok, "Add 3 and 5.", "The answer is 8.")
    assert full[: len(prompt)] == prompt and prompt[-1] == again.convert_tokens_to_ids("<|assistant|>")
    assert full[-1] == again.eos_token_id and again.pad_token_id not in (again.eos_token_id, None)
    assert again.decode(full[len(prompt) :], skip_special_tokens=True) == "The answer is 8."
    assert len(again(" " + " ".join(task.WORDS))["input_ids"]) == len(task.WORDS)  # one token per task word


def test_interrupted_build_leaves_nothing(tmp_path):
    target = tmp_path / "tiny-v2"
    stale = tmp_path / ".tiny-v2.tmp-999999999-abc"  # left by a build whose process died
    stale.mkdir()

    def stop(stage, fraction):
        if stage == "sft":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_tiny(target, progress=stop)
    assert [p.name for p in tmp_path.iterdir()] == [".tiny-v2.lock"]  # the builders' lock file, nothing half-built


def test_unwritable_cache_is_a_run_error(tmp_path):
    from selfie_lite.errors import RunError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(RunError, match="could not build the tiny preset") as err:
        build_tiny(blocker / "tiny-v2")
    assert "SELFIE_LITE_CACHE" in err.value.hint


# ---------------------------------------------------------------------------------------------
# The build machinery, on a shortened SFT (seconds), and the session's real build


@pytest.fixture
def quick_sft(monkeypatch):
    """build_tiny with its SFT step cut to 64 rows and one epoch: the same code path, a model that is not the
    preset's. Counts the builds."""
    real = build.train_sft
    calls = []

    def short(tokenizer, rows, progress=None, **overrides):
        calls.append(len(rows))
        return real(tokenizer, rows[:64], progress=progress, **{**overrides, "epochs": 1, "warmup_steps": 1})

    monkeypatch.setattr(build, "train_sft", short)
    return calls


def test_build_reports_progress_and_moves_into_place(quick_sft, tmp_path):
    stages = []
    built = build_tiny(tmp_path / "tiny-v2", progress=lambda stage, frac: stages.append((stage, frac)))
    assert quick_sft == [build.N_SFT] and built.model_dir == tmp_path / "tiny-v2" / "sft-model"
    assert (built.model_dir / "model.safetensors").is_file() and (built.root / "manifest.json").is_file()
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {s for s, _ in stages} >= {"data", "tokenizer", "sft", "done"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-v2.lock", "tiny-v2"]  # no temp folder left behind
    t0 = time.perf_counter()
    assert build_tiny(tmp_path / "tiny-v2") == built and time.perf_counter() - t0 < 1.0  # built: returns at once


def test_a_second_builder_waits_for_the_first_and_uses_its_build(quick_sft, tmp_path, monkeypatch):
    """Two first runs at once (or two test workers) build the preset once: the second waits on the lock."""
    import threading

    started, release = threading.Event(), threading.Event()
    real_into = build._build_into

    def slow_into(out, progress):
        started.set()
        release.wait(30)
        real_into(out, progress)

    monkeypatch.setattr(build, "_build_into", slow_into)
    results, seen = {}, []
    first = threading.Thread(target=lambda: results.setdefault("first", build_tiny(tmp_path / "tiny-v2")))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=lambda: results.setdefault(
        "second", build_tiny(tmp_path / "tiny-v2", progress=lambda stage, frac: seen.append(stage))))
    second.start()
    time.sleep(0.5)
    assert second.is_alive() and seen == ["waiting for another process's build"]  # blocked on the first build
    release.set()
    first.join(60)
    second.join(60)
    assert results["first"] == results["second"] and quick_sft == [build.N_SFT]  # one SFT, one preset


def test_build_writes_a_complete_preset(tiny_preset, data):
    """The session's build of the real preset (tests/conftest.py starts it in the background)."""
    built = tiny_preset
    assert built.model_dir == built.root / "sft-model"
    assert built.manifest == json.loads((built.root / "manifest.json").read_text())
    assert built.manifest["data_sha256"] == data_hash(data)
    for name in ("preferences", "eval_prompts", "val_prompts", "sft"):
        assert read_jsonl(built.root / f"{name}.jsonl") == data[name]
        assert built.manifest["files"][f"{name}.jsonl"]["rows"] == len(data[name])
    assert (built.preferences, built.eval_prompts, built.val_prompts) == tuple(
        built.root / f"{n}.jsonl" for n in ("preferences", "eval_prompts", "val_prompts")
    )
    assert not [p.name for p in built.root.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert built.manifest["build_seconds"]["total"] > 0 and built.manifest["versions"]["torch"]
    assert built.manifest["sft"]["steps"] == 4 * -(-build.N_SFT // 32)  # the real schedule: 4 epochs of batches of 32


def test_built_model_loads_and_chats(tiny_preset):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = tiny_preset
    assert (built.model_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(built.model_dir)
    tok = AutoTokenizer.from_pretrained(built.model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == built.manifest["model"]["params"] and 2e5 < n_params < 5e6
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id

    messages = [{"role": "user", "content": "Add 3 and 5."}]
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32)
    new = out[0, len(ids) :].tolist()
    assert tok.eos_token_id in new  # the assistant turn ends
    reply = tok.decode(new, skip_special_tokens=True)
    assert task.score_details("Add 3 and 5.", reply)["formatted"]  # greedy follows the dominant format


def test_sft_model_quality_is_in_the_band(tiny_preset):
    built = tiny_preset
    report = sft_report(built, n_prompts=200)
    assert 1 / 3 <= report["frac_good"] <= 2 / 3, report
    assert report["frac_correct"] > report["frac_good"] + 0.05  # formatting leaves room for DPO
    assert report["frac_formatted"] < 0.9 and report["frac_concise"] < 0.95
    assert 0 < report["mean_score"] < 1 and report["frac_finished"] > 0.95
    assert 2 < report["mean_length_tokens"] < 30 and report["tokens_per_s"] > 0
    assert set(report["frac_good_by_kind"]) == set(task.KINDS)
    again = sft_report(built, n_prompts=200)
    assert {k: v for k, v in again.items() if k != "tokens_per_s"} == {
        k: v for k, v in report.items() if k != "tokens_per_s"
    }
