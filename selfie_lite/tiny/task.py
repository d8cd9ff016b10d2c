"""The tiny preset's task family and its oracle, the stand-in for a human annotator.

Prompts are short instructions of seven kinds (add two digits, pick the larger number, sort digits,
count the words of a list, reverse a word list, uppercase a word, repeat a word), each written with a
few templates. The oracle recovers the task from the prompt text alone, so any (prompt, response)
pair can be scored exactly; an unknown prompt raises ValueError.

Oracle, all parts judged against the true answer A of the prompt:
- correct: the extracted answer equals A (case-sensitive, spaces collapsed). The answer is the text
  after the last "answer is" / "answer:" (else after the last " is ", else the last sentence),
  up to the next sentence end.
- formatted: the response ends with the one sentence "The answer is A'." (any A', exactly one
  "answer" in the response; a polite sentence before it is allowed).
- concise: at least one word and at most as many words as "The answer is A." (no filler, no rambling).
- score = 0.60 * correct + 0.25 * formatted + 0.15 * concise, in [0, 1].
  "Good" means score >= GOOD_SCORE = 0.85, i.e. correct and formatted.

Pure Python on purpose: data generation and scoring need neither torch nor a tokenizer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

GOOD_SCORE = 0.85
_W_CORRECT, _W_FORMATTED, _W_CONCISE = 60, 25, 15  # hundredths, so 0.85 is exactly 85/100

# Short words, so that the 512-token BPE keeps each as one token and the list tasks stay learnable.
WORDS = (
    "cat dog sun moon tree fish bird star ship frog lake rain snow wind fire gold king leaf milk rose "
    "sand wolf bear duck goat lion book desk door lamp bell drum road hill cake rice corn salt egg box"
).split()

_NUM_WORDS = {"two": 2, "three": 3}

# Each task kind: templates (placeholders: {a} {b} integers, {d} digits "4 1 3", {w} a word, {ws} words
# "cat dog sun", {n} "two"/"three"). Templates must stay unambiguous: parse_prompt checks that exactly one
# matches. Kinds are chosen so that a 0.5M-parameter model learns most of them in a minute of CPU.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "Add {a} and {b}.",
        "What is {a} plus {b}?",
        "Compute {a} + {b}.",
        "What is the sum of {a} and {b}?",
        "Please add {a} to {b}.",
    ),
    "larger": (
        "Which is larger, {a} or {b}?",
        "Pick the bigger number: {a} or {b}.",
        "What is the maximum of {a} and {b}?",
    ),
    "sort": (
        "Sort these digits: {d}.",
        "Put these digits in increasing order: {d}.",
        "Sort from smallest to largest: {d}.",
    ),
    "count": (
        "How many words are in: {ws}?",
        "Count the words: {ws}.",
        "How many words does this list have: {ws}?",
    ),
    "reverse": (
        "Reverse the order of: {ws}.",
        "Reverse this list: {ws}.",
        "Put these words in reverse order: {ws}.",
    ),
    "upper": (
        "Write {w} in capital letters.",
        "Uppercase the word {w}.",
        "Convert {w} to upper case.",
        "Shout the word {w}.",
    ),
    "repeat": (
        "Repeat the word {w} {n} times.",
        "Say {w} {n} times.",
        "Write {w} {n} times.",
    ),
}
KINDS = tuple(TEMPLATES)

_SLOT = {
    "a": r"(?P<a>\d{1,3})",
    "b": r"(?P<b>\d{1,3})",
    "d": r"(?P<d>\d(?: \d){1,7})",
    "w": r"(?P<w>[a-z]{1,12})",
    "ws": r"(?P<ws>[a-z]{1,12}(?: [a-z]{1,12}){1,7})",
    "n": r"(?P<n>two|three)",
}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"(\{[a-z]+\})", template)
    return re.compile("".join(_SLOT[p[1:-1]] if re.fullmatch(r"\{[a-z]+\}", p) else re.escape(p) for p in parts))


_PATTERNS = [(kind, t, _compile(t)) for kind, ts in TEMPLATES.items() for t in ts]


@dataclass(frozen=True)
class Task:
    kind: str
    template: str
    args: dict
    answer: str  # the true answer, as it should follow "The answer is "


def _solve(kind: str, g: dict) -> str:
    if kind == "add":
        return str(int(g["a"]) + int(g["b"]))
    if kind == "larger":
        return str(max(int(g["a"]), int(g["b"])))
    if kind == "sort":
        return " ".join(sorted(g["d"].split()))
    if kind == "count":
        return str(len(g["ws"].split()))
    if kind == "reverse":
        return " ".join(g["ws"].split()[::-1])
    if kind == "upper":
        return g["w"].upper()
    if kind == "repeat":
        return " ".join([g["w"]] * _NUM_WORDS[g["n"]])
    raise AssertionError(kind)


def parse_prompt(prompt: str) -> Task:
    """Recover the task from the prompt text alone; ValueError if it is not one of ours."""
    text = prompt.strip()
    hits = [(kind, t, m) for kind, t, pat in _PATTERNS if (m := pat.fullmatch(text))]
    if len(hits) != 1:
        why = "matches no task template" if not hits else f"is ambiguous ({len(hits)} templates match)"
        raise ValueError(f"not a tiny-preset prompt: {prompt!r} {why}")
    kind, template, m = hits[0]
    args = {k: v for k, v in m.groupdict().items() if v is not None}
    if kind == "larger" and int(args["a"]) == int(args["b"]):
        raise ValueError(f"not a tiny-preset prompt: {prompt!r} compares a number with itself")
    if kind == "reverse" and len(set(args["ws"].split())) == 1:
        raise ValueError(f"not a tiny-preset prompt: {prompt!r} reverses a list of one repeated word")
    return Task(kind, template, args, _solve(kind, args))


def make_prompt(rng: random.Random, kind: str | None = None) -> str:
    """One prompt: task kind (random unless given), template and arguments drawn from rng."""
    kind = kind or rng.choice(KINDS)
    template = rng.choice(TEMPLATES[kind])
    if kind == "add":
        args = {"a": rng.randint(0, 9), "b": rng.randint(0, 9)}
    elif kind == "larger":
        a, b = rng.sample(range(21), 2)
        args = {"a": a, "b": b}
    elif kind == "sort":
        args = {"d": " ".join(str(rng.randint(0, 9)) for _ in range(3))}  # v1: 3-4 digits, out of the model's reach
    elif kind == "count":
        args = {"ws": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))}
    elif kind == "reverse":
        args = {"ws": " ".join(rng.sample(WORDS, rng.randint(2, 3)))}
    elif kind == "upper":
        args = {"w": rng.choice(WORDS)}
    elif kind == "repeat":
        args = {"w": rng.choice(WORDS), "n": rng.choice(list(_NUM_WORDS))}
    else:
        raise ValueError(f"unknown task kind {kind!r}; one of {KINDS}")
    return template.format(**args)


# ---------------------------------------------------------------------------------------------
# The oracle

_FRAME = re.compile(r"answer(?: is|:)\s*", re.IGNORECASE)
_FORMATTED = re.compile(r"(?:.*[.!?]\s+)?The answer is [^.!?\n]+\.", re.DOTALL)


def extract_answer(response: str) -> str:
    text = response.strip()
    frames = list(_FRAME.finditer(text))
    if frames:
        rest = text[frames[-1].end() :]
    else:
        markers = list(re.finditer(r"\bis\s+|:\s*", text))
        if markers:
            rest = text[markers[-1].end() :]
        else:
            sentences = [s for s in re.split(r"[.!?\n]+\s*", text) if s.strip()]
            rest = sentences[-1] if sentences else ""
    return " ".join(re.split(r"[.!?\n]", rest, maxsplit=1)[0].split())


def score_details(prompt: str, response: str) -> dict:
    """Oracle verdict for one pair: correct, formatted, concise and the weighted score."""
    task = parse_prompt(prompt)
    text = response.strip()
    correct = extract_answer(text) == task.answer
    formatted = bool(_FORMATTED.fullmatch(text)) and len(_FRAME.findall(text)) == 1
    n_words = len(text.split())
    concise = 1 <= n_words <= 3 + len(task.answer.split())
    points = _W_CORRECT * correct + _W_FORMATTED * formatted + _W_CONCISE * concise
    return {"correct": correct, "formatted": formatted, "concise": concise, "score": points / 100}


def score(prompt: str, response: str) -> float:
    return score_details(prompt, response)["score"]


def is_good(prompt: str, response: str) -> bool:
    return score(prompt, response) >= GOOD_SCORE


# ---------------------------------------------------------------------------------------------
# Response generators of varied quality (the "other models" whose answers get annotated)

STYLES = ("canonical", "filler", "bare", "loose", "trailing", "ramble")
_PREFIXES = ("Sure!", "Sure, happy to help.", "Good question!", "Let me think.", "Okay, let me see.", "Hmm, nice one.")
_SUFFIXES = ("Hope this helps!", "Let me know if you need anything else.", "That was fun!")
_RAMBLES = (
    "I worked it out step by step, so the result is {A}.",
    "After thinking it over carefully, my final result is {A}.",
    "Going through it slowly, what I get is {A}.",
)


def wrong_answer(task: Task, rng: random.Random) -> str:
    """A plausible mistake for this task, never equal to the true answer."""
    g, truth = task.args, task.answer
    for _ in range(50):
        if task.kind in ("add", "count"):
            guess = str(max(0, int(truth) + rng.choice((-2, -1, 1, 2))))
        elif task.kind == "larger":
            guess = str(min(int(g["a"]), int(g["b"]))) if rng.random() < 0.7 else str(int(truth) + rng.choice((-1, 1)))
        elif task.kind in ("sort", "reverse"):
            items = (g["d"] if task.kind == "sort" else g["ws"]).split()
            items = sorted(items) if task.kind == "sort" else items[::-1]
            choice = rng.random()
            if choice < 0.4:
                guess = " ".join(items[::-1])
            elif choice < 0.7:
                i = rng.randrange(len(items) - 1)
                items[i], items[i + 1] = items[i + 1], items[i]
                guess = " ".join(items)
            else:
                del items[rng.randrange(len(items))]
                guess = " ".join(items)
        elif task.kind == "upper":
            w = g["w"]
            guess = rng.choice((w, w.capitalize(), w[:-1].upper() + w[-1]))
        elif task.kind == "repeat":
            n = _NUM_WORDS[g["n"]] + rng.choice((-1, 1))
            guess = " ".join([g["w"]] * n)
        else:
            raise AssertionError(task.kind)
        if guess != truth:
            return guess
    return truth + " " + truth  # only for degenerate inputs such as "Sort these digits: 3 3 3."


def make_response(prompt: str, rng: random.Random, style: str, correct: bool) -> str:
    task = parse_prompt(prompt)
    answer = task.answer if correct else wrong_answer(task, rng)
    if style == "canonical":
        return f"The answer is {answer}."
    if style == "filler":
        return f"{rng.choice(_PREFIXES)} The answer is {answer}."
    if style == "bare":
        return answer
    if style == "loose":
        return f"the answer is {answer}"
    if style == "trailing":
        return f"The answer is {answer}. {rng.choice(_SUFFIXES)}"
    if style == "ramble":
        return f"{rng.choice(_PREFIXES)} {rng.choice(_RAMBLES).format(A=answer)}"
    raise ValueError(f"unknown style {style!r}; one of {STYLES}")


def random_response(
    prompt: str, rng: random.Random, style_weights: dict[str, float] | None = None,
    p_correct: float | dict[str, float] = 0.6,
) -> str:
    """A response from the mix: style drawn by weight (uniform if None), right with p_correct, which is one number
    or a number per style (a "responder": how careful the writer of that style is, see build.RESPONDERS)."""
    styles = list(style_weights) if style_weights else list(STYLES)
    weights = list(style_weights.values()) if style_weights else None
    style = rng.choices(styles, weights=weights)[0]
    p = p_correct[style] if isinstance(p_correct, dict) else p_correct
    return make_response(prompt, rng, style, rng.random() < p)
