"""The smol preset's oracle: does a response follow its prompt's instructions? (our "human" label)

Each check mirrors the IFEval checker of the same instruction (google-research/instruction_following_eval,
instructions.py; the id is named on each function), so figures read like IFEval's:
- score(prompt, response): the share of the prompt's instructions met, in [0, 1] (0, 1/2 or 1 for two);
- strict: every instruction met (IFEval's prompt-level strict accuracy);
- summarize(...): over many responses, the instruction-level accuracy, the prompt-level strict accuracy and the
  mean length in words.

Why our own checks and not a library's: `if-verifiable` (PyPI) ships IFEval's checkers, and works offline for most of
them, but (measured here, if-verifiable 0.1.2) its case checks also require langdetect to call the text English,
which fails on short answers ("sleep well" in lowercase is "not followed"; "SLEEP WELL" likewise) and is random
unless seeded; its sentence counts need nltk's punkt data, downloaded at run time; and it would pull in nltk,
langdetect, emoji, syllapy and immutabledict for a dozen lines of regular expressions. The checks below are
IFEval's, minus the language detection (every prompt here asks for English and the model writes English), and
word counting is IFEval's nltk RegexpTokenizer(r"\\w+") written as the re.findall it runs.
"""

from __future__ import annotations

import json
import math
import re

from selfie_lite.smol.task import Instruction, parse_prompt


def count_words(text: str) -> int:
    """IFEval's count_words: nltk's RegexpTokenizer(r"\\w+") is re.findall(r"\\w+", text)."""
    return len(re.findall(r"\w+", text))


def is_lowercase(text: str) -> bool:  # change_case:english_lowercase (without langdetect)
    return text.islower()


def is_capital(text: str) -> bool:  # change_case:english_capital (without langdetect)
    return text.isupper()


def has_keyword(text: str, word: str) -> bool:  # keywords:existence (a case-insensitive substring, as IFEval's)
    return re.search(re.escape(word), text, flags=re.IGNORECASE) is not None


def avoids_word(text: str, word: str) -> bool:  # keywords:forbidden_words (whole word, any case)
    return re.search(r"\b" + re.escape(word) + r"\b", text, flags=re.IGNORECASE) is None


def ends_with(text: str, phrase: str) -> bool:  # startend:end_checker (closing quotes and case ignored, as IFEval's)
    return text.strip().strip('"').lower().endswith(phrase.strip().lower())


def is_quoted(text: str) -> bool:  # startend:quotation
    text = text.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def count_bullets(text: str) -> int:  # detectable_format:number_bullet_lists ("* x" and "- x" lines, as IFEval's)
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes)


def has_title(text: str) -> bool:  # detectable_format:title (a non-empty <<...>> on one line)
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))


def has_no_comma(text: str) -> bool:  # punctuation:no_comma
    return "," not in text


def is_json(text: str) -> bool:  # detectable_format:json_format (markdown fences allowed)
    text = (text.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
            .removeprefix("```").removesuffix("```").strip())
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def follows(instruction: Instruction, response: str) -> bool:
    """Whether the response meets one instruction."""
    kind, a = instruction.kind, instruction.args
    if kind == "lowercase":
        return is_lowercase(response)
    if kind == "capital":
        return is_capital(response)
    if kind == "max_words":
        return count_words(response) < a["n"]
    if kind == "min_words":
        return count_words(response) >= a["n"]
    if kind == "include":
        return has_keyword(response, a["word"])
    if kind == "forbid":
        return avoids_word(response, a["word"])
    if kind == "end":
        return ends_with(response, a["phrase"])
    if kind == "quotes":
        return is_quoted(response)
    if kind == "bullets":
        return count_bullets(response) == a["n"]
    if kind == "title":
        return has_title(response)
    if kind == "no_comma":
        return has_no_comma(response)
    if kind == "json":
        return is_json(response)
    raise AssertionError(kind)


def score_details(prompt: str, response: str) -> dict:
    """{"kinds": [...], "met": [bool per instruction], "score": share met, "strict": all met}; ValueError for a
    prompt that is not the smol preset's."""
    p = parse_prompt(prompt)
    met = [follows(i, response) for i in p.instructions]
    return {"kinds": [i.kind for i in p.instructions], "met": met, "score": sum(met) / len(met), "strict": all(met)}


def score(prompt: str, response: str) -> float:
    """The oracle: the share of the prompt's instructions the response meets, in [0, 1]."""
    return score_details(prompt, response)["score"]


def summarize(prompts: list[str], responses: list[str]) -> dict:
    """Eval figures over many responses: constraint_accuracy (the mean share met per response), instruction_accuracy
    (IFEval's instruction-level accuracy: all instructions pooled), strict_accuracy (IFEval's prompt-level strict
    accuracy: every instruction met), mean_words (IFEval's word count), and per kind the share met."""
    details = [score_details(p, r) for p, r in zip(prompts, responses, strict=True)]
    pooled = [m for d in details for m in d["met"]]
    by_kind: dict[str, list[bool]] = {}
    for d in details:
        for k, m in zip(d["kinds"], d["met"], strict=True):
            by_kind.setdefault(k, []).append(m)
    n = len(details)
    return {
        "constraint_accuracy": sum(d["score"] for d in details) / n if n else math.nan,
        "instruction_accuracy": sum(pooled) / len(pooled) if pooled else math.nan,
        "strict_accuracy": sum(d["strict"] for d in details) / n if n else math.nan,
        "mean_words": sum(count_words(r) for r in responses) / n if n else math.nan,
        "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
    }


class IFEvalScorer:
    """The checker as a scorer (scorers.py's protocol): `--scorer ifeval`, `--select-by ifeval`. Exact and free; it
    scores only the smol preset's prompts (any of its requests, with any topic, and its instructions)."""

    name = "ifeval"
    good_score = 1.0  # "good" = every instruction met: eval's frac_good is IFEval's prompt-level strict accuracy

    def check(self, prompts: list[str]) -> None:
        from selfie_lite.errors import UserError

        for p in prompts:
            try:
                parse_prompt(p)
            except ValueError:
                raise UserError(f"the ifeval scorer scores only the smol preset's prompts, not {p[:60]!r}",
                                hint="use --scorer reward-model:PATH or python:MODULE:FUNCTION for other prompts") from None

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [score(p, r) for p, r in zip(prompts, responses, strict=True)]

    def metrics(self, prompts: list[str], responses: list[str]) -> dict:
        """The eval figures beyond the mean score (summarize)."""
        return summarize(prompts, responses)

    def close(self) -> None:
        pass
