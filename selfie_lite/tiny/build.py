"""Build the tiny preset offline: gold preference set, held-out prompts, a BPE tokenizer and a small SFT model.

Why: machines with no GPU and no hub still need a real chat model and a labelled preference set, and the
oracle in task.py lets alignment quality be measured exactly. Everything is generated from fixed seeds,
so two builds on one machine give the same data (same data_hash) and the same weights.

The SFT data is a deliberately noisy mix of response styles (some wrong, some rambling, some unformatted),
so the SFT model's samples spread in oracle quality and DPO has room to move it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from selfie_lite.tiny import task as T

PRESET_NAME = "tiny-v1"
DATA_SEED = 0
N_PREFERENCES = 6000
N_EVAL = 300
N_VAL = 300
N_SFT = 8000

# The SFT mix: style weights and the share of right answers. Tuned so that the SFT model's samples at
# temperature 0.7 are "good" (correct and formatted) about half the time (see sft_report).
SFT_STYLE_WEIGHTS = {"canonical": 0.30, "filler": 0.12, "bare": 0.14, "loose": 0.14, "trailing": 0.15, "ramble": 0.15}
SFT_P_CORRECT = 0.8
# Gold pairs come from other "models": uniform styles, 60% right, like UltraFeedback's mixed sources.
PREF_P_CORRECT = 0.6

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
SFT_TRAIN = {"epochs": 4, "batch_size": 64, "learning_rate": 3e-3, "warmup_steps": 30, "weight_decay": 0.0, "seed": 0}
MAX_SEQ_TOKENS = 64


@dataclass(frozen=True)
class TinyPreset:
    root: Path
    model_dir: Path
    preferences: Path
    eval_prompts: Path
    val_prompts: Path
    manifest: dict


def default_cache_dir() -> Path:
    base = os.environ.get("SELFIE_LITE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "selfie-lite") / PRESET_NAME


def _preset_at(root: Path) -> TinyPreset:
    manifest = json.loads((root / "manifest.json").read_text())
    return TinyPreset(
        root=root,
        model_dir=root / "sft-model",
        preferences=root / "preferences.jsonl",
        eval_prompts=root / "eval_prompts.jsonl",
        val_prompts=root / "val_prompts.jsonl",
        manifest=manifest,
    )


# ---------------------------------------------------------------------------------------------
# Data


def generate_data(seed: int = DATA_SEED) -> dict[str, list[dict]]:
    """Eval, val, preference and SFT rows; eval and val prompts appear nowhere else."""
    rng = random.Random(seed)
    queues: dict[str, list[str]] = {}
    for kind in T.KINDS:
        universe = T.prompt_universe(kind)
        rng.shuffle(universe)
        queues[kind] = universe

    def take(n: int) -> list[str]:
        return [queues[rng.choice(T.KINDS)].pop() for _ in range(n)]

    eval_prompts = take(N_EVAL)
    val_prompts = take(N_VAL)
    train_pool = {kind: list(q) for kind, q in queues.items()}  # what is left after eval and val

    preferences = []
    for _ in range(N_PREFERENCES):
        kind = rng.choice(T.KINDS)
        if not queues[kind]:  # small kinds run out: reuse their prompts, reshuffled
            queues[kind] = list(train_pool[kind])
            rng.shuffle(queues[kind])
        prompt = queues[kind].pop()
        a = T.random_response(prompt, rng, p_correct=PREF_P_CORRECT)
        for _ in range(100):
            b = T.random_response(prompt, rng, p_correct=PREF_P_CORRECT)
            if T.score(prompt, b) != T.score(prompt, a):
                break
        sa, sb = T.score(prompt, a), T.score(prompt, b)
        (chosen, sc), (rejected, sr) = sorted([(a, sa), (b, sb)], key=lambda x: -x[1])
        preferences.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "score_chosen": sc, "score_rejected": sr})

    sft = []
    for _ in range(N_SFT):
        prompt = rng.choice(train_pool[rng.choice(T.KINDS)])
        sft.append({"prompt": prompt, "response": T.random_response(prompt, rng, SFT_STYLE_WEIGHTS, SFT_P_CORRECT)})

    return {
        "preferences": preferences,
        "eval_prompts": [{"prompt": p} for p in eval_prompts],
        "val_prompts": [{"prompt": p} for p in val_prompts],
        "sft": sft,
    }


def data_hash(data: dict) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str]):
    """Byte-level BPE wrapped as a PreTrainedTokenizerFast with our chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        extra_special_tokens=[SPECIAL_TOKENS[k] for k in ("system", "user", "assistant")],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # generation pads on the left; the SFT loop pads by itself
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )


def chat_ids(tokenizer, prompt: str, response: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    enc = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=response is None)
    return list(enc["input_ids"])


# ---------------------------------------------------------------------------------------------
# SFT


def _encode_sft(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(ids, n_prompt_tokens) per row; the loss covers only the assistant tokens and the closing eos."""
    out = []
    for row in rows:
        prompt_ids = chat_ids(tokenizer, row["prompt"])
        ids = chat_ids(tokenizer, row["prompt"], row["response"])
        if ids[: len(prompt_ids)] != prompt_ids:
            raise AssertionError(f"chat template is not prefix-consistent for {row['prompt']!r}")
        if len(ids) > MAX_SEQ_TOKENS:
            raise AssertionError(f"SFT row of {len(ids)} tokens exceeds {MAX_SEQ_TOKENS}: {row}")
        out.append((ids, len(prompt_ids)))
    return out


def train_sft(tokenizer, rows: list[dict], progress: Callable[[float], None] | None = None, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hp = {**SFT_TRAIN, **overrides}
    torch.manual_seed(hp["seed"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )
    model = LlamaForCausalLM(config)
    model.train()
    encoded = _encode_sft(tokenizer, rows)
    order_rng = random.Random(hp["seed"])
    bs = hp["batch_size"]
    steps_per_epoch = (len(encoded) + bs - 1) // bs
    total = steps_per_epoch * hp["epochs"]
    opt = torch.optim.AdamW(model.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"], betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / hp["warmup_steps"]) * 0.5 * (1 + __import__("math").cos(__import__("math").pi * min(1.0, s / total))),
    )
    losses: list[float] = []
    step = 0
    for _ in range(hp["epochs"]):
        idx = list(range(len(encoded)))
        order_rng.shuffle(idx)
        for start in range(0, len(idx), bs):
            batch = [encoded[i] for i in idx[start : start + bs]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (ids, n_prompt) in enumerate(batch):  # right padding: positions stay 0..n-1
                input_ids[r, : len(ids)] = torch.tensor(ids)
                labels[r, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
                mask[r, : len(ids)] = 1
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if progress:
                progress(step / total)
    model.eval()
    return model, {"steps": total, "final_loss": sum(losses[-20:]) / len(losses[-20:]), **hp}


def sample(model, tokenizer, prompts: list[str], temperature: float = 0.7, max_new_tokens: int = 48, seed: int = 0, batch_size: int = 100):
    """Responses (text, n_new_tokens) per prompt; plain temperature sampling (top_k off, top_p 1)."""
    import torch

    torch.manual_seed(seed)
    out: list[tuple[str, int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [chat_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(c) for c in chunk)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        with torch.no_grad():
            gen = model.generate(
                input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature,
                top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        for row in gen[:, width:].tolist():
            n = next((i + 1 for i, t in enumerate(row) if t == tokenizer.eos_token_id), len(row))
            out.append((tokenizer.decode(row[:n], skip_special_tokens=True), n))
    return out
