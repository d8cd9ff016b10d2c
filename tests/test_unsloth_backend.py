"""The unsloth backend and the vLLM sampler on a machine that has neither (CI never installs them).

Three layers:
  - selection: `--backend unsloth` without the package (ImportError, NotImplementedError, a broken install) is a
    one-line UserError, `auto` picks hf here and says why, and nothing imports unsloth unless it is chosen;
  - the backend's own code path against a stand-in FastLanguageModel that records calls and does the work with
    transformers + PEFT on the CPU: inference/training mode switches, LoRA arguments, the merged_16bit merge and its
    16-bit PEFT fallback (also from a pre-quantized 4-bit folder);
  - where unsloth IS installed (a GPU box, or its CPU fallback), a real smoke run in a subprocess, so its global
    patches never leak into this process. Skipped cleanly when it is absent.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from selfie_lite.compat import quiet_bnb_kernels_warning
from selfie_lite.config import LoraConfig, RunConfig, TrainConfig
from selfie_lite.errors import UserError
from selfie_lite.testing import TINY_SHAPE, build_shaped_model

REPO = Path(__file__).resolve().parent.parent
quiet_bnb_kernels_warning()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer random Llama with a generated chat tokenizer (the GPU benchmark's builder), built once."""
    return build_shaped_model(tmp_path_factory.mktemp("tiny-model"), TINY_SHAPE)


# ---------------------------------------------------------------------------------------------
# Selection without the package


class _RaisingFinder:
    """Makes `import unsloth` raise a given exception, as the real package does on machines it cannot run on."""

    def __init__(self, exc):
        self.exc = exc

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "unsloth" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.exc


@pytest.fixture
def no_unsloth(monkeypatch):
    monkeypatch.setitem(sys.modules, "unsloth", None)  # `import unsloth` -> ImportError
    monkeypatch.delitem(sys.modules, "selfie_lite.backends.unsloth", raising=False)


def test_explicit_unsloth_without_the_package_is_one_line(no_unsloth):
    from selfie_lite.backends import get_backend

    with pytest.raises(UserError) as e:
        get_backend(RunConfig(backend="unsloth"))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("backend unsloth is not available: unsloth is not installed") and e.value.key == "backend"
    assert "selfie-lite[gpu]" in e.value.hint


@pytest.mark.parametrize("exc, shown", [
    (NotImplementedError("Unsloth cannot find any torch accelerator? You need a GPU.\nmore"), "NotImplementedError"),
    (ImportError("No module named 'triton'"), "ImportError: No module named 'triton'"),
    (RuntimeError("CUDA driver too old\ndetails"), "unsloth failed to import (RuntimeError: CUDA driver too old)"),
])
def test_import_failures_count_as_absent(monkeypatch, exc, shown):
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    monkeypatch.delitem(sys.modules, "selfie_lite.backends.unsloth", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_RaisingFinder(exc), *sys.meta_path])
    from selfie_lite.backends import get_backend

    with pytest.raises(UserError) as e:
        get_backend(RunConfig(backend="unsloth"))
    assert "\n" not in str(e.value) and shown in str(e.value)


def test_auto_picks_hf_here_and_says_why():
    import torch

    from selfie_lite.backends import get_backend, unsloth_available

    be, why = get_backend(RunConfig(backend="auto"))
    if torch.cuda.is_available() and importlib.util.find_spec("unsloth"):
        pytest.skip("this machine has a CUDA GPU and unsloth: auto picks unsloth")
    assert not unsloth_available()
    assert be.name == "hf"
    assert why == "auto: no CUDA GPU with unsloth"


