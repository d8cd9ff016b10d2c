"""The writers of the smol preset's gold pairs: besides the SFT model itself, editors that rewrite one of its answers
towards the prompt's instructions (careful), towards some of them (partial), with near misses (careless), or that
run out of room (truncated). As in UltraFeedback, where several models answer each prompt, the pairs are off-policy:
they differ in which instructions they follow, and the checker (our "human") says which answer is better.

Every writer is a pure function of (prompt, source text, rng): the build is deterministic from its seed. An edit
need not succeed (the checker labels whatever it wrote), but the careful editor meets every instruction of our
prompts on the texts the model writes (tests/test_smol_task.py checks it on hand-written and random texts).
"""

from __future__ import annotations

import json
import random
import re

from selfie_lite.smol.checker import count_words
from selfie_lite.smol.task import Prompt

WRITERS = ("policy", "careful", "partial", "careless", "truncated")

# One natural sentence per "include" keyword (task.KEYWORDS), about nothing in particular: it fits any topic.
KEYWORD_SENTENCES = {
    "simple": "The idea is simple.", "happy": "It can make you happy.", "daily": "It is part of daily life.",
    "nature": "It is part of nature.", "together": "It brings people together.", "balance": "It is all about balance.",
    "energy": "It gives you energy.", "future": "It matters for the future.",
    "family": "The whole family can enjoy it.", "world": "People all over the world know it.",
    "health": "It is good for your health.", "morning": "Think about it in the morning.",
    "friend": "Share it with a friend.", "calm": "It can help you feel calm.", "history": "It has a long history.",
    "smile": "It can make you smile.", "sunlight": "Think of it like sunlight.",
    "journey": "Learning about it is a journey.", "wonderful": "It is a wonderful thing.",
    "careful": "Be careful and take your time.",
}
# Topic-free filler (no commas, no topic word) for answers that must be longer.
FILLERS = (
    "There is always more to learn.", "Small steps can make a big difference.", "Many people find this interesting.",
    "It is worth taking the time to understand it.", "Everyone can enjoy it in their own way.",
    "It is a good thing to think about.", "You can start today.", "Try it and see what happens.",
)
# Titles without the topic word (for prompts that also forbid it), by request.
GENERIC_TITLES = {
    "Explain": "In Simple Terms", "Write a short note": "A Note For You", "Give some tips": "Some Tips",
    "Describe": "A Short Description", "Why is": "Why It Matters", "Write a short paragraph": "A Short Paragraph",
    "Tell me": "A Few Facts",
}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_LIST_MARK = re.compile(r"^\s*(?:[*\-•]+|\d+[.)])\s*")


def sentences(text: str) -> list[str]:
    """Sentences and lines, list markers stripped, empty ones dropped."""
    out = []
    for s in _SENTENCE_END.split(text):
        s = _LIST_MARK.sub("", s).strip().strip("*").strip()
        if count_words(s):
            out.append(s)
    return out


def drop_unfinished(text: str) -> str:
    """Cut a trailing unfinished sentence (an answer that hit the token limit), if a finished one comes before."""
    text = text.strip()
    head, _, last = text.rpartition("\n")
    if head.strip() and _LIST_MARK.sub("", last).strip() in ("", "."):  # a list item cut off after its number
        return drop_unfinished(head)
    if not text or text[-1] in ".!?\"')":
        return text
    ends = [m.end() for m in re.finditer(r"(?<!\d)[.!?](?=\s)", last)]  # "2." numbers a list: not an end
    if ends:  # cut the last line after its last finished sentence
        return (head + "\n" if head.strip() else "") + last[: ends[-1]]
    return drop_unfinished(head) if head.strip() else text  # no finished sentence on the last line: drop it


