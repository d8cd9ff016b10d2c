"""What the types alone cannot say (config.py's loader calls these on a RunConfig; this module imports nothing from
config.py, so that the two never import each other): ONE table of valid ranges for every numeric setting (RANGES), the cross-field
rules (validate), and the settings that a chosen method would ignore (check_ignored)."""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from selfie_lite.errors import UserError
from selfie_lite.scorers import SCORERS, is_scorer

# ---------------------------------------------------------------------------------------------
# Labelled share: "3.3pct" | "3.3%" | "2000"


def parse_labelled_share(text: str, n_rows: int | None = None) -> int | float:
    """Return a fraction (0 < f <= 1) for percentages or an int count; with n_rows, always the count."""
    raw = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(pct|%)", raw, flags=re.IGNORECASE)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise UserError(f"{raw}: the labelled share must be above 0% and at most 100%", key="data.labelled_share")
        value: int | float = pct / 100.0
    elif re.fullmatch(r"\d+", raw):
        value = int(raw)
        if value <= 0:
            raise UserError(f"{raw}: need at least one labelled pair", hint="try 3.3pct", key="data.labelled_share")
    else:
        raise UserError(f"{raw!r} is not a labelled share", hint="write a percentage (3.3pct, 3.3%) or a pair count (2000)",
                        key="data.labelled_share")
    if n_rows is None:
        return value
    count = max(1, round(value * n_rows)) if isinstance(value, float) else value
    if count > n_rows:
        raise UserError(f"{raw} asks for {count} labelled pairs but the data has {n_rows} valid rows", key="data.labelled_share")
    return count