def test_cli_run_with_backend_unsloth_fails_in_one_line(no_unsloth):
    from typer.testing import CliRunner

    from selfie_lite.cli import app

    result = CliRunner().invoke(app, ["run", "--backend", "unsloth", "--seed", "3.3pct", "--out", "runs/x"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: --backend unsloth is not available: unsloth is not installed or cannot run "
                                "on this machine (")
    assert "Traceback" not in result.output


@pytest.mark.cpu_agnostic
def test_nothing_imports_unsloth_unless_chosen():
    code = (
        "import sys\n"
        "from selfie_lite.backends import get_backend\n"
        "import selfie_lite.backends.hf, selfie_lite.cli, selfie_lite.loop, selfie_lite.sampler_vllm\n"
        "from selfie_lite.config import RunConfig\n"
        "get_backend(RunConfig(backend='hf'))\n"
        "print(sorted(m for m in ('unsloth', 'vllm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------------------------
# The backend's code path against a stand-in FastLanguageModel


class FakeFastLanguageModel:
    """Unsloth's entry points with their real signatures, recording calls; transformers + PEFT do the work."""

    calls: list = []
    save_error: Exception | None = None
    save_leaves_lora = False
    logits_mode = "logits"  # what the patched CausalLM forward puts in .logits: see _unsloth_like_forward

    @classmethod
    def from_pretrained(cls, model_name, max_seq_length=2048, dtype=None, load_in_4bit=True, trust_remote_code=False,
                        use_gradient_checkpointing="unsloth", random_state=3407, fix_tokenizer=True,
                        local_files_only=False, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cls.calls.append(("from_pretrained", dict(max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
                                                  use_gradient_checkpointing=use_gradient_checkpointing,
                                                  fix_tokenizer=fix_tokenizer, local_files_only=local_files_only)))
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
        if cls.logits_mode != "logits":
            _unsloth_like_forward(model, cls.logits_mode)
        return model, AutoTokenizer.from_pretrained(model_name)

    @classmethod
    def get_peft_model(cls, model, r=16, target_modules=None, lora_alpha=16, lora_dropout=0.0, bias="none",
                       use_gradient_checkpointing="unsloth", random_state=3407, max_seq_length=2048, **kwargs):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        cls.calls.append(("get_peft_model", dict(r=r, target_modules=target_modules, lora_alpha=lora_alpha,
                                                 random_state=random_state, bias=bias)))
        return get_peft_model(model, PeftLoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                    target_modules=target_modules, task_type="CAUSAL_LM",
                                                    init_lora_weights=False))  # non-zero B: merges visibly change W

    @classmethod
    def for_inference(cls, model):
        cls.calls.append(("for_inference", model.training))
        model.eval()
        return model

    @classmethod
    def for_training(cls, model, use_gradient_checkpointing=True):
        cls.calls.append(("for_training", use_gradient_checkpointing))
        model.train()
        return model


def _unsloth_like_forward(model, mode):
    """Replace the CausalLM forward as Unsloth's patched one may behave: "empty" returns an empty tensor as logits
    (its fused-loss training path), "hidden" the last hidden states (UNSLOTH_RETURN_HIDDEN_STATES=1). Records calls."""
    import torch
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(input_ids=None, attention_mask=None, **kwargs):
        FakeFastLanguageModel.calls.append(("causal_lm_forward", mode))
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask)[0]
        return CausalLMOutputWithPast(logits=torch.empty(0) if mode == "empty" else hidden)

    model.forward = forward


def _patch_saving_functions(model):
    def save_pretrained_merged(save_directory, tokenizer=None, save_method="merged_16bit", **kwargs):
        FakeFastLanguageModel.calls.append(("save_pretrained_merged", save_method))
        if FakeFastLanguageModel.save_error is not None:
            raise FakeFastLanguageModel.save_error
        # leaves_lora: the inner model with its LoRA layers still in (what a save that forgot to merge writes)
        target = model.base_model.model if FakeFastLanguageModel.save_leaves_lora else model.merge_and_unload()
        target.save_pretrained(save_directory, safe_serialization=True)
        tokenizer.save_pretrained(save_directory)

    model.save_pretrained_merged = save_pretrained_merged


@pytest.fixture
def fake_unsloth(monkeypatch):
    pkg = types.ModuleType("unsloth")
    pkg.FastLanguageModel = FakeFastLanguageModel
    save = types.ModuleType("unsloth.save")
    save.patch_saving_functions = _patch_saving_functions
    pkg.save = save
    monkeypatch.setitem(sys.modules, "unsloth", pkg)
    monkeypatch.setitem(sys.modules, "unsloth.save", save)
    monkeypatch.delitem(sys.modules, "selfie_lite.backends.unsloth", raising=False)
    FakeFastLanguageModel.calls = []
    FakeFastLanguageModel.save_error = None
    FakeFastLanguageModel.save_leaves_lora = False
    FakeFastLanguageModel.logits_mode = "logits"
    import selfie_lite.backends.unsloth as mod

    yield mod
    # Not through monkeypatch, whose undo would put this fake-backed module back: later tests (in any order) must
    # find no unsloth, as on this machine.
    sys.modules.pop("selfie_lite.backends.unsloth", None)
    vars(sys.modules["selfie_lite.backends"]).pop("unsloth", None)


def _cfg(model_dir, **over):
    train = TrainConfig(max_length=96, max_prompt_length=48, gradient_checkpointing=over.pop("gc", True))
    return RunConfig(model=str(model_dir), backend="unsloth", train=train, **over)


def _names(calls):
    return [c[0] for c in calls]


def test_get_backend_returns_the_unsloth_backend(fake_unsloth, tiny_model):
    from selfie_lite.backends import get_backend

    be, why = get_backend(_cfg(tiny_model))
    assert be.name == "unsloth" and why == "asked for"
    assert isinstance(be, fake_unsloth.UnslothBackend)


def test_load_for_sampling_uses_unsloth_loading_and_inference_mode(fake_unsloth, tiny_model):
    import torch

    be = fake_unsloth.UnslothBackend(_cfg(tiny_model))
    model, tok = be.load(tiny_model)
    (name, kw), (mode, _) = FakeFastLanguageModel.calls
    assert name == "from_pretrained" and mode == "for_inference"
    # max_seq_length: the longer of a DPO pair (96) and a prompt plus its sample (48 + 300 new tokens)
    assert kw == dict(max_seq_length=348, dtype=torch.float32, load_in_4bit=False, use_gradient_checkpointing=False,
                      fix_tokenizer=False, local_files_only=True)
    assert tok.chat_template and tok.pad_token_id is not None and not model.training


def test_dtype_follows_precision(fake_unsloth):
    import torch

    assert fake_unsloth.unsloth_dtype("auto", "cpu") == torch.float32
    assert fake_unsloth.unsloth_dtype("fp16", "cuda") == torch.float16
    assert fake_unsloth.unsloth_dtype("bf16", "cpu") == torch.bfloat16


def test_lora_goes_through_get_peft_model(fake_unsloth, tiny_model):
    be = fake_unsloth.UnslothBackend(_cfg(tiny_model))
    model, _ = be.load(tiny_model, trainable=True)
    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = be.add_lora(model, lora, seed=7)
    calls = FakeFastLanguageModel.calls
    assert _names(calls) == ["from_pretrained", "for_training", "get_peft_model", "for_training"]
    assert calls[0][1]["use_gradient_checkpointing"] == "unsloth"
    assert calls[2][1] == dict(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8, random_state=7, bias="none")
    assert model.training and hasattr(model, "disable_adapter")
    with pytest.raises(UserError, match="none of the LoRA targets"):
        be.add_lora(be.load(tiny_model, trainable=True)[0], LoraConfig(target_modules=["nope"]), seed=1)
    with pytest.raises(UserError, match="lora.target_modules names not_there, which this model does not have"):
        be.add_lora(be.load(tiny_model, trainable=True)[0], LoraConfig(target_modules=["q_proj", "not_there"]), seed=1)


def test_generate_switches_to_inference_and_back(fake_unsloth, tiny_model):
    be = fake_unsloth.UnslothBackend(_cfg(tiny_model))
    model, tok = be.load(tiny_model, trainable=True)
    model = be.add_lora(model, LoraConfig(r=4, alpha=8), seed=1)
    FakeFastLanguageModel.calls = []
    rows = be.generate(model, tok, ["w10 w11", "w12"], num_samples=2, temperature=0.7, top_p=1.0, max_new_tokens=5,
                       batch_size=2, seed=3)
    assert FakeFastLanguageModel.calls == [("for_inference", True), ("for_training", True)]
    assert model.training  # back in training mode: sampling in the middle of training is safe
    assert [r["prompt"] for r in rows] == ["w10 w11", "w12"]
    assert all(len(r["responses"]) == 2 and len(r["response_ids"]) == 2 for r in rows)
    assert all(1 <= len(ids) <= 5 for r in rows for ids in r["response_ids"])


def test_generate_on_an_inference_model_stays_there(fake_unsloth, tiny_model):
    be = fake_unsloth.UnslothBackend(_cfg(tiny_model))
    model, tok = be.load(tiny_model)
    FakeFastLanguageModel.calls = []
    be.generate(model, tok, ["w10"], num_samples=2, temperature=0.7, top_p=1.0, max_new_tokens=3, batch_size=1, seed=1)
    assert FakeFastLanguageModel.calls == [("for_inference", False)]
    assert not model.training


def test_scores_match_the_hf_backend(fake_unsloth, tiny_model):
    from selfie_lite.backends.hf import HFBackend

    be = fake_unsloth.UnslothBackend(_cfg(tiny_model))
    model, _ = be.load(tiny_model)
    seqs = [([1, 5, 10, 11, 6], [20, 21, 2]), ([1, 5, 12, 6], [30, 2])]
    ours = be.sequence_logps(model, seqs, batch_size=2)
    ref_model, _ = HFBackend(RunConfig()).load(tiny_model)
    theirs = HFBackend(RunConfig()).sequence_logps(ref_model, seqs, batch_size=2)
    assert ours == pytest.approx(theirs, abs=1e-5)


@pytest.mark.parametrize("mode", ["logits", "empty", "hidden"])
def test_scoring_and_training_do_not_need_the_patched_forwards_logits(fake_unsloth, tiny_model, tmp_path, mode):
    """Our loss reads the last hidden states and applies the output layer itself (loss.last_hidden), so it gives
    the same log-probs and the same training whether Unsloth's patched forward returns logits, an empty tensor or
    hidden states: it never calls that forward."""
    import torch

    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.config import RefineConfig
    from selfie_lite.smoothing import smoothing_of
    from selfie_lite.train import train_dpo

    seqs = [([1, 5, 10, 11, 6], [20, 21, 2]), ([1, 5, 12, 6], [30, 2])]
    hf = HFBackend(RunConfig())
    expected = hf.sequence_logps(hf.load(tiny_model)[0], seqs, batch_size=2)

    FakeFastLanguageModel.logits_mode = mode
    be = fake_unsloth.UnslothBackend(_cfg(tiny_model, gc=False))
    model, tok = be.load(tiny_model)
    assert be.sequence_logps(model, seqs, batch_size=2) == pytest.approx(expected, abs=1e-5)

    def train(backend):
        m, t = backend.load(tiny_model, trainable=True)
        m = backend.add_lora(m, LoraConfig(r=4, alpha=8), seed=1)
        before = {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n}
        pairs = [{"pair_id": i, "prompt": f"w{10 + i} w{20 + i}", "chosen": f"w{30 + i} w31", "rejected": "w40"}
                 for i in range(4)]
        train_dpo(m, t, pairs, beta=0.1, train=TrainConfig(max_length=32, max_prompt_length=16, batch_size=2,
                                                           grad_accum=1, learning_rate=1e-2,
                                                           gradient_checkpointing=False),
                  smoother=smoothing_of(RefineConfig(alpha=0.1, warmup_frac=0.0), 0.5, []), epochs=1, out_dir=tmp_path / "t", seed=1)
        after = {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n}
        assert any(not torch.equal(before[k], after[k]) for k in after)  # it trained
        return after

    FakeFastLanguageModel.logits_mode = "logits"
    plain = train(fake_unsloth.UnslothBackend(_cfg(tiny_model, gc=False)))
    FakeFastLanguageModel.logits_mode = mode
    FakeFastLanguageModel.calls = []
    patched = train(fake_unsloth.UnslothBackend(_cfg(tiny_model, gc=False)))
    assert all(torch.equal(plain[k], patched[k]) for k in plain)
    assert not any(name == "causal_lm_forward" for name, _ in FakeFastLanguageModel.calls)


def test_a_model_that_needs_its_own_logits_and_returns_none_fails_in_one_line(fake_unsloth, tiny_model):
    """Where we cannot apply the output layer ourselves (here: a logit scale in the config), the model's logits are
    needed; a patched forward that returns none is then one clear error, not a shape error deep in the loss."""
    FakeFastLanguageModel.logits_mode = "empty"
    be = fake_unsloth.UnslothBackend(_cfg(tiny_model))
    model, _ = be.load(tiny_model)
    model.config.logit_scale = 0.5
    with pytest.raises(RuntimeError, match=r"forward returned no \[rows, T, V\] logits") as e:
        be.sequence_logps(model, [([1, 5, 10], [20, 2])], batch_size=1)
    assert "\n" not in str(e.value)


def _train_adapter(be, model_dir, out_dir):
    model, _ = be.load(model_dir, trainable=True)
    model = be.add_lora(model, LoraConfig(r=4, alpha=8), seed=1)
    be.save_adapter(model, out_dir)
    return out_dir


def _weights(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_merge_goes_through_merged_16bit_and_equals_the_peft_merge(fake_unsloth, tiny_model, tmp_path):
    from selfie_lite.backends.hf import HFBackend

    be = fake_unsloth.UnslothBackend(_cfg(tiny_model))
    adapter = _train_adapter(be, tiny_model, tmp_path / "adapter")
    FakeFastLanguageModel.calls = []
    be.merge(tiny_model, adapter, tmp_path / "merged")
    assert ("save_pretrained_merged", "merged_16bit") in FakeFastLanguageModel.calls
    assert be.last_merge == {"path": "unsloth merged_16bit"}
    assert fake_unsloth.merged_folder_problem(tmp_path / "merged") is None
    HFBackend(RunConfig()).merge(tiny_model, adapter, tmp_path / "hf-merged")
    assert _max_diff(_weights(tmp_path / "merged"), _weights(tmp_path / "hf-merged")) < 1e-6
    assert _max_diff(_weights(tmp_path / "merged"), _weights(tiny_model)) > 1e-4  # the adapter did change W


@pytest.mark.parametrize("failure", ["raises", "leaves_lora"])
def test_merge_falls_back_to_a_16bit_peft_merge(fake_unsloth, tiny_model, tmp_path, failure):
    from selfie_lite.backends.hf import HFBackend

    be = fake_unsloth.UnslothBackend(_cfg(tiny_model))
    adapter = _train_adapter(be, tiny_model, tmp_path / "adapter")
    if failure == "raises":
        FakeFastLanguageModel.save_error = AttributeError("'PeftModel' object has no attribute 'save_pretrained_merged'")
    else:
        FakeFastLanguageModel.save_leaves_lora = True
    be.merge(tiny_model, adapter, tmp_path / "merged")
    assert be.last_merge["path"] == "peft 16-bit"
    assert ("AttributeError" if failure == "raises" else "unmerged LoRA tensor") in be.last_merge["reason"]
    assert fake_unsloth.merged_folder_problem(tmp_path / "merged") is None
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    HFBackend(RunConfig()).merge(tiny_model, adapter, tmp_path / "hf-merged")
    assert _max_diff(_weights(tmp_path / "merged"), _weights(tmp_path / "hf-merged")) < 1e-6


def test_merged_folder_problem_names_what_is_wrong(fake_unsloth, tiny_model, tmp_path):
    import shutil

    check = fake_unsloth.merged_folder_problem
    assert check(tmp_path / "missing") == "no config.json"
    assert check(tiny_model) is None
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"load_in_4bit": True}}))
    assert check(bad) == "config.json still declares quantized weights"
    fake_unsloth._drop_quantization_config(bad)
    assert check(bad) is None


