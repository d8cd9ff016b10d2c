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


def model_tag(model) -> str:
    """Which model this is, from the folder it was loaded from: "round-<i>" for a run's round model, else "init"."""
    path = Path(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", ""))
    return path.parent.name if path.name == "model" and path.parent.name.startswith("round-") else "init"


def hashed_logp(tag: str, prompt_ids: list[int], response_ids: list[int]) -> float:
    """The default canned log-prob: -0.5 per token minus a pseudo-random share in [0, 2) that depends on the model
    and the tokens; stable across processes (sha256, not hash())."""
    h = hashlib.sha256(f"{tag}|{prompt_ids}|{response_ids}".encode()).digest()
    return -0.5 * len(response_ids) - 2.0 * int.from_bytes(h[:4], "little") / 2**32


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
