"""Chat-template token ids: one home for how a prompt and its response are laid out, used by sampling, judging,
training data, evaluation and the tiny preset's SFT data. A response's ids are exactly the tokens that follow the
generation prompt in the templated conversation, so the policy scores what it generated."""

from __future__ import annotations

from selfie_lite.compat import token_ids


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The user turn and the generation prompt (e.g. `<s><|user|>...<|assistant|>`): where a response starts."""
    return token_ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   tokenize=True))


def chat_conversation_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """The whole conversation, the response closed as the template closes an assistant turn."""
    return token_ids(tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=True))


def chat_response_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """Response tokens exactly as the chat template lays them out after the generation prompt."""
    p = chat_prompt_ids(tokenizer, prompt)
    full = chat_conversation_ids(tokenizer, prompt, response)
    if full[: len(p)] == p:
        return full[len(p) :]
    # Templates that render the last turn differently: fall back to the bare text plus end-of-sequence.
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
