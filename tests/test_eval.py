"""`selfie-lite eval`: win-rate arithmetic, the external scorers, seed-pair accuracy, the AlpacaEval export, and the command
end to end on small random models built here (no tiny-preset build, no hub)."""

import json
import random
import statistics
from pathlib import Path

import pytest
from conftest import invoke

from selfie_lite.alpaca import alpaca_eval_rows, export_alpaca_eval
from selfie_lite.errors import UserError
from selfie_lite.evaluate import EvalSettings, evaluate_models, load_prompts, self_label_agreement
from selfie_lite.loss import implicit_rewards
from selfie_lite.metrics import pair_accuracy, win_rate
from selfie_lite.scorers import OracleScorer, RewardModelScorer, parse_scorer
from selfie_lite.tiny import task

# ---------------------------------------------------------------------------------------------
# Arithmetic


def test_win_rate_counts_ties_half():
    r = win_rate([1.0, 0.5, 0.2, 0.7], [0.5, 0.5, 0.9, 0.7])  # win, tie, loss, tie
    assert r == {"win_rate": (1 + 0.5 * 2) / 4, "wins": 1, "ties": 2, "losses": 1, "n": 4}
    assert win_rate([0.3] * 5, [0.3] * 5)["win_rate"] == 0.5  # a model against itself
    assert win_rate([1, 1, 1], [0, 0, 0])["win_rate"] == 1.0
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_seed_pair_accuracy_by_hand():
    # Three held-out pairs; log-probs of chosen/rejected under the model and under the SFT model.
    beta = 0.1
    pol_c, pol_r = [-10.0, -8.0, -5.0], [-12.0, -6.0, -5.0]
    ref_c, ref_r = [-11.0, -7.0, -6.0], [-11.0, -7.0, -6.0]
    rc, rr = implicit_rewards(pol_c, ref_c, beta), implicit_rewards(pol_r, ref_r, beta)
    assert rc == pytest.approx([0.1, -0.1, 0.1]) and rr == pytest.approx([-0.1, 0.1, 0.1])
    # pair 1 right, pair 2 wrong, pair 3 a tie (1/2)
    assert pair_accuracy(rc, rr) == pytest.approx(0.5)
    assert pair_accuracy([0.2, 0.3], [0.1, 0.0]) == 1.0
    # The SFT model against itself: every reward is 0, every pair a tie.
    z = implicit_rewards(ref_c, ref_c, beta)
    assert pair_accuracy(z, z) == 0.5


class CannedBackend:
    """Canned samples and log-probs: model 'good' answers right and prefers chosen responses."""

    def __init__(self, answers: dict[str, dict[str, str]], logps: dict[str, dict[str, float]]):
        self.answers, self.logps, self.loaded = answers, logps, []

    def load(self, model_dir):
        self.loaded.append(Path(model_dir).name)
        return Path(model_dir).name, None

    def generate(self, model, tok, prompts, *, num_samples, temperature, top_p, max_new_tokens, batch_size, seed):
        return [{"prompt": p, "responses": [self.answers[model][p]] * num_samples,
                 "response_ids": [[1] * len(self.answers[model][p].split())] * num_samples} for p in prompts]

    def sequence_logps(self, model, sequences, *, batch_size):
        return [self.logps[model][resp] for _, resp in sequences]

    def free(self, *objs):
        pass


def _answer(prompt: str) -> str:
    return task.parse_prompt(prompt).answer


