"""External scorers: what `eval` (win rates) and `run --select-by` (which round ships) score responses with, from
outside the model being aligned. They are not the self-judging stage (judge.py), which labels a round's samples
with the policy's own implicit reward.

A scorer takes (prompt, response) lists and returns one float per response, higher is better: `oracle` (the tiny
preset's exact checker), `reward-model:PATH` (a local sequence-classification reward model, e.g. the Skywork or
RLHFlow ones, through transformers), `python:MODULE:FUNCTION` (a function of your own, f(prompt, response) ->
float: a unit-test runner, a math checker). Every spec is parsed, and every file checked, before a weight loads.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Protocol

from selfie_lite.errors import UserError, describe


class Scorer(Protocol):
    name: str

    def check(self, prompts: list[str]) -> None:
        """Raise UserError before any weights load if this scorer cannot score these prompts."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One score per (prompt, response); higher is better."""

    def close(self) -> None: ...


class AnchorScorer:
    """The seed-DPO judge as a scorer: r_0(x, y) = beta * (log pi_0(y|x) - log pi_init(y|x)) (docs/method.md (E2),
    with pi_0 as the policy). Every run has it (pi_0 learnt from the human seed pairs only), so `run` can compare its
    rounds without an external scorer (benchmarks/anchor_select.py tries that). Responses are re-tokenised with the chat template;
    pi_0 and pi_init are loaded one after the other, never together."""

    name = "anchor"

    def __init__(self, backend, anchor_dir: Path, init_dir: Path, beta: float, batch_size: int = 32):
        self.backend, self.anchor_dir, self.init_dir = backend, Path(anchor_dir), Path(init_dir)
        self.beta, self.batch_size = beta, batch_size

    def check(self, prompts: list[str]) -> None:
        pass

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from selfie_lite.chat import chat_prompt_ids, chat_response_ids

        tok = self.backend.load_tokenizer(self.init_dir)
        seqs = [(chat_prompt_ids(tok, p), chat_response_ids(tok, p, r)) for p, r in zip(prompts, responses, strict=True)]
        logps = {}
        for name, folder in (("anchor", self.anchor_dir), ("init", self.init_dir)):
            model, _ = self.backend.load(folder)
            logps[name] = self.backend.sequence_logps(model, seqs, batch_size=self.batch_size)
            self.backend.free(model)
        from selfie_lite.loss import implicit_rewards

        return implicit_rewards(logps["anchor"], logps["init"], self.beta)

    def close(self) -> None:
        pass


class OracleScorer:
    """The tiny preset's programmatic oracle (tiny/task.py): exact, free, only for tiny-preset prompts."""

    name = "oracle"

    @property
    def good_score(self) -> float:  # "good" = correct and formatted (tiny/task.py)
        from selfie_lite.tiny.task import GOOD_SCORE

        return GOOD_SCORE

    def check(self, prompts: list[str]) -> None:
        from selfie_lite.tiny.task import parse_prompt

        for p in prompts:
            try:
                parse_prompt(p)
            except ValueError:
                raise UserError(
                    f"the oracle scores only the tiny preset's prompts, not {p[:60]!r}",
                    hint="score other prompts with reward-model:PATH or python:MODULE:FUNCTION",
                ) from None

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from selfie_lite.tiny.task import score

        return [score(p, r) for p, r in zip(prompts, responses, strict=True)]

    def close(self) -> None:
        pass