def test_peft_merge_from_a_prequantized_4bit_folder_is_16bit(fake_unsloth, tiny_model, tmp_path):
    """A bnb-4bit base (like unsloth/zephyr-sft-bnb-4bit) is dequantized before merging: never a 4-bit re-merge."""
    pytest.importorskip("bitsandbytes")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    be = fake_unsloth.UnslothBackend(_cfg(tiny_model))
    adapter = _train_adapter(be, tiny_model, tmp_path / "adapter")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(str(tiny_model), quantization_config=q, dtype=torch.float32).save_pretrained(
        str(tmp_path / "q4"))
    assert fake_unsloth.merged_folder_problem(tmp_path / "q4") == "config.json still declares quantized weights"
    out = tmp_path / "merged"
    out.mkdir()
    fake_unsloth.merge_peft_16bit(tmp_path / "q4", adapter, out, dtype=torch.float32, device="cpu",
                                  trust_remote_code=False)
    assert fake_unsloth.merged_folder_problem(out) is None
    # expected: the dequantized base plus the adapter's delta, exactly
    deq = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q4"), dtype=torch.float32).dequantize()
    expected = PeftModel.from_pretrained(deq, str(adapter)).merge_and_unload().state_dict()
    got = _weights(out)
    assert max((got[k].float() - expected[k].float()).abs().max().item() for k in got) < 1e-6