def cut_words(text: str, n: int) -> str:
    """The text cut to fewer than n words (IFEval's count), ended with a full stop."""
    if count_words(text) < n:
        return text
    words = text.split()
    while words and count_words(" ".join(words)) >= max(n, 1):
        words.pop()
    out = " ".join(words).rstrip(",;:-")
    return out + "." if out and out[-1] not in ".!?" else out


def _title(p: Prompt) -> str:
    if any(i.kind == "forbid" for i in p.instructions):
        return next(t for k, t in GENERIC_TITLES.items() if p.request.startswith(k))
    return p.topic.title()


def _replace_word(text: str, word: str, keep_first: bool = False) -> str:
    """Every whole-word use of `word` (and "the word") replaced by "it" ("It" starting a sentence)."""
    seen = [0]

    def sub(m: re.Match) -> str:
        seen[0] += 1
        if keep_first and seen[0] == 1:
            return m.group(0)
        start = m.start() == 0 or re.search(r"[.!?\n]\s*$", text[: m.start()]) is not None
        return "It" if start else "it"

    return re.sub(r"\b(?:the\s+)?" + re.escape(word) + r"\b", sub, text, flags=re.IGNORECASE)


def edit(p: Prompt, text: str, rng: random.Random, attempt: set[str], sloppy: set[str] = frozenset(),
         reserve: int = 0) -> str:
    """Rewrite `text` for prompt p: follow the instructions whose kind is in `attempt`, those also in `sloppy` with a
    near miss (the way a hurried writer gets them almost right). `reserve` trims a word limit further."""
    by_kind = {i.kind: i.args for i in p.instructions if i.kind in attempt}
    text = drop_unfinished(text)
    if not count_words(text):
        text = rng.choice(FILLERS)
    bullets = "bullets" in by_kind
    if bullets:
        n = by_kind["bullets"]["n"]
        if "bullets" in sloppy:
            n = n + 1 if rng.random() < 0.5 else n - 1
        items = sentences(text)
        fill = [f for f in FILLERS if f not in items]
        while len(items) < n:
            items.append(fill.pop(rng.randrange(len(fill))))
        numbered = "bullets" in sloppy and rng.random() < 0.3
        text = "\n".join((f"{k + 1}. " if numbered else "* ") + s for k, s in enumerate(items[:n]))
    if "forbid" in by_kind:
        text = _replace_word(text, by_kind["forbid"]["word"], keep_first="forbid" in sloppy)
    if "no_comma" in by_kind:
        first = text.find(",") if "no_comma" in sloppy else -1
        text = text[: first + 1] + re.sub(r",\s*", " ", text[first + 1 :]) if first >= 0 else re.sub(r",\s*", " ", text)
    keyword = by_kind.get("include", {}).get("word")
    add_keyword = keyword is not None and "include" not in sloppy and re.search(re.escape(keyword), text, re.I) is None
    if "max_words" in by_kind:
        n = by_kind["max_words"]["n"]
        if "max_words" in sloppy:
            while count_words(text) < n + 3:
                text += " " + rng.choice(FILLERS)
        else:
            extra = reserve + (count_words(KEYWORD_SENTENCES.get(keyword, keyword or "")) if add_keyword else 0)
            extra += count_words(by_kind.get("end", {}).get("phrase", "")) + ("json" in by_kind)
            extra += count_words(_title(p)) if "title" in by_kind else 0
            budget = max(2, n - extra)
            if bullets:
                lines = text.split("\n")
                per = max(2, budget // len(lines))
                text = "\n".join(cut_words(line, per + 2) for line in lines)  # "* " is not a word
            else:
                kept: list[str] = []
                for s in sentences(text):
                    if count_words(" ".join(kept + [s])) >= budget:
                        break
                    kept.append(s)
                text = " ".join(kept) if kept else cut_words(text, budget)
    if "min_words" in by_kind:
        n = by_kind["min_words"]["n"] - (rng.randint(3, 8) if "min_words" in sloppy else 0)
        if "min_words" in sloppy and count_words(text) >= n:
            text = cut_words(text, n)
        fill = list(FILLERS)
        while count_words(text) < n and fill:
            text += " " + fill.pop(rng.randrange(len(fill)))
    if add_keyword:
        sentence = KEYWORD_SENTENCES.get(keyword, f"Remember the word {keyword}.")
        first, _, rest = text.partition("\n") if bullets else (text, "", "")
        m = re.search(r"[.!?](\s|$)", first)
        first = first[: m.end()].rstrip() + " " + sentence + " " + first[m.end():] if m else first + " " + sentence
        text = (first.strip() + ("\n" + rest if rest else "")).strip()
    elif keyword is not None and "include" in sloppy:
        text = re.sub(re.escape(keyword), "", text, flags=re.IGNORECASE)
    if "end" in by_kind:
        phrase = by_kind["end"]["phrase"]
        if "end" in sloppy:
            phrase = phrase[:-1] if rng.random() < 0.5 else phrase + " :)"
        text = text.rstrip() + ("\n" if bullets else " ") + phrase
    if "title" in by_kind:
        title = _title(p)
        if "title" in sloppy:
            title = rng.choice((f"Title: {title}", f"**{title}**", f"<{title}>"))
        else:
            title = f"<<{title}>>"
        text = title + "\n" + text
    if "lowercase" in by_kind:
        text = text.lower()
        if "lowercase" in sloppy:  # sentence case: the first letter of every sentence stays a capital
            text = re.sub(r"(^|[.!?]\s+|\n)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
    if "capital" in by_kind:
        if "capital" in sloppy:
            parts = sentences(text)
            head = " ".join(parts[:-1]).upper() if len(parts) > 1 else ""
            text = (head + " " + (parts[-1] if parts else text).lower()).strip()
        else:
            text = text.upper()
    if "quotes" in by_kind:
        text = text.strip().strip('"')
        text = '"' + text if "quotes" in sloppy else '"' + text + '"'
    if "json" in by_kind:
        text = json.dumps({"answer": text}, ensure_ascii=False)
        if "json" in sloppy:
            text = text[:-1] if rng.random() < 0.5 else "answer: " + json.loads(text)["answer"]
        elif rng.random() < 0.5:
            text = "```json\n" + text + "\n```"
    return text.strip()


def careful(p: Prompt, text: str, rng: random.Random) -> str:
    """Every instruction followed. A word limit can clash with what later steps add; trim harder until it holds."""
    from selfie_lite.smol.checker import follows

    kinds = {i.kind for i in p.instructions}
    out = text
    for reserve in (0, 3, 6, 10):
        out = edit(p, text, random.Random(rng.random()), kinds, reserve=reserve)
        if all(follows(i, out) for i in p.instructions):
            break
    return out


def truncate(text: str, rng: random.Random) -> str:
    """Cut at a word boundary, 40-85% of the way in (a writer that ran out of room)."""
    words = text.split(" ")
    if len(words) < 3:
        return text[: max(1, len(text) // 2)]
    return " ".join(words[: max(1, int(len(words) * rng.uniform(0.4, 0.85)))])


def write(writer: str, p: Prompt, source: str, rng: random.Random) -> str:
    """One writer's answer to prompt p, from `source` (the SFT model's answer to p or to p's request with other
    instructions)."""
    kinds = [i.kind for i in p.instructions]
    if writer == "policy":
        return source.strip()
    if writer == "careful":
        return careful(p, source, rng)
    if writer == "partial":  # follows all but one instruction (a single one: none), and tidies up
        skip = rng.choice(kinds)
        return edit(p, source, rng, set(kinds) - {skip})
    if writer == "careless":  # tries every instruction, with near misses
        return edit(p, source, rng, set(kinds), sloppy=set(kinds))
    if writer == "truncated":
        return truncate(careful(p, source, rng), rng)
    raise ValueError(f"unknown writer {writer!r}; one of {WRITERS}")