def canonical_labelled_share(text: str) -> str:
    """The labelled share as config.json stores it: 3.3% and 3.3 pct -> "3.3pct", 0042 -> "42", so that a resume
    with another spelling of the same share is not a change of settings."""
    value = parse_labelled_share(text)
    return f"{value * 100:.10g}pct" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: lo/hi bounds (None = unbounded), open or closed on each side.

    `says` replaces the generated wording where an older message is part of the interface (tests, docs)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # True: the value must be > lo, not >= lo
    hi_open: bool = False  # True: the value must be < hi, not <= hi
    says: str = ""

    def ok(self, v: float) -> bool:
        if not math.isfinite(v):  # NaN passes no comparison below, and no setting means anything at infinity
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        if self.says:
            return self.says
        if self.lo is not None and self.hi is not None:
            return f"must be in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"must be {'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"must be {'<' if self.hi_open else '<='} {_num(self.hi)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Range(0, lo_open=True)
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
# Seeds reach numpy (which wants < 2**32) after + round index and other small offsets; 2**31 - 1 leaves room.
SEED = Range(0, 2**31 - 1)

# Every int and float setting (list settings: each item), dotted as in --set. A field without an entry fails
# tests/test_config.py::test_every_numeric_setting_has_a_range, so a new knob cannot skip its bounds.
RANGES: dict[str, Range] = {
    "rounds": NON_NEGATIVE,
    "beta": POSITIVE,  # <= 0 inverts (or zeroes) every self-label and the DPO loss
    "random_seed": SEED,
    "threads": Range(0, 1024),  # 0 = auto
    "data.test_size": NON_NEGATIVE,
    "data.pool_ratio": POSITIVE,
    "data.pool_sizes": AT_LEAST_1,
    "data.max_bad_rows": FRACTION,
    "sample.num_samples": Range(2, says="must be at least 2 to form a pair"),
    "sample.temperature": Range(0, lo_open=True, says="must be > 0 (sampling needs it)"),
    "sample.top_p": Range(0, 1, lo_open=True),
    "sample.max_new_tokens": AT_LEAST_1,
    "sample.batch_size": AT_LEAST_1,
    "sample.chunk_size": AT_LEAST_1,
    "sample.tensor_parallel_size": AT_LEAST_1,
    "judge.batch_size": AT_LEAST_1,
    # Above 1 the adapter's weights blow up in the first steps and DPO's loss sits at log 2 = 0.693 (seen at 1e30).
    "train.learning_rate": Range(0, 1, lo_open=True, says="must be in (0, 1] (LoRA DPO uses about 1e-6 to 1e-3)"),
    "train.warmup_ratio": Range(0, 1, hi_open=True),  # 1 would warm up for the whole run: the LR never peaks
    "train.batch_size": AT_LEAST_1,
    "train.grad_accum": AT_LEAST_1,
    "train.seed_epochs": AT_LEAST_1,
    "train.round_epochs": AT_LEAST_1,
    "train.max_length": AT_LEAST_1,
    "train.max_prompt_length": AT_LEAST_1,
    "train.weight_decay": NON_NEGATIVE,
    "train.max_grad_norm": NON_NEGATIVE,  # 0 = no clipping (the Trainer's convention)
    "refine.alpha": Range(0, 0.5, hi_open=True),  # 0.5 would make chosen and rejected equally likely targets
    "refine.low_conf_frac": FRACTION,
    "refine.warmup_frac": FRACTION,
    "refine.lambdas": NON_NEGATIVE,
    "refine.window_pairs": AT_LEAST_1,
    "refine.vocab_chunk": AT_LEAST_1,
    "lora.r": AT_LEAST_1,
    "lora.alpha": POSITIVE,
    "lora.dropout": Range(0, 1, hi_open=True),
    # 1 would replace every self-label with a seed pair: no self-labelling round left to speak of.
    "robust.gold_replay": Range(0, 1, hi_open=True),
    "guard.min_anchor_agreement": FRACTION,
    "guard.from_round": Range(2, says="must be at least 2 (round 1's labels are the seed-DPO judge's own)"),
    "guard.probe_prompts": AT_LEAST_1,
    # A decay: 0 would stop learning after round 1; > 1 would raise the rate round after round.
    "robust.lr_decay": Range(0, 1, lo_open=True),
    "robust.max_steps": NON_NEGATIVE,  # 0 = no cap
    "robust.margin_keep": Range(0, 1, lo_open=True),  # 0 would keep no self-labelled pair
}


def check_range(range_key: str, value, key: str | None = None) -> None:
    """Refuse a value outside RANGES[range_key]; `key` is the setting the error names (an api option such as
    "batch_size" that takes its range from a config key), default range_key."""
    rng = RANGES[range_key]
    values = value if isinstance(value, list) else [value]
    for i, v in enumerate(values):
        if not rng.ok(v):
            where = key or range_key
            at = f"[{i}]" if isinstance(value, list) else ""
            if math.isinf(v):
                raise UserError(f"must be a finite number, got {v}", key=where + at)
            raise UserError(f"{rng.describe()}, got {v}", key=where + at)


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg) -> None:
    """Every numeric setting against RANGES first (one message per key), then the cross-field checks that the
    types and ranges alone cannot express."""
    parse_labelled_share(cfg.data.labelled_share)
    for key in RANGES:
        check_range(key, _get(cfg, key))
    if cfg.data.extra_pools != "off" and not cfg.data.pool_sizes:
        raise UserError(f"data.extra_pools = {cfg.data.extra_pools} extends data.pool_sizes, which is not set",
                        hint="give data.pool_sizes (prompts per round), or one data.pool_ratio entry per round")
    pools = cfg.data.pool_sizes or cfg.data.pool_ratio
    if len(pools) < cfg.rounds and cfg.data.extra_pools == "off":
        raise UserError(
            f"{cfg.rounds} rounds need {cfg.rounds} prompt pools but data.pool_{'sizes' if cfg.data.pool_sizes else 'ratio'} "
            f"has {len(pools)}",
            hint="give one pool per round, set data.extra_pools = last or rest, or lower --rounds",
        )
    if len(cfg.refine.lambdas) < cfg.rounds and cfg.data.extra_pools == "off":
        raise UserError(f"refine.lambdas needs one value per round ({cfg.rounds}), got {len(cfg.refine.lambdas)}")
    if not is_selection(cfg.guard.select):
        raise UserError(f"guard.select must be one of {', '.join(SELECTIONS)}, got {cfg.guard.select!r}")
    if cfg.train.lr_scheduler not in lr_schedulers():
        raise UserError(f"train.lr_scheduler must be one of {', '.join(lr_schedulers())}, got "
                        f"{cfg.train.lr_scheduler!r}", hint="the paper uses cosine")
    if cfg.train.max_prompt_length >= cfg.train.max_length:
        raise UserError("train.max_prompt_length must be smaller than train.max_length")
    check_engines(cfg.sample.tensor_parallel_size)