class RewardModelScorer:
    """A local sequence-classification reward model (one logit per sequence), run through transformers.

    The conversation is laid out with the reward model's own chat template (as the Skywork and RLHFlow model
    cards do); a tokenizer without one gets "prompt\\n\\nresponse". Batches are right-padded; transformers pools
    at the last non-pad token, so a model without a pad token is given its tokenizer's (or eos), and the score
    is the same whatever the batch. Safetensors only, no remote code.
    """

    def __init__(self, path: str | Path, batch_size: int = 8, max_length: int = 4096):
        self.path = Path(path).expanduser()
        self.name = f"reward-model:{path}"
        self.batch_size = batch_size
        self.max_length = max_length
        self._model = None
        self._tok = None
        if self.path.is_file():
            raise UserError(f"reward model folder {path} is a file, expected a model folder (config.json, "
                            "*.safetensors, tokenizer files)")
        if not self.path.is_dir():
            raise UserError(f"reward model folder {path} does not exist",
                            hint="download it once (huggingface-cli download ORG/NAME --local-dir DIR), then pass DIR")
        if not (self.path / "config.json").is_file():
            raise UserError(f"{path} is not a model folder (no config.json)")
        if not any(self.path.glob("*.safetensors")):
            raise UserError(f"{path} has no *.safetensors weights", hint="selfie-lite loads safetensors only")

    def check(self, prompts: list[str]) -> None:
        pass

    def _load(self):
        if self._model is not None:
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from selfie_lite.numerics import pick_device, pick_dtype

        device = pick_device()
        dtype = pick_dtype("auto", device)
        tok = AutoTokenizer.from_pretrained(str(self.path))
        model = AutoModelForSequenceClassification.from_pretrained(str(self.path), dtype=dtype, use_safetensors=True)
        if model.config.num_labels != 1:
            raise UserError(
                f"{self.path} has {model.config.num_labels} output labels; a reward model has one (a scalar score)"
            )
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        tok.padding_side = "right"
        self._model, self._tok = model.to(device).eval(), tok

    def format(self, prompt: str, response: str) -> str:
        tok = self._tok
        if tok.chat_template:
            conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return tok.apply_chat_template(conv, tokenize=False)
        return f"{prompt}\n\n{response}"

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        import torch

        self._load()
        tok, model = self._tok, self._model
        texts = [self.format(p, r) for p, r in zip(prompts, responses, strict=True)]
        # The template already holds the special tokens (BOS): do not add them twice.
        encoded = [tok(t, add_special_tokens=not tok.chat_template, truncation=True, max_length=self.max_length)["input_ids"]
                   for t in texts]
        out = [0.0] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits  # [B, 1]
            for row, i in enumerate(idx):
                out[i] = float(logits[row, 0])
                if not math.isfinite(out[i]):
                    raise UserError(f"the reward model {self.path} scored response {i + 1} (prompt "
                                    f"{prompts[i][:60]!r}) {out[i]}; a score must be a finite number",
                                    hint="its weights may be broken, or it needs another precision")
        return out

    def close(self) -> None:
        self._model = self._tok = None
        import gc

        gc.collect()


class PythonScorer:
    """A scorer function of your own, `f(prompt: str, response: str) -> float` (higher is better): a unit-test runner,
    a math checker, an exact-match grader. Spec: python:MODULE:FUNCTION, where MODULE is a dotted module importable
    from sys.path or the current folder, or a path to a .py file. Every problem (bad spec, no such module or
    function, a scorer that raises or returns something that is not a number) is a one-line UserError."""

    def __init__(self, target: str, key: str = "scorer"):
        self.name = f"python:{target}"
        module, sep, func = target.rpartition(":")  # rpartition: a Windows path may hold a colon
        if not sep or not module or not func:
            raise UserError(f"python:{target}: expected python:MODULE:FUNCTION",
                            hint="e.g. python:checks.py:score or python:mypkg.grading:score", key=key)
        mod = _import_scorer_module(module, key)
        fn = getattr(mod, func, None)
        if fn is None:
            raise UserError(f"{self.name}: {module} has no function {func!r}", key=key)
        if not callable(fn):
            raise UserError(f"{self.name}: {module}.{func} is not callable (a {type(fn).__name__})", key=key)
        self._fn = fn

    def check(self, prompts: list[str]) -> None:
        pass  # nothing to check before the responses exist; score() names the first prompt that fails

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self._one(i, p, r) for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]

    def _one(self, i: int, prompt: str, response: str) -> float:
        where = f"the python scorer {self.name.split(':', 1)[1]} on prompt {i + 1} ({prompt[:60]!r})"
        try:
            value = self._fn(prompt, response)
        except KeyboardInterrupt:  # Ctrl-C (or a scorer that fakes one) stops the command as Ctrl-C does: exit 130
            raise
        except SystemExit as e:  # sys.exit() inside the scorer would end the whole command, with exit 0 for exit(0)
            code = "" if e.code is None else repr(e.code)
            raise UserError(f"{where} called sys.exit({code}) instead of returning a score",
                            hint="a scorer returns a number; raise an exception to report a failure") from None
        except BaseException as e:  # the scorer is user code: any failure is reported, with the prompt it failed on
            raise UserError(f"{where} raised {describe(e)}") from None
        # A bool is an int to Python, but True from a scorer is more often a bug (a check returned where a score
        # was meant) than a score: refuse it rather than read it as 1.
        if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's bool is not a Python bool
            raise UserError(f"{where} returned {value!r}, a bool; a scorer returns a number (higher is better)",
                            hint="return 1.0 / 0.0 for pass / fail")
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise UserError(f"{where} returned {value!r}; a scorer returns a finite number (higher is better)")
        return float(value)

    def close(self) -> None:
        pass