# ---------------------------------------------------------------------------------------------
# The vLLM sampler's pure parts (vLLM itself needs a GPU)


def test_vllm_sampler_choice_without_vllm():
    from selfie_lite.sampler_vllm import get_sampler

    backend = object()
    assert get_sampler("generate", backend, RunConfig()) == (backend, "asked for")
    if importlib.util.find_spec("vllm") is None:
        sampler, why = get_sampler("auto", backend, RunConfig())
        assert sampler is backend and why.startswith("auto: no vLLM")
        with pytest.raises(UserError, match="vLLM is not installed") as e:
            get_sampler("vllm", backend, RunConfig())
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="sampler must be one of generate, vllm, auto"):
        get_sampler("beam", backend, RunConfig())


def test_vllm_rows_match_the_generate_rows(tiny_model):
    from transformers import AutoTokenizer

    from selfie_lite.sampler_vllm import cut_response, per_prompt_seeds, rows_from_outputs

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    eos = tok.eos_token_id
    assert cut_response([10, 11, eos, 12], {eos}, "stop") == [10, 11, eos]  # cut after the first eos
    assert cut_response([10, 11], {eos}, "stop") == [10, 11, eos]  # vLLM hid the stop token: put it back
    assert cut_response([10, 11], {eos}, "length") == [10, 11]  # ran out of tokens: no eos

    outputs = [[([10, eos], "stop"), ([11, 12], "length")]]  # per prompt, per sample: (token ids, finish reason)
    rows, n = rows_from_outputs(["w9"], [[1, 5, 9, 6]], outputs, tok, {eos}, num_samples=2)
    assert rows == [{"prompt": "w9", "prompt_ids": [1, 5, 9, 6], "responses": ["w10", "w11 w12"],
                     "response_ids": [[10, eos], [11, 12]]}]
    assert n == 4
    with pytest.raises(RuntimeError, match="expected 3"):
        rows_from_outputs(["w9"], [[1]], outputs, tok, {eos}, num_samples=3)
    # seeds depend only on the chunk seed and the place in the chunk: a resume redraws the same samples
    assert per_prompt_seeds(5, 3) == per_prompt_seeds(5, 4)[:3]
    assert len(set(per_prompt_seeds(5, 100))) == 100


