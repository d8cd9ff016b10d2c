"""Load, validate and split a preference set in the UltraFeedback-binarized shape.

Reads: a hub dataset name (datasets.load_dataset), a .jsonl/.json or .parquet file, or a save_to_disk folder.
Rows: prompt plus chosen/rejected, each a plain string or a message list ([{role, content}, ...]); optional
score_chosen/score_rejected. Writes nothing. Implements docs/method.md "Data": one fixed shuffle, the seed rows keep
their labels, the next rows become prompt-only pools for rounds 1..T, the last rows a held-out labelled test split.
"""

from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass
from pathlib import Path

from selfie_lite import hub
from selfie_lite.config import DataConfig
from selfie_lite.errors import UserError, describe
from selfie_lite.validate import parse_labelled_share

REQUIRED = ("chosen", "rejected")
MAX_IDENTICAL = 0.5  # share of rows with chosen == rejected above which the data set is refused, not cleaned


@dataclass
class Split:
    seed_pairs: list[dict]  # [{prompt, chosen, rejected, score_chosen?, score_rejected?}]
    pools: list[list[str]]  # prompts for rounds 1..T
    test_pairs: list[dict]
    n_rows: int  # valid rows before splitting
    n_bad: int  # rows skipped as invalid
    n_identical: int = 0  # valid rows dropped because chosen == rejected (no preference to learn)


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Raw rows as dicts. Only data formats are read (JSON, Parquet, Arrow): nothing is unpickled."""
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_dir():
            if not any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
                raise UserError(f"{path} is a folder but not a saved dataset (no dataset_dict.json or state.json)",
                                hint="pass a .jsonl/.json/.parquet file, or a folder written by datasets' save_to_disk")
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{path} has splits {', '.join(ds)}, not {split!r}", hint="pick one with data.split")
                ds = ds[split]
        elif path.is_file():
            suffix = path.suffix.lower()
            if suffix in (".jsonl", ".json"):
                if path.stat().st_size == 0:
                    raise UserError(f"{path} is empty")
                return _read_json_rows(path)
            elif suffix == ".parquet":
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            else:
                raise UserError(f"{path}: unsupported file type {suffix!r}", hint="use .jsonl, .json or .parquet")
        elif hub.looks_like_hub_id(source):
            if hub.offline(datasets=True):
                raise UserError(
                    f"{source!r} is a hub dataset but the hub is offline (HF_HUB_OFFLINE=1)",
                    hint="download it once with network access, or pass a local .jsonl/.parquet file or folder",
                )
            ds = datasets.load_dataset(source, split=split)
        else:
            raise UserError(f"dataset {source!r} not found", hint="give a hub name (owner/name), a .jsonl/.parquet file or a folder")
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for a bad file; the user needs one line
        raise UserError(f"could not read dataset {source!r}: {describe(e)[:200]}") from None
    if len(ds) == 0:
        raise UserError(f"dataset {source!r} has no rows")
    return ds.to_list()


@dataclass
class BadLine:
    reason: str


def _read_json_rows(path: Path) -> list:
    """JSON Lines (or one JSON array) read with the json module, not Arrow: Arrow infers one type per column and
    silently nulls the rows that do not fit it, so a file mixing plain-string and message-list rows (or with one
    broken line) would lose rows without a word. Here every row stays as written and bad lines are counted."""
    import json

    text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) would cost row 0
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
    else:
        rows = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(BadLine("line is not valid JSON"))  # counted as a bad row, with its index
    if not rows:
        raise UserError(f"{path} has no rows")
    return rows


def _text_of(value, role: str) -> str | None:
    """A response as text: a plain string, or the last `role` message of a message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for m in reversed(value):
            if m.get("role") == role and isinstance(m.get("content"), str):
                return m["content"]
    return None