def check_engines(tensor_parallel_size: int) -> None:
    """Under a launcher, a vLLM engine of k GPUs serves k processes of one machine (sampler_vllm.engine_devices):
    k must divide the processes per machine (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return
    if per_machine > 1 and per_machine % tensor_parallel_size:
        raise UserError(f"= {tensor_parallel_size} must divide the {per_machine} processes per machine: each engine "
                        "takes the GPUs of that many processes", key="sample.tensor_parallel_size",
                        hint=f"use a divisor of {per_machine}, or launch a multiple of {tensor_parallel_size} processes")


SELECTIONS = ("last", "guard", *SCORERS)  # guard.select: the paper, the round guard, or a scorer eval accepts too


def is_selection(spec: str) -> bool:
    return spec in ("last", "guard") or is_scorer(spec)


@functools.cache
def lr_schedulers() -> tuple[str, ...]:
    """The scheduler names the trainer accepts (transformers' SchedulerType), asked of transformers itself so that
    the list follows the installed version. Imported here, not at the top: it costs seconds, and only a run (which
    imports transformers anyway) validates a config."""
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)



# Files that hold one table of rows: data.split (a split of a hub dataset or a save_to_disk DatasetDict) means nothing.
SINGLE_FILE_DATA = (".jsonl", ".json", ".parquet")


def check_ignored(cfg, given: dict) -> None:
    """Refuse a setting that `given` (what the user wrote: a --config file and the flags, merged) sets to something
    other than its default when cfg's method would ignore it, rather than save it and run without it. A value equal
    to the default is let through: it changes nothing, and a settings file may restate every default."""
    default = type(cfg)()  # RunConfig's defaults

    def set_(key: str) -> bool:
        node = given
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return _get(cfg, key) != _get(default, key)

    def refuse(key: str, why: str, hint: str):
        raise UserError(f"{key} = {json.dumps(_get(cfg, key))} would be ignored: {why}", hint=hint)

    select = cfg.guard.select
    if select == "last":
        for key in ("guard.min_anchor_agreement", "guard.from_round"):
            if set_(key):
                if cfg.method == "paper":
                    refuse(key, "method = paper ships the last round, with no round guard",
                           f"drop {key}, or drop method = paper (the default method runs the guard)")
                refuse(key, "guard.select = last ships the last round, with no round guard",
                       f"drop {key}, or use guard.select = guard (--select-by guard)")
    if select not in ("last", "guard"):
        for key in ("guard.min_anchor_agreement", "guard.from_round"):
            if set_(key):
                refuse(key, f"guard.select = {select} picks the round with that scorer, with no round guard",
                       f"drop {key}, or use guard.select = guard (--select-by guard)")
    if select in ("last", "guard") and set_("guard.probe_prompts"):
        why = "method = paper" if cfg.method == "paper" else f"guard.select = {select}"
        refuse("guard.probe_prompts", f"{why} answers no probe prompts (only a scorer selection does: "
               "guard.select = oracle, python:MODULE:FUNCTION or reward-model:PATH)",
               "drop guard.probe_prompts, or pick the round with a scorer (--select-by ...)")
    if set_("sample.tensor_parallel_size") and cfg.sample.sampler == "generate":
        refuse("sample.tensor_parallel_size", f"sample.sampler = {cfg.sample.sampler} does not sample with vLLM "
               "(only vLLM's engine is split over GPUs)", "add --sampler vllm, or drop sample.tensor_parallel_size")
    if set_("data.split"):
        source = cfg.data.source
        path = Path(source).expanduser() if source else None
        if path is None or path.suffix.lower() in SINGLE_FILE_DATA or path.is_file():
            what = f"{source} is one file with no splits" if source else "the tiny preset's data is one file"
            refuse("data.split", f"{what} (data.split picks a split of a hub dataset or a save_to_disk folder)",
                   "drop data.split, or pass the file that holds the rows you want with --data")


