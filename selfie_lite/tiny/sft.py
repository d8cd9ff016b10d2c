"""The tiny preset's SFT model: trained from scratch on the preset's SFT rows (a small Llama, CPU minutes), and
sampled for the preset's report. build.py calls train_sft once per build."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from contextlib import contextmanager

from selfie_lite.chat import chat_conversation_ids, chat_prompt_ids

MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
SFT_TRAIN = {"epochs": 4, "batch_size": 32, "learning_rate": 5e-3, "warmup_steps": 50, "weight_decay": 0.0, "seed": 0}
MAX_SEQ_TOKENS = 64


def _encode_sft(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(ids, n_prompt_tokens) per row; the loss covers only the assistant tokens and the closing eos."""
    out = []
    for row in rows:
        prompt_ids = chat_prompt_ids(tokenizer, row["prompt"])
        ids = chat_conversation_ids(tokenizer, row["prompt"], row["response"])
        if ids[: len(prompt_ids)] != prompt_ids:
            raise AssertionError(f"chat template is not prefix-consistent for {row['prompt']!r}")
        if len(ids) > MAX_SEQ_TOKENS:
            raise AssertionError(f"SFT row of {len(ids)} tokens exceeds {MAX_SEQ_TOKENS}: {row}")
        out.append((ids, len(prompt_ids)))
    return out


def _length_bucketed_batches(encoded: list, batch_size: int, rng: random.Random) -> list[list]:
    """Shuffled batches of similar length: padding would otherwise cost about 40% of the compute."""
    idx = list(range(len(encoded)))
    rng.shuffle(idx)
    window = batch_size * 32
    batches = []
    for start in range(0, len(idx), window):
        chunk = sorted(idx[start : start + window], key=lambda i: len(encoded[i][0]))
        batches += [[encoded[i] for i in chunk[j : j + batch_size]] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


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
    opt = torch.optim.AdamW(
        model.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"], betas=(0.9, 0.98), foreach=True
    )

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 0
        return min(1.0, (step + 1) / hp["warmup_steps"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    losses: list[float] = []
    step = 0
    for _ in range(hp["epochs"]):
        for batch in _length_bucketed_batches(encoded, bs, order_rng):
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


def sample_responses(
    model,
    tokenizer,
    prompts: list[str],
    temperature: float = 0.7,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 100,
) -> list[dict]:
    """{"text", "n_tokens" (without eos), "finished" (eos reached)} per prompt.

    Pure temperature sampling: top_k=0 is passed because transformers otherwise applies top_k=50."""
    import torch

    torch.manual_seed(seed)
    out: list[dict] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [chat_prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(c) for c in chunk)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(c)) + c for c in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        with torch.no_grad():
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in gen[:, width:].tolist():
            n = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            out.append(
                {"text": tokenizer.decode(row[:n], skip_special_tokens=True), "n_tokens": n, "finished": n < len(row)}
            )
    return out


@contextmanager
def one_quiet_thread():
    """Train and sample on one thread: the result no longer depends on the core count, and on a shared
    2-core machine one thread ran 2-3x faster than two (measured). Also hides transformers' tqdm bars,
    which would break the CLI's own progress bar."""
    import torch
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