def test_vllm_memory_fraction_keeps_the_budget():
    from selfie_lite.sampler_vllm import gpu_memory_fraction

    assert gpu_memory_fraction(20, 24 * 2**30) == pytest.approx(20e9 / (24 * 2**30))  # ~0.78 of a 24 GB card
    assert gpu_memory_fraction(20, 80 * 2**30) == pytest.approx(20e9 / (80 * 2**30))
    assert gpu_memory_fraction(20, 16 * 2**30) == 0.85  # capped: vLLM needs headroom outside its share


# ---------------------------------------------------------------------------------------------
# The real thing, where it is installed (never in CI): a subprocess, so its patches stay out of this process

SMOKE = r"""
import json, random, sys, shutil
from pathlib import Path
try:
    from selfie_lite.backends.unsloth import merged_folder_problem
except ImportError as e:
    print("ABSENT", e); sys.exit(0)
from selfie_lite.backends import get_backend
from selfie_lite.config import LoraConfig, RefineConfig, RunConfig, TrainConfig
from selfie_lite.smoothing import smoothing_of
from selfie_lite.train import train_dpo
model_dir, work = Path(sys.argv[1]), Path(sys.argv[2])
cfg = RunConfig(model=str(model_dir), backend="unsloth", train=TrainConfig(max_length=96, max_prompt_length=48,
                batch_size=2, grad_accum=1, learning_rate=1e-3, gradient_checkpointing=False))
be, why = get_backend(cfg)
model, tok = be.load(model_dir)
rows = be.generate(model, tok, ["w10 w11", "w12"], num_samples=2, temperature=0.7, top_p=1.0, max_new_tokens=6,
                   batch_size=2, seed=1)
logps = be.sequence_logps(model, [(r["prompt_ids"], ids) for r in rows for ids in r["response_ids"]], batch_size=4)
be.free(model)
model, tok = be.load(model_dir, trainable=True)
model = be.add_lora(model, LoraConfig(r=4, alpha=8), seed=1)
rng = random.Random(0)
w = lambda n: " ".join(f"w{rng.randrange(7, 512)}" for _ in range(n))
res = train_dpo(model, tok, [{"pair_id": i, "prompt": w(20), "chosen": w(10), "rejected": w(10)} for i in range(4)],
                beta=0.1, train=cfg.train, smoother=smoothing_of(RefineConfig(), 0.5, []), epochs=1, out_dir=work / "t", seed=1)
be.save_adapter(model, work / "adapter")
be.free(model)
be.merge(model_dir, work / "adapter", work / "merged")
print("RESULT", json.dumps({"why": why, "rows": len(rows), "logps": logps, "steps": res.metrics["steps"],
                            "merge": be.last_merge, "problem": merged_folder_problem(work / "merged")}))
"""


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="unsloth is not installed (CI never has it)")
def test_real_unsloth_smoke(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, "-c", SMOKE, str(tiny_model), str(tmp_path)], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=tmp_path)
    if "ABSENT" in proc.stdout:
        pytest.skip(proc.stdout.split("ABSENT", 1)[1].strip())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["rows"] == 2 and len(result["logps"]) == 4 and all(v < 0 for v in result["logps"])
    assert result["steps"] == 2
    assert result["problem"] is None and result["merge"]["path"] in ("unsloth merged_16bit", "peft 16-bit")