def test_evaluate_models_on_canned_outputs(monkeypatch):
    rng = random.Random(0)
    prompts = [task.make_prompt(rng) for _ in range(2)]
    wrong = task.wrong_answer(task.parse_prompt(prompts[0]), rng)
    answers = {
        "sft": {prompts[0]: f"The answer is {wrong}.", prompts[1]: f"The answer is {_answer(prompts[1])}."},
        "good": {prompts[0]: f"The answer is {_answer(prompts[0])}.", prompts[1]: f"The answer is {_answer(prompts[1])}."},
    }
    pairs = [{"prompt": prompts[0], "chosen": "c1", "rejected": "r1"}, {"prompt": prompts[1], "chosen": "c2", "rejected": "r2"}]
    # "Token ids" stand for the response text so the fake backend can look the log-prob up.
    monkeypatch.setattr("selfie_lite.evaluate.pair_sequences",
                        lambda tok, ps: [((), p["chosen"]) for p in ps] + [((), p["rejected"]) for p in ps])
    logps = {
        "sft": {"c1": -5.0, "r1": -5.0, "c2": -4.0, "r2": -4.0},
        "good": {"c1": -4.0, "r1": -6.0, "c2": -4.5, "r2": -3.0},  # pair 1 right, pair 2 wrong
    }
    be = CannedBackend(answers, logps)
    res = evaluate_models(be, {"sft": Path("sft"), "good": Path("good")}, Path("sft"), prompts, OracleScorer(),
                          EvalSettings(), pairs=pairs)
    assert be.loaded == ["sft", "good"]  # the baseline is the SFT row: sampled once
    sft, good = res["models"]["sft"], res["models"]["good"]
    assert sft["win_rate"] == 0.5 and sft["seed_pair_accuracy"] == 0.5
    # good wins prompt 1 (right vs wrong), ties prompt 2 (same answer)
    assert (good["wins"], good["ties"], good["losses"]) == (1, 1, 0) and good["win_rate"] == 0.75
    sft_wrong = task.score(prompts[0], answers["sft"][prompts[0]])  # 0.4, or 0.25 when the wrong answer is also too long
    assert sft_wrong in (0.4, 0.25)
    assert good["mean_score"] == pytest.approx(1.0) and good["baseline_mean_score"] == pytest.approx((sft_wrong + 1.0) / 2)
    assert good["seed_pair_accuracy"] == 0.5
    assert good["mean_response_words"] == statistics.mean(len(a.split()) for a in answers["good"].values())
    assert res["outputs"]["good"][0]["scores"] == [1.0]


# ---------------------------------------------------------------------------------------------
# Judges


def test_oracle_scorer_scores_and_refuses_foreign_prompts():
    j = OracleScorer()
    p = task.make_prompt(random.Random(3))
    a, wrong = _answer(p), task.wrong_answer(task.parse_prompt(p), random.Random(4))
    # The oracle's weights: 0.60 correct + 0.25 formatted ("The answer is X.") + 0.15 concise.
    assert j.score([p, p, p], [f"The answer is {a}.", a, f"The answer is {wrong}."]) == [1.0, 0.75, 0.4]
    j.check([p])
    with pytest.raises(UserError, match="oracle scores only"):
        j.check(["Write a poem about the sea."])
    assert isinstance(parse_scorer("oracle"), OracleScorer) and parse_scorer(None) is None
    with pytest.raises(UserError, match="unknown scorer"):
        parse_scorer("gpt4")
    with pytest.raises(UserError, match="does not exist"):
        parse_scorer("reward-model:/no/such/rm")


# Small random models built in the test ------------------------------------------------------------