def normalize_row(row: dict) -> dict | str:
    """One row in our shape, or a reason why it is invalid."""
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        return f"missing field {missing[0]!r}"
    prompt = row.get("prompt")
    given = prompt is not None  # the prompt field, or (None) the user turn of the message lists
    if prompt is None and isinstance(row["chosen"], list):
        prompt = _text_of(row["chosen"], "user")
    if isinstance(prompt, list):
        prompt = _text_of(prompt, "user")
    if not isinstance(prompt, str):
        return "prompt is missing or not text"
    # A message list carries its own user turn: one that is not the prompt means chosen/rejected answer another
    # question (a misaligned export); neither text can be said to be the right prompt, so the row is invalid.
    for k in REQUIRED:
        turn = _text_of(row[k], "user") if isinstance(row[k], list) else None
        if turn is not None and turn.strip() != prompt.strip():
            return f"the user turn in {k} differs from {'prompt' if given else 'the one in chosen'}"
    chosen, rejected = _text_of(row["chosen"], "assistant"), _text_of(row["rejected"], "assistant")
    if chosen is None or rejected is None:
        return "chosen/rejected must be text or a message list with an assistant turn"
    if not prompt.strip() or not chosen.strip() or not rejected.strip():
        return "empty text"
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for k in ("score_chosen", "score_rejected"):
        v = row.get(k)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"{k} must be a number"
            if not math.isfinite(v):
                return f"{k} is {v}, not a finite number"
            out[k] = float(v)
    return out


