"""The smol preset's task: verifiable instruction following in the style of IFEval (Zhou et al. 2023,
arXiv 2311.07911), sized for a 135M-parameter chat model.

A prompt is a base request in the model's own register (a short explanation, a few tips, a note to a friend, a
description) about one topic, followed by one or two checkable instructions, each written as one fixed sentence
(IFEval's wording where it has one):

    Explain recycling in simple terms. Answer with less than 40 words. Wrap your entire response with double
    quotation marks.

parse_prompt recovers the instructions from the prompt text alone (the base request must be one of ours too), so
the checker (checker.py) scores any (prompt, response) pair; a prompt that is not ours raises ValueError.

Instruction kinds (IFEval instruction id in brackets; checks in checker.py):
    lowercase   all lowercase letters                      [change_case:english_lowercase]
    capital     all capital letters                        [change_case:english_capital]
    max_words   less than N words                          [length_constraints:number_words, "less than"]
    min_words   at least N words                           [length_constraints:number_words, "at least"]
    include     include a keyword                          [keywords:existence]
    forbid      avoid a word (the topic's own word)        [keywords:forbidden_words]
    end         end with an exact phrase                   [startend:end_checker]
    quotes      whole answer in double quotes              [startend:quotation]
    bullets     exactly N "* " bullet points               [detectable_format:number_bullet_lists]
    title       a title in << >>                           [detectable_format:title]
    no_comma    no commas                                  [punctuation:no_comma]
    json        the whole answer is valid JSON             [detectable_format:json_format]

Pure Python on purpose: prompt generation and scoring need neither torch nor a tokenizer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

# Base requests. {t} is a topic: a lowercase noun phrase that reads right in every template.
REQUESTS: tuple[str, ...] = (
    "Explain {t} in simple terms.",
    "Write a short note to a friend about {t}.",
    "Give some tips about {t}.",
    "Describe {t} in a few sentences.",
    "Why is {t} important?",
    "Write a short paragraph about {t}.",
    "Tell me a few facts about {t}.",
)

# Topics the model can talk about. The last word is the topic's own word: the one the "forbid" instruction bans
# (the word the model reaches for first, so avoiding it is a real constraint with room to learn).
TOPICS: tuple[str, ...] = (
    "sleep", "exercise", "the ocean", "recycling", "friendship", "healthy eating", "learning a new language",
    "the moon", "rain", "music", "reading books", "drinking water", "gardening", "the sun", "honey bees", "trees",
    "the internet", "saving money", "cooking at home", "walking", "coffee", "tea", "mountains", "rivers", "cats",
    "dogs", "birds", "the weather", "summer", "winter", "autumn", "spring", "the library", "school", "teamwork",
    "kindness", "patience", "time management", "public transport", "bicycles", "photography", "painting", "chess",
    "football", "swimming", "camping", "breakfast", "fruit", "vegetables", "bread", "volcanoes", "the stars",
    "electricity", "computers", "maps", "clocks", "forests", "deserts", "snow", "the wind",
)

# Keywords for "include": everyday words, related to no topic in particular, so the model meets the instruction
# sometimes by chance and mostly only when it follows it.
KEYWORDS: tuple[str, ...] = (
    "simple", "happy", "daily", "nature", "together", "balance", "energy", "future", "family", "world", "health",
    "morning", "friend", "calm", "history", "smile", "sunlight", "journey", "wonderful", "careful",
)
END_PHRASES: tuple[str, ...] = (
    "Any other questions?",
    "Is there anything else I can help with?",
    "Hope this helps.",
    "Have a nice day.",
)
MAX_WORDS = (20, 30, 40)  # "less than N words"
MIN_WORDS = (30, 40)  # "at least N words": the model's answers average ~36 words; 40 still fits in 64 tokens
N_BULLETS = (2, 3)

# One sentence per instruction kind; {n} a number, {w} a keyword, {p} an end phrase. IFEval's own wording where it has
# one (bullets: IFEval's example list is shown inline, since our prompts are one line).
INSTRUCTIONS: dict[str, str] = {
    "lowercase": "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
    "capital": "Your entire response should be in English, and in all capital letters.",
    "max_words": "Answer with less than {n} words.",
    "min_words": "Answer with at least {n} words.",
    "include": 'Include the keyword "{w}" in your response.',
    "forbid": 'Do not include the word "{w}" in your response.',
    "end": 'Finish your response with this exact phrase "{p}". No other words should follow this phrase.',
    "quotes": "Wrap your entire response with double quotation marks.",
    "bullets": "Your answer must contain exactly {n} bullet points. Use the markdown bullet points such as: * This is a point.",
    "title": "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
    "no_comma": "In your entire response, refrain from the use of any commas.",
    "json": "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
}
KINDS = tuple(INSTRUCTIONS)

# How often each kind is drawn. Measured on SmolLM2-135M-Instruct's own answers (temperature 0.7, 64 tokens, 192
# prompts): it meets a title 93% of the time and "at least N words" 87% (it rambles to the limit), so those two are
# drawn less (little to learn); JSON is rare (valid 0-12%: the answer is cut off before it closes), so that a kind
# the model nearly never meets does not fill the set with ties. Lowercase, capitals, quotes, end phrase: 0-4%.
KIND_WEIGHTS: dict[str, float] = {
    "lowercase": 1.0, "capital": 1.0, "max_words": 1.0, "min_words": 0.6, "include": 1.0, "forbid": 1.0,
    "end": 1.0, "quotes": 1.0, "bullets": 1.0, "title": 0.6, "no_comma": 1.0, "json": 0.4,
}
# Kinds that cannot (or can hardly) hold together in one answer are never paired.
CONFLICTS: frozenset[frozenset[str]] = frozenset(
    frozenset(p) for p in [
        ("lowercase", "capital"), ("max_words", "min_words"), ("quotes", "bullets"),
        ("json", "lowercase"), ("json", "capital"), ("json", "end"), ("json", "quotes"), ("json", "bullets"),
        ("json", "title"), ("json", "no_comma"), ("json", "min_words"),
    ]
)
P_TWO_INSTRUCTIONS = 0.5

_SLOTS = {"n": r"(?P<n>\d{1,3})", "w": r"(?P<w>[a-z]{2,20})", "p": r"(?P<p>[A-Z][^\"]{1,60}[.?!])"}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{[a-z]\})", template)
    return re.compile("".join(_SLOTS[p[1]] if re.fullmatch(r"\{[a-z]\}", p) else re.escape(p) for p in parts))


_INSTRUCTION_PATTERNS = {kind: _pattern(" " + t) for kind, t in INSTRUCTIONS.items()}
_TOPIC = r"(?P<t>[a-z][a-z ]{0,40}[a-z])"
_REQUEST_PATTERNS = [(r, re.compile(re.escape(r).replace(re.escape("{t}"), _TOPIC))) for r in REQUESTS]


@dataclass(frozen=True)
class Instruction:
    kind: str  # one of KINDS
    args: dict = field(default_factory=dict)  # {"n": int} | {"word": str} | {"phrase": str} | {}

    def text(self) -> str:
        a = self.args
        return INSTRUCTIONS[self.kind].format(n=a.get("n", ""), w=a.get("word", ""), p=a.get("phrase", ""))


@dataclass(frozen=True)
class Prompt:
    request: str  # the base request's template
    topic: str
    instructions: tuple[Instruction, ...]

    @property
    def base(self) -> str:
        """The base request alone, e.g. "Explain sleep in simple terms." (the same request without instructions)."""
        return self.request.format(t=self.topic)

    def text(self) -> str:
        return " ".join([self.base] + [i.text() for i in self.instructions])


def topic_word(topic: str) -> str:
    return topic.split()[-1]


def parse_prompt(prompt: str) -> Prompt:
    """Recover the request, topic and instructions from the prompt text alone; ValueError if it is not one of ours."""
    text = prompt.strip()
    for request, pat in _REQUEST_PATTERNS:
        m = pat.match(text)
        if not m:
            continue
        instructions, pos = [], m.end()
        while pos < len(text):
            hits = [(k, h) for k, p in _INSTRUCTION_PATTERNS.items() if (h := p.match(text, pos))]
            if len(hits) != 1:
                break
            kind, h = hits[0]
            instructions.append(_instruction(kind, h.groupdict()))
            pos = h.end()
        if pos == len(text) and instructions:
            kinds = [i.kind for i in instructions]
            if len(set(kinds)) != len(kinds):
                raise ValueError(f"not a smol-preset prompt: {prompt[:80]!r} repeats an instruction")
            return Prompt(request, m.group("t"), tuple(instructions))
    raise ValueError(f"not a smol-preset prompt: {prompt[:80]!r} (no known request followed by known instructions)")


def _instruction(kind: str, g: dict) -> Instruction:
    if g.get("n") is not None:
        n = int(g["n"])
        if n < 1:
            raise ValueError(f"not a smol-preset prompt: {kind} with n = {n}")
        return Instruction(kind, {"n": n})
    if g.get("w") is not None:
        return Instruction(kind, {"word": g["w"]})
    if g.get("p") is not None:
        return Instruction(kind, {"phrase": g["p"]})
    return Instruction(kind)


def make_instruction(kind: str, topic: str, rng: random.Random) -> Instruction:
    if kind == "max_words":
        return Instruction(kind, {"n": rng.choice(MAX_WORDS)})
    if kind == "min_words":
        return Instruction(kind, {"n": rng.choice(MIN_WORDS)})
    if kind == "bullets":
        return Instruction(kind, {"n": rng.choice(N_BULLETS)})
    if kind == "include":
        return Instruction(kind, {"word": rng.choice([w for w in KEYWORDS if w not in topic.split()])})
    if kind == "forbid":
        return Instruction(kind, {"word": topic_word(topic)})
    if kind == "end":
        return Instruction(kind, {"phrase": rng.choice(END_PHRASES)})
    if kind in INSTRUCTIONS:
        return Instruction(kind)
    raise ValueError(f"unknown instruction kind {kind!r}; one of {KINDS}")


def make_prompt(rng: random.Random, n_instructions: int | None = None, *, request: str | None = None,
                topic: str | None = None) -> Prompt:
    """One prompt drawn from rng: request and topic (unless given), and one or two compatible instructions (kinds
    weighted by KIND_WEIGHTS, in the order drawn)."""
    request, topic = request or rng.choice(REQUESTS), topic or rng.choice(TOPICS)
    n = n_instructions or (2 if rng.random() < P_TWO_INSTRUCTIONS else 1)
    kinds: list[str] = []
    while len(kinds) < n:
        options = [k for k in KINDS if k not in kinds and all(frozenset((k, o)) not in CONFLICTS for o in kinds)]
        kinds.append(rng.choices(options, weights=[KIND_WEIGHTS[k] for k in options])[0])
    return Prompt(request, topic, tuple(make_instruction(k, topic, rng) for k in kinds))
