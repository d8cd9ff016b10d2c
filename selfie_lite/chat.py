"""Chat-template token ids: one home for how a prompt and its response are laid out, used by sampling, judging,
training data, evaluation and the tiny preset's SFT data. A response's ids are exactly the tokens that follow the
generation prompt in the templated conversation, up to the end of the turn (through_end_of_turn), so the policy
scores what it generated."""

from __future__ import annotations


def template_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """The token ids of `messages` laid out by the tokenizer's chat template (a BatchEncoding in transformers 5)."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"])


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The user turn and the generation prompt (e.g. `<s><|user|>...<|assistant|>`): where a response starts."""
    return template_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def chat_conversation_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """The whole conversation, the response closed as the template closes an assistant turn."""
    return template_ids(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def chat_response_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """Response tokens exactly as the chat template lays them out after the generation prompt."""
    p = chat_prompt_ids(tokenizer, prompt)
    full = chat_conversation_ids(tokenizer, prompt, response)
    if full[: len(p)] == p:
        return through_end_of_turn(full[len(p) :], end_of_turn_ids(tokenizer))
    # Templates that render the last turn differently: fall back to the bare text plus end-of-sequence.
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def end_of_turn_ids(tokenizer) -> set[int]:
    """The ids that can close an assistant turn: eos and the other special tokens (<|im_end|>, <|eot_id|>,
    <end_of_turn>...)."""
    return {i for i in [*tokenizer.all_special_ids, tokenizer.eos_token_id] if i is not None}


def through_end_of_turn(response_ids: list[int], stops: set[int]) -> list[int]:
    """A response's ids up to and including its last end-of-turn token (all of them when it has none).

    Templates may write more after the turn closes: ChatML writes <|im_end|> and then a newline. The model never
    generates that newline (sampling stops at <|im_end|>), so a response is scored and trained as it is sampled,
    ending at its end of turn; without this, the judge and the trainer scored one token the sampler never drew."""
    last = max((i for i, t in enumerate(response_ids) if t in stops), default=None)
    return list(response_ids) if last is None else list(response_ids[: last + 1])