def _import_scorer_module(module: str, key: str = "scorer"):
    """A .py path (or anything with a path separator) is loaded from that file; else a dotted module name, looked
    up on sys.path with the current folder first (as `python -m` would), so a checks.py next to the run is found."""
    import importlib
    import importlib.util
    import os
    import sys

    is_path = module.endswith(".py") or os.sep in module or "/" in module
    try:
        if is_path:
            path = Path(module).expanduser()
            if path.is_dir():
                raise UserError(f"python:{module}:...: {module} is a folder, expected a .py file", key=key)
            if not path.is_file():
                raise UserError(f"python:{module}:...: scorer file {module} does not exist", key=key)
            spec = importlib.util.spec_from_file_location(f"selfie_lite_scorer_{path.stem}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            return importlib.import_module(module)
        finally:
            if added:
                sys.path.remove(os.getcwd())
    except UserError:
        raise
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name) and not is_path:
            raise UserError(f"python:{module}:...: module {module!r} not found on sys.path or in the current folder",
                            hint="pass a path to the .py file instead, e.g. python:./checks.py:score", key=key) from None
        raise UserError(f"python:{module}:...: importing it failed: {describe(e)}", key=key) from None
    except SystemExit as e:  # sys.exit() at import time would end the whole command
        code = "" if e.code is None else repr(e.code)
        raise UserError(f"python:{module}:...: importing it called sys.exit({code})", key=key) from None
    except Exception as e:  # a syntax error or an exception at import time, in user code
        raise UserError(f"python:{module}:...: importing it failed: {describe(e)}", key=key) from None


# The scorers `eval --scorer` and `run --select-by` (guard.select) accept, as written in help and messages: a name,
# or a prefix and its argument. parse_scorer builds them; validate.is_selection checks guard.select against them.
SCORERS = ("oracle", "ifeval", "python:MODULE:FUNCTION", "reward-model:PATH")


def is_scorer(spec: str) -> bool:
    """Whether `spec` names one of SCORERS (a prefixed one with a non-empty argument is checked when built)."""
    return any(spec == s if ":" not in s else spec.startswith(s.split(":", 1)[0] + ":") for s in SCORERS)


def parse_scorer(spec: str | None, batch_size: int = 8, key: str = "scorer") -> Scorer | None:
    """"oracle" | "reward-model:PATH" | "python:MODULE:FUNCTION" | None/"none" (no win rates). Fails before any weights
    load. key: the setting the spec came from, for the messages (eval's scorer, a run's guard.select)."""
    if spec is None or spec == "none":
        return None
    if spec == "oracle":
        return OracleScorer()
    if spec == "ifeval":  # the smol preset's checker (selfie_lite/smol/checker.py)
        from selfie_lite.smol.checker import IFEvalScorer

        return IFEvalScorer()
    if spec.startswith("reward-model:"):
        path = spec.split(":", 1)[1]
        if not path:
            raise UserError("reward-model: needs a folder, e.g. reward-model:./Skywork-Reward-V2", key=key)
        return RewardModelScorer(path, batch_size=batch_size)
    if spec.startswith("python:"):
        return PythonScorer(spec.split(":", 1)[1], key)
    raise UserError(f"unknown scorer {spec!r}", hint="use oracle (tiny preset), ifeval (smol preset), reward-model:PATH or python:MODULE:FUNCTION")