def check_columns(rows: list[dict], source: str) -> None:
    """A wrong column name is a one-line error that suggests the close ones."""
    dicts = [r for r in rows[:100] if isinstance(r, dict)]
    if not dicts:
        raise UserError(f"dataset {source!r}: the first rows are not JSON objects")
    columns = set().union(*(r.keys() for r in dicts))
    for need in ("prompt", *REQUIRED):
        if need in columns or (need == "prompt" and isinstance(dicts[0].get("chosen"), list)):
            continue
        close = difflib.get_close_matches(need, sorted(columns), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"columns present: {', '.join(sorted(columns))}"
        raise UserError(f"dataset {source!r} has no column {need!r}", hint=hint + " (rename it, e.g. with datasets' rename_column)")


def validate_rows(rows: list[dict], max_bad: float, source: str = "dataset") -> tuple[list[dict], list[tuple[int, str]]]:
    """Good rows and (index, reason) for the bad ones; too many bad rows refuses the run."""
    check_columns(rows, source)
    good, bad = [], []
    for i, row in enumerate(rows):
        r = normalize_row(row) if isinstance(row, dict) else row.reason if isinstance(row, BadLine) else "row is not an object"
        (bad.append((i, r)) if isinstance(r, str) else good.append(r))
    if bad and len(bad) > max_bad * len(rows):
        first = "; ".join(f"row {i}: {why}" for i, why in bad[:3])
        raise UserError(
            f"{len(bad)} of {len(rows)} rows in {source} are invalid ({first})",
            hint=f"fix them, or raise data.max_bad_rows above {len(bad) / len(rows):.3f} to skip them",
        )
    return good, bad


def drop_identical(rows: list[dict], source: str = "dataset") -> tuple[list[dict], int]:
    """Rows whose chosen text equals the rejected text carry no preference: DPO's margin on them is 0 whatever the
    model does, so they only dilute the seed (and count as coin flips in the test split). Drop them and return how
    many; refuse a set where most rows are like that, since that is a broken export (both columns filled from one
    field), not noise."""
    kept = [r for r in rows if r["chosen"].strip() != r["rejected"].strip()]
    n = len(rows) - len(kept)
    if n > MAX_IDENTICAL * len(rows):
        raise UserError(
            f"{n} of {len(rows)} rows in {source} have chosen identical to rejected: nothing to learn from",
            hint="check the chosen/rejected columns (were both filled from the same field?)",
        )
    return kept, n


def pool_sizes(n_available: int, cfg: DataConfig, rounds: int) -> list[int]:
    if cfg.pool_sizes:
        sizes = list(cfg.pool_sizes[:rounds])
        if len(sizes) < rounds:  # data.extra_pools (config.validate refused "off" already)
            sizes = extra_pool_sizes(sizes, rounds, n_available, cfg.extra_pools)
        if sum(sizes) > n_available:
            raise UserError(
                f"pools of {'+'.join(map(str, sizes))} = {sum(sizes)} prompts do not fit: only {n_available} rows remain "
                "after the seed pairs and the test split",
                hint="lower data.pool_sizes, --rounds or data.test_size",
            )
        return sizes
    ratio = cfg.pool_ratio[:rounds]
    sizes = [int(n_available * r / sum(ratio)) for r in ratio] if rounds else []
    if any(s < 1 for s in sizes):
        raise UserError(
            f"only {n_available} rows remain for {rounds} rounds' prompt pools", hint="use fewer rounds or more data"
        )
    return sizes


def extra_pool_sizes(listed: list[int], rounds: int, n_available: int, mode: str) -> list[int]:
    """Pool sizes for rounds beyond the listed ones (data.extra_pools): "last" repeats the last listed size (the sum is
    checked by the caller), "rest" shares the prompts left after the listed pools equally among the extra rounds
    (the remainder unused). Refused when an extra round would get no prompt."""
    extra = rounds - len(listed)
    if mode == "last":
        return listed + [listed[-1]] * extra
    left = n_available - sum(listed)
    each = left // extra if left > 0 else 0
    if each < 1:
        raise UserError(
            f"rounds {len(listed) + 1}-{rounds} have no prompts left: the pools of data.pool_sizes "
            f"({'+'.join(map(str, listed))} = {sum(listed)}) leave {max(0, left)} of the {n_available} rows that remain "
            f"after the seed pairs and the test split for {extra} more round(s)",
            hint="lower data.pool_sizes, --rounds or data.test_size")
    return listed + [each] * extra


def split_rows(rows: list[dict], cfg: DataConfig, rounds: int, random_seed: int, n_bad: int = 0,
               n_identical: int = 0) -> Split:
    """One fixed shuffle: [seed pairs | pool 1 | ... | pool T | (unused) | test pairs]."""
    n = len(rows)
    n_seed = parse_labelled_share(cfg.labelled_share, n)
    # Seed and test pairs must never overlap; with rounds > 0 the pools need at least one row between them too.
    if n_seed + cfg.test_size > n or (n_seed + cfg.test_size == n and rounds > 0):
        raise UserError(
            f"{n} rows cannot hold {n_seed} seed pairs, a {cfg.test_size}-row test split"
            + (" and prompt pools" if rounds > 0 else ""),
            hint="lower --seed or data.test_size",
        )
    order = list(range(n))
    random.Random(random_seed).shuffle(order)
    shuffled = [rows[i] for i in order]
    seed_pairs = shuffled[:n_seed]
    test_pairs = shuffled[n - cfg.test_size :] if cfg.test_size else []
    middle = shuffled[n_seed : n - cfg.test_size]
    sizes = pool_sizes(len(middle), cfg, rounds)
    pools, start = [], 0
    for s in sizes:
        pools.append([r["prompt"] for r in middle[start : start + s]])
        start += s
    return Split(seed_pairs=seed_pairs, pools=pools, test_pairs=test_pairs, n_rows=n, n_bad=n_bad,
                 n_identical=n_identical)


def load_split(cfg: DataConfig, rounds: int, random_seed: int, source: str | None = None) -> Split:
    source = source or cfg.source
    rows, bad = validate_rows(load_rows(source, cfg.split), cfg.max_bad_rows, source)
    rows, n_identical = drop_identical(rows, source)
    return split_rows(rows, cfg, rounds, random_seed, n_bad=len(bad), n_identical=n_identical)
