"""Test doubles: a toy model folder built in about a second, a toy preference set, and FakeBackend.

FakeBackend is simonw/llm's MockModel idea applied to our backend protocol (backends/base.py): sampling returns
canned responses and scoring returns canned log-probs, both pure functions of (which model, which tokens), so loop,
resume, guard and selection logic can be tested in seconds and steered by the test (a scripted judge). Everything
that touches weights stays real (loading, LoRA, TRL training, merging, saving; inherited from HFBackend) on a model
small enough that a round trains in a second or two; so done-markers, resume and bit-identical weights are tested
on the real code path.

    from selfie_lite.testing import FakeBackend, build_toy_model, toy_preferences
    model = build_toy_model(tmp / "sft")
    data = toy_preferences(tmp / "prefs.jsonl", n=200)
    backend = FakeBackend(cfg)                          # or FakeBackend(cfg, logp=my_scripted_judge)
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

from selfie_lite.backends.hf import HFBackend
from selfie_lite.chat import chat_prompt_ids, chat_response_ids
from selfie_lite.config import RunConfig

WORDS = ("the a cat dog sat ran on under mat log red blue big small why how what is are you we good bad yes no "
         "answer fine bird tree sun").split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>"]


def toy_tokenizer():
    """A word-level tokenizer (one word, one token) with a chat template; deterministic, no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>")
    out.chat_template = CHAT_TEMPLATE
    return out


def build_toy_model(folder: Path, *, seed: int = 0, hidden: int = 32, layers: int = 1) -> Path:
    """A random Llama (hidden 32, 1 layer: ~50K parameters) with the toy tokenizer, saved as a standard HF folder.
    The same seed gives the same bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tok = toy_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def toy_preferences(path: Path, n: int = 200, seed: int = 0) -> Path:
    """n preference rows {prompt, chosen, rejected} over the toy words: chosen says "yes good ...", rejected
    "no bad ...", so there is something to learn. Written as JSONL."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS[:20]) for _ in range(4)) + f" {WORDS[i % 20]}"
        tail = " ".join(rng.choice(WORDS[:20]) for _ in range(3))
        rows.append({"prompt": prompt, "chosen": f"yes good {tail}", "rejected": f"no bad {tail}"})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_run_config(sampler: str = "generate") -> str:
    """The settings (a --config TOML file's text) of a one-round run on the toy model and toy_preferences: 16 prompts
    in 4 chunks, batches of 2 pairs with an accumulation of 2, so that 2 processes have chunks, batches and micro-steps
    to share (tests/test_distributed.py, tests/test_vllm_process.py, benchmarks/processes.py)."""
    return f"""\
rounds = 1
[data]
labelled_share = "24"
pool_sizes = [16]
test_size = 20
[sample]
max_new_tokens = 8
chunk_size = 4
batch_size = 4
sampler = "{sampler}"
[judge]
batch_size = 4
[train]
batch_size = 2
grad_accum = 2
max_length = 64
max_prompt_length = 32
gradient_checkpointing = false
learning_rate = 1e-3
[lora]
r = 4
alpha = 8
"""


def build_toy_run(folder: Path, sampler: str = "generate") -> list[str]:
    """The toy model (folder/sft), its preference data (folder/prefs.jsonl) and toy_run_config (folder/toy.toml);
    returns the `selfie-lite run` arguments that use them."""
    folder = Path(folder)
    build_toy_model(folder / "sft")
    toy_preferences(folder / "prefs.jsonl", n=200)
    (folder / "toy.toml").write_text(toy_run_config(sampler))
    return ["--model", str(folder / "sft"), "--data", str(folder / "prefs.jsonl"), "--config", str(folder / "toy.toml"),
            "--random-seed", "1"]


