"""Version shims: every place where selfie-lite bends to a particular version of transformers, TRL or PEFT, each
naming the version it exists for, so that dropping support for an old version is a matter of deleting here."""

from __future__ import annotations


def token_ids(encoded) -> list[int]:
    """The ids of `tokenizer.apply_chat_template(..., tokenize=True)`: a BatchEncoding from transformers 5 on, a plain
    list before (transformers 4.x, which the GPU stack's Unsloth may pin)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