def _texts(n=300, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = task.make_prompt(rng)
        out += [p, task.random_response(p, rng)]
    return out


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """A tokenizer with the tiny chat template, two random causal LMs and a random 1-logit reward model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from selfie_lite.tiny.build import train_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = train_tokenizer(_texts())
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=128, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    paths = {}
    for name, seed in (("lm-a", 0), ("lm-b", 1)):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(**dims)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    torch.manual_seed(2)
    LlamaForSequenceClassification(LlamaConfig(**dims, num_labels=1)).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    paths["rm"] = root / "rm"
    torch.manual_seed(3)
    LlamaForSequenceClassification(LlamaConfig(**dims, num_labels=3)).save_pretrained(root / "rm3")
    tok.save_pretrained(root / "rm3")
    paths["rm3"] = root / "rm3"
    return paths


def test_reward_model_scorer_matches_a_plain_forward_whatever_the_batch(small_models):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rng = random.Random(5)
    prompts = [task.make_prompt(rng) for _ in range(7)]
    responses = [task.random_response(p, rng) + " extra words" * k for k, p in enumerate(prompts)]  # varied lengths
    scorer = parse_scorer(f"reward-model:{small_models['rm']}", batch_size=3)
    assert isinstance(scorer, RewardModelScorer) and scorer.name.startswith("reward-model:")
    batched = scorer.score(prompts, responses)
    one_by_one = [scorer.score([p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) > 1  # a real model: the scores differ

    tok = AutoTokenizer.from_pretrained(small_models["rm"])
    model = AutoModelForSequenceClassification.from_pretrained(small_models["rm"]).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": responses[0]}],
                                   tokenize=False)
    assert text.startswith("<s><|user|>") and text.endswith("</s>")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        direct = model(input_ids=ids).logits[0, 0].item()
    assert batched[0] == pytest.approx(direct, abs=1e-5)
    scorer.close()

    with pytest.raises(UserError, match="3 output labels"):
        parse_scorer(f"reward-model:{small_models['rm3']}").score(prompts[:1], responses[:1])


# ---------------------------------------------------------------------------------------------
# AlpacaEval export


def test_alpaca_eval_export_format(tmp_path):
    prompt_rows = load_prompts(_write(tmp_path / "ae.json", json.dumps([
        {"instruction": "What is 1 plus 1?", "dataset": "helpful_base", "output": "reference", "generator": "gpt4"},
        {"instruction": "Name a colour.", "dataset": "koala"},
    ])))
    assert [r["prompt"] for r in prompt_rows] == ["What is 1 plus 1?", "Name a colour."]
    outputs = {"round-3": [{"prompt": "What is 1 plus 1?", "responses": ["2", "two"]},
                           {"prompt": "Name a colour.", "responses": ["Blue."]}]}
    (path,) = export_alpaca_eval(outputs, prompt_rows, tmp_path / "out", prefix="myrun-")
    assert path == tmp_path / "out" / "round-3.json"
    data = json.loads(path.read_text())
    assert data == [
        {"instruction": "What is 1 plus 1?", "output": "2", "generator": "myrun-round-3", "dataset": "helpful_base"},
        {"instruction": "Name a colour.", "output": "Blue.", "generator": "myrun-round-3", "dataset": "koala"},
    ]
    assert alpaca_eval_rows([{"prompt": "p", "responses": ["r"]}], "g") == [{"instruction": "p", "output": "r", "generator": "g"}]


def test_load_prompts_reads_jsonl_and_names_bad_rows(tmp_path):
    assert load_prompts(_write(tmp_path / "p.jsonl", '{"prompt": "a"}\n\n{"instruction": "b"}\n')) == [
        {"prompt": "a"}, {"instruction": "b", "prompt": "b"}]
    with pytest.raises(UserError, match="row 2"):
        load_prompts(_write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{"text": "b"}\n'))
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(tmp_path / "none.jsonl")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# The command


def _prompt_file(tmp_path, n=6):
    rng = random.Random(1)
    return _write(tmp_path / "prompts.jsonl", "".join(json.dumps({"prompt": task.make_prompt(rng)}) + "\n" for _ in range(n)))


def _pair_file(tmp_path, n=8):
    rng = random.Random(2)
    rows = []
    for _ in range(n):
        p = task.make_prompt(rng)
        rows.append({"prompt": p, "chosen": task.make_response(p, rng, "canonical", True),
                     "rejected": task.make_response(p, rng, "ramble", False)})
    return _write(tmp_path / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def test_eval_command_on_model_folders(small_models, tmp_path):
    out = tmp_path / "ev"
    r = invoke("eval", small_models["lm-a"], small_models["lm-b"], "--baseline", small_models["lm-a"],
               "--prompts", _prompt_file(tmp_path), "--pairs", _pair_file(tmp_path), "--scorer", "oracle",
               "--max-new-tokens", "6", "--temperature", "1.0", "--export", "alpaca-eval", "--out", out)
    assert r.exit_code == 0, r.output
    assert "win rate" in r.output and "seed-pair acc" in r.output and "lm-b" in r.output
    res = json.loads((out / "eval.json").read_text())
    assert set(res["models"]) == {"lm-a", "lm-b"}
    a, b = res["models"]["lm-a"], res["models"]["lm-b"]
    assert a["win_rate"] == 0.5 and a["seed_pair_accuracy"] == 0.5  # the baseline against itself
    assert b["n"] == 6 and 0 <= b["win_rate"] <= 1 and 0 <= b["seed_pair_accuracy"] <= 1
    assert res["settings"]["temperature"] == 1.0 and res["settings"]["scorer"] == "oracle"
    rows = [json.loads(x) for x in (out / "eval" / "outputs" / "lm-b.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(x["responses"]) == 1 and "scores" in x for x in rows)
    ae = json.loads((out / "eval" / "alpaca-eval" / "lm-b.json").read_text())
    assert len(ae) == 6 and set(ae[0]) == {"instruction", "output", "generator"} and ae[0]["generator"] == "lm-b"

    # The same seed gives the same outputs; a reward-model scorer works through the same command.
    out2 = tmp_path / "ev2"
    r = invoke("eval", small_models["lm-b"], "--baseline", small_models["lm-a"], "--prompts", _prompt_file(tmp_path),
               "--scorer", f"reward-model:{small_models['rm']}", "--max-new-tokens", "6", "--temperature", "1.0",
               "--out", out2)
    assert r.exit_code == 0, r.output
    rows2 = [json.loads(x) for x in (out2 / "eval" / "outputs" / "lm-b.jsonl").read_text().splitlines()]
    assert [x["responses"] for x in rows2] == [x["responses"] for x in rows]
    res2 = json.loads((out2 / "eval.json").read_text())
    assert res2["settings"]["scorer"].startswith("reward-model:") and "seed_pair_accuracy" not in res2["models"]["lm-b"]


BAD = [
    (["nowhere"], "nowhere does not exist"),
    (["{a}", "--export", "csv"], "the only export format is alpaca-eval"),
    (["{a}", "--temperature", "0"], "--temperature must be > 0"),
    (["{a}", "--scorer", "gpt4", "--baseline", "{a}", "--prompts", "{p}"], "unknown scorer"),
    (["{a}", "--scorer", "reward-model:/nope", "--baseline", "{a}", "--prompts", "{p}"], "does not exist"),
    (["{a}", "--rounds", "1", "--baseline", "{a}", "--prompts", "{p}"], "applies to a run folder only"),
    (["{a}", "--scorer", "oracle", "--baseline", "{a}", "--prompts", "{foreign}"], "oracle scores only"),
    (["{tmp}", "--baseline", "{a}", "--prompts", "{p}"], "neither a run folder nor a model folder"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_eval_bad_input_is_one_line_and_exit_2(args, message, small_models, tmp_path):
    foreign = _write(tmp_path / "foreign.jsonl", '{"prompt": "Write a poem about the sea."}\n')
    subs = {"{a}": str(small_models["lm-a"]), "{p}": str(_prompt_file(tmp_path)), "{foreign}": str(foreign),
            "{tmp}": str(tmp_path)}
    r = invoke("eval", *[subs.get(a, a) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_self_label_agreement_reads_the_judge_metrics_or_recomputes(tmp_path):
    for i, m in ((1, {"pairs": 2, "gold_agreement": 0.75}), (2, {"pairs": 2})):
        (tmp_path / f"round-{i}" / "done").mkdir(parents=True)
        (tmp_path / f"round-{i}" / "done" / "judge.json").write_text(json.dumps(m))
    p = task.make_prompt(random.Random(3))
    a, wrong = _answer(p), task.wrong_answer(task.parse_prompt(p), random.Random(4))
    (tmp_path / "round-2" / "judged.jsonl").write_text(
        json.dumps({"prompt": p, "chosen": f"The answer is {a}.", "rejected": a}) + "\n"
        + json.dumps({"prompt": p, "chosen": f"The answer is {wrong}.", "rejected": f"The answer is {a}."}) + "\n")
    assert self_label_agreement(tmp_path, task.score) == {"round-1": 0.75, "round-2": 0.5}
    assert self_label_agreement(tmp_path) == {"round-1": 0.75}


def test_eval_command_on_a_run_folder(small_models, tmp_path):
    """A run folder as the loop leaves it (here with the small random models): SFT plus every merged round."""
    import shutil

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": str(small_models["lm-a"]), "data": {"source": "prefs.jsonl"},
                                                 "sample": {"max_new_tokens": 6, "batch_size": 4}}))
    shutil.copy(_pair_file(tmp_path), run / "data" / "test.jsonl")
    for i in (0, 1):
        shutil.copytree(small_models["lm-b"], run / f"round-{i}" / "model")
        (run / f"round-{i}" / "done").mkdir()
        (run / f"round-{i}" / "done" / "merge.json").write_text("{}")
    (run / "round-1" / "done" / "judge.json").write_text(json.dumps({"pairs": 3, "gold_agreement": 0.625}))
    (run / "round-2" / "done").mkdir(parents=True)  # unfinished: not evaluated
    r = invoke("eval", run, "--scorer", "oracle", "--prompts", _prompt_file(tmp_path, 4), "--export", "alpaca-eval")
    assert r.exit_code == 0, r.output
    res = json.loads((run / "eval.json").read_text())
    assert list(res["models"]) == ["sft", "round-0", "round-1"]
    assert res["settings"]["max_new_tokens"] == 6 and res["settings"]["labelled_pairs"] == 8
    assert res["models"]["sft"]["win_rate"] == 0.5 and res["models"]["sft"]["seed_pair_accuracy"] == 0.5
    # round-0 and round-1 hold the same weights: the same answers (same seed) and the same accuracy
    assert res["models"]["round-0"]["win_rate"] == res["models"]["round-1"]["win_rate"]
    assert res["models"]["round-0"]["seed_pair_accuracy"] == res["models"]["round-1"]["seed_pair_accuracy"]
    assert res["self_label_gold_agreement"] == {"round-1": 0.625}
    assert res["models"]["round-1"]["self_label_gold_agreement"] == 0.625
    ae = json.loads((run / "eval" / "alpaca-eval" / "round-1.json").read_text())
    assert ae[0]["generator"] == "run-round-1" and len(ae) == 4
    # A partial eval merges into eval.json: round-1 is evaluated again, round-0's row stays as it was.
    r = invoke("eval", run, "--rounds", "1", "--scorer", "oracle", "--prompts", _prompt_file(tmp_path, 4))
    assert r.exit_code == 0, r.output
    merged = json.loads((run / "eval.json").read_text())
    assert list(merged["models"]) == ["sft", "round-0", "round-1"]
    assert merged["models"]["round-0"] == res["models"]["round-0"]

    # A round that does not exist is an error that names the ones that do; eval.json is left alone.
    before = (run / "eval.json").read_text()
    r = invoke("eval", run, "--rounds", "9", "--scorer", "oracle", "--prompts", _prompt_file(tmp_path, 4))
    assert r.exit_code == 2 and "has no finished round 9 (finished rounds: 0, 1)" in r.output, r.output
    r = invoke("eval", run, "--rounds", "1,2", "--scorer", "oracle", "--prompts", _prompt_file(tmp_path, 4))
    assert r.exit_code == 2 and "has no finished round 2 (finished rounds: 0, 1)" in r.output, r.output
    # Rows made with other settings are not merged into one table.
    r = invoke("eval", run, "--rounds", "1", "--scorer", "oracle", "--prompts", _prompt_file(tmp_path, 4),
               "--temperature", "0.3")
    assert r.exit_code == 2 and "holds an eval made with other settings (temperature: 0.7 -> 0.3)" in r.output, r.output
    assert (run / "eval.json").read_text() == before


def test_eval_of_a_tiny_run_compares_with_the_sft_model_it_started_from(small_models, tiny_preset, tmp_path):
    """A tiny-preset run records its SFT model in data/split.json; a rebuilt or moved preset cache must not change
    the baseline that eval compares the run with."""
    import shutil

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"source": "prefs.jsonl"},
                                                 "sample": {"max_new_tokens": 6, "batch_size": 4}}))
    (run / "data" / "split.json").write_text(json.dumps({"sft_model": str(small_models["lm-a"])}))
    shutil.copytree(small_models["lm-b"], run / "round-0" / "model")
    (run / "round-0" / "done").mkdir()
    (run / "round-0" / "done" / "merge.json").write_text("{}")
    r = invoke("eval", run, "--scorer", "oracle", "--prompts", _prompt_file(tmp_path, 4))
    assert r.exit_code == 0, r.output
    res = json.loads((run / "eval.json").read_text())
    assert res["settings"]["baseline"] == str(small_models["lm-a"]) != str(tiny_preset.model_dir)
    assert res["settings"]["reference"] == str(small_models["lm-a"])


# ---------------------------------------------------------------------------------------------
# python:MODULE:FUNCTION scorers


SCORER = '''
def score(prompt, response):
    return float(len(response.split()))  # longer answers score higher: easy to check by hand

def boom(prompt, response):
    raise ValueError("no checker for this prompt")

def words(prompt, response):
    return "many"

NOT_A_FUNCTION = 3
'''


def test_python_scorer_through_the_command(small_models, tmp_path):
    scorer = _write(tmp_path / "myscorer.py", SCORER)
    out = tmp_path / "ev"
    r = invoke("eval", small_models["lm-b"], "--baseline", small_models["lm-a"], "--prompts", _prompt_file(tmp_path),
               "--scorer", f"python:{scorer}:score", "--max-new-tokens", "6", "--temperature", "1.0", "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "eval.json").read_text())
    assert res["settings"]["scorer"] == f"python:{scorer}:score"
    rows = [json.loads(x) for x in (out / "eval" / "outputs" / "lm-b.jsonl").read_text().splitlines()]
    assert [x["scores"] for x in rows] == [[float(len(x["responses"][0].split()))] for x in rows]
    assert res["models"]["lm-b"]["mean_score"] == pytest.approx(statistics.mean(s for x in rows for s in x["scores"]))

    # A dotted module name, found in the current folder (the test's tmp_path, see conftest) like `python -m` would.
    r = invoke("eval", small_models["lm-b"], "--baseline", small_models["lm-a"], "--prompts", _prompt_file(tmp_path),
               "--scorer", "python:myscorer:score", "--max-new-tokens", "6", "--temperature", "1.0", "--out", out)
    assert r.exit_code == 0, r.output


PY_BAD = [
    ("python:score", "expected python:MODULE:FUNCTION"),
    ("python:{f}:", "expected python:MODULE:FUNCTION"),
    ("python:no_such_module_xyz:score", "module 'no_such_module_xyz' not found"),
    ("python:{tmp}/nope.py:score", "does not exist"),
    ("python:{f}:missing", "has no function 'missing'"),
    ("python:{f}:NOT_A_FUNCTION", "NOT_A_FUNCTION is not callable (a int)"),
    ("python:{f}:boom", "on prompt 1 ("),
    ("python:{f}:words", "returned 'many'"),
    ("python:{broken}:score", "importing it failed: SyntaxError"),
]


@pytest.mark.parametrize("spec,message", PY_BAD, ids=[s for s, _ in PY_BAD])
def test_python_scorer_bad_input_is_one_line_and_exit_2(spec, message, small_models, tmp_path):
    f = _write(tmp_path / "myscorer.py", SCORER)
    broken = _write(tmp_path / "broken.py", "def score(prompt, response):\n    return (\n")
    spec = spec.replace("{f}", str(f)).replace("{tmp}", str(tmp_path)).replace("{broken}", str(broken))
    r = invoke("eval", small_models["lm-b"], "--baseline", small_models["lm-a"], "--prompts", _prompt_file(tmp_path),
               "--scorer", spec, "--max-new-tokens", "4", "--out", tmp_path / "ev")
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    if "on prompt" in message:
        assert "raised ValueError: no checker for this prompt" in r.output