def model_tag(model) -> str:
    """Which model this is, from the folder it was loaded from: "round-<i>" for a run's round model, else "init"."""
    path = Path(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", ""))
    return path.parent.name if path.name == "model" and path.parent.name.startswith("round-") else "init"


def hashed_logp(tag: str, prompt_ids: list[int], response_ids: list[int]) -> float:
    """The default canned log-prob: -0.5 per token minus a pseudo-random share in [0, 2) that depends on the model
    and the tokens; stable across processes (sha256, not hash())."""
    h = hashlib.sha256(f"{tag}|{prompt_ids}|{response_ids}".encode()).digest()
    return -0.5 * len(response_ids) - 2.0 * int.from_bytes(h[:4], "little") / 2**32


def reversing_judge(tag: str, prompt_ids: list[int], response_ids: list[int]) -> float:
    """A FakeBackend logp for guard tests: pi_0 and pi_1 rank every sample set in opposite orders and pi_init is flat,
    so round 2's self-labels (judge pi_1) disagree with the seed-DPO judge pi_0 on every pair."""
    s = hashed_logp("x", prompt_ids, response_ids)
    return {"init": 0.0, "round-0": s, "round-1": -s}.get(tag, s)


# (tag, prompt, sample index k, rng) -> response text
Responder = Callable[[str, str, int, random.Random], str]


def canned_response(tag: str, prompt: str, k: int, rng: random.Random) -> str:
    """The default canned sample: three to five toy words, drawn from a generator seeded by the call's seed."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 5)))


class FakeBackend(HFBackend):
    """HFBackend with canned sampling and scoring (see the module docstring). `logp(tag, prompt_ids, response_ids)`
    and `respond(tag, prompt, k, rng)` script them; `calls` records (what, model tag) for every generate and
    sequence_logps call."""

    name = "fake"

    def __init__(self, cfg: RunConfig, *, logp: Callable[[str, list[int], list[int]], float] = hashed_logp,
                 respond: Responder = canned_response):
        super().__init__(cfg)
        self.logp, self.respond = logp, respond
        self.calls: list[tuple[str, str]] = []

    def generate(self, model, tokenizer, prompts, *, num_samples, temperature, top_p, max_new_tokens, batch_size,
                 seed, on_batch=None):
        tag = model_tag(model)
        self.calls.append(("generate", tag))
        rng = random.Random(f"{seed}|{tag}")
        out = []
        for prompt in prompts:
            p = chat_prompt_ids(tokenizer, prompt)
            texts = [self.respond(tag, prompt, k, rng) for k in range(num_samples)]
            ids = [chat_response_ids(tokenizer, prompt, t)[:max_new_tokens] for t in texts]
            out.append({"prompt": prompt, "prompt_ids": p,
                        "responses": [tokenizer.decode(r, skip_special_tokens=True) for r in ids],
                        "response_ids": ids, "policy_logps": [self.logp(tag, p, r) for r in ids]})
        if on_batch:
            on_batch(len(prompts), sum(len(r) for row in out for r in row["response_ids"]))
        return out

    def sequence_logps(self, model, sequences, *, batch_size, on_batch=None):
        tag = model_tag(model)
        self.calls.append(("sequence_logps", tag))
        if on_batch:
            on_batch(len(sequences))
        return [self.logp(tag, list(p), list(r)) for p, r in sequences]


# ---------------------------------------------------------------------------------------------
# A random model of a real shape: what benchmarks/gpu.py measures and the unsloth backend tests load
#
# A model folder built from a config alone (Llama, Mistral or Qwen2; random weights, no download) with a generated
# word-level tokenizer: the words are "w<id>", one word = one token, so a prompt or response of n words is exactly
# n tokens; the vocabulary is the model's full size, so every sampled id decodes; the chat template is the tiny
# preset's (<s><|user|>...<|assistant|>...</s>). Real shapes (Mistral-7B, Qwen2.5-1.5B) are benchmark data and
# live in benchmarks/gpu.py; TINY_SHAPE is a 2-layer Llama that builds in about a second on a CPU.
#
#     from selfie_lite.testing import TINY_SHAPE, build_shaped_model
#     folder = build_shaped_model(tmp / "tiny")                 # or build_shaped_model(folder, shape, device="cuda")

SHAPED_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]  # ids 0..6
PROMPT_OVERHEAD = 3  # tokens the template adds to a prompt: <s><|user|>...<|assistant|>
PAIR_OVERHEAD = 4  # tokens it adds to a prompt and response: the prompt's 3 and </s> after the response

# qkv_bias is what the architecture has (qwen2: yes); the config does not take it, parameter counts read it.
TINY_SHAPE = dict(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, qkv_bias=False, tie_word_embeddings=False,
                  max_position_embeddings=512, rope_theta=10000.0)


def shaped_tokenizer(vocab_size: int, model_max_length: int):
    """WordLevel tokenizer over "w<id>" words (see above): ids 0..6 are SHAPED_SPECIALS, "w7".."w<vocab_size-1>"
    the rest."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from selfie_lite.tiny.build import CHAT_TEMPLATE as TINY_CHAT_TEMPLATE

    vocab = {t: i for i, t in enumerate(SHAPED_SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SHAPED_SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SHAPED_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=TINY_CHAT_TEMPLATE, model_max_length=model_max_length,
    )


def random_word_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    """n token ids of shaped_tokenizer's words (no special token)."""
    return [rng.randrange(len(SHAPED_SPECIALS), vocab_size) for _ in range(n)]


def random_words(rng: random.Random, n: int, vocab_size: int) -> str:
    """A text that shaped_tokenizer encodes as exactly n tokens."""
    return " ".join(f"w{i}" for i in random_word_ids(rng, n, vocab_size))


def shaped_config(shape: dict, tokenizer):
    """The transformers config of a shape dict (keys as in TINY_SHAPE; arch: llama, mistral or qwen2)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=shape["max_position_embeddings"],
        tie_word_embeddings=shape["tie_word_embeddings"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
    )
    if shape["arch"] == "mistral":
        return MistralConfig(**common, sliding_window=4096)
    if shape["arch"] == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    return LlamaConfig(**common)


def build_shaped_model(folder: Path, shape: dict = TINY_SHAPE, *, device: str = "cpu") -> Path:
    """A random-weight model of `shape` with shaped_tokenizer, saved as a standard HF folder (safetensors; bf16 when
    device is "cuda", else fp32). Seeded: the same shape on the same device gives the same weights. A folder already
    built from the same shape dict (its shape.json) is reused: a 7B build writes 14.5 GB."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    marker = folder / "shape.json"
    if marker.is_file() and json.loads(marker.read_text()).get("shape") == shape:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = shaped_tokenizer(shape["vocab_size"], shape["max_position_embeddings"])
    cfg = shaped_config(shape, tok)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds for 7B, where the CPU takes minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="5GB")
    tok.save_pretrained(str(folder))
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    marker.write_text(json.dumps({"shape": shape, "params": params}))
    return folder
