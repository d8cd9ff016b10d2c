"""Every knob of the method as plain frozen dataclasses. The defaults are the paper's values (arXiv 2406.04412)
where it gives one and a LoRA/CPU-sized value where it does not (each says which), except the loop's own additions
(method, robust.*, guard.*): those default to what measured best (docs/results.md); method = paper turns them off.

Layers, last wins: defaults < preset (examples/<name>.toml) < --config FILE < flags (--set KEY=VALUE).
An unknown key, a value of the wrong type or a choice outside its Literal is named and stops the run before any
weights load; validate.py checks ranges and cross-field rules.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from selfie_lite.errors import UserError

# The settings that take one of a few words: each list lives here only; the loader (_check_type), the CLI's help and
# its choices read them with choices().
Backend = Literal["auto", "hf", "unsloth"]
Method = Literal["selfie", "paper"]
Sampler = Literal["generate", "vllm", "auto"]
JudgeReference = Literal["init", "previous"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
TrainReference = Literal["previous", "sft"]
ConsistencyMode = Literal["off", "pair", "round"]
ExtraPools = Literal["off", "last", "rest"]


def choices(tp) -> tuple[str, ...]:
    """The words a Literal setting accepts, in order."""
    return typing.get_args(tp)


EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
PACKAGED_PRESETS = Path(__file__).resolve().parent / "presets"


@dataclass(frozen=True)
class DataConfig:
    source: str = ""  # hub name, .jsonl/.parquet file or save_to_disk folder; "" = the tiny preset's gold set
    split: str = "train"  # split name when `source` is a hub dataset or a DatasetDict folder
    # The LABELLED share kept as human pairs (`--seed`, the paper's word): "3.3pct", "3.3%" or a count like "2000".
    # Not a random seed (that is random_seed).
    labelled_share: str = "3.3pct"
    test_size: int = 1000  # held-out labelled pairs for evaluation (rows), taken before the pools
    pool_ratio: list[float] = field(default_factory=lambda: [8.0, 20.0, 30.0])  # paper: 8K:20K:30K
    pool_sizes: list[int] = field(default_factory=list)  # explicit prompts per round; overrides pool_ratio
    # Rounds beyond the pools that data.pool_sizes lists (--rounds 5 with 3 pools): "off" = refused (one listed pool
    # per round), "last" = each takes the last listed size, "rest" = they share the prompts left over equally.
    # A split that does not fit the data is refused, naming the sizes (data.pool_sizes).
    extra_pools: ExtraPools = "off"
    max_bad_rows: float = 0.01  # fraction of invalid rows tolerated (skipped and counted); more refuses to start


@dataclass(frozen=True)
class SampleConfig:
    num_samples: int = 2  # K responses per prompt (paper 2); chosen = best, rejected = worst
    temperature: float = 0.7  # paper 0.7
    top_p: float = 1.0  # paper 1.0
    max_new_tokens: int = 300  # paper 300
    batch_size: int = 32  # prompts per generate() call
    chunk_size: int = 256  # prompts per resumable shard on disk
    sampler: Sampler = "generate"  # "generate" (the backend), "vllm" (GPU, if installed) or "auto"
    tensor_parallel_size: int = 1  # GPUs per vLLM engine (sampler vllm); under a launcher it must divide the processes per machine


@dataclass(frozen=True)
class JudgeConfig:
    reference: JudgeReference = "init"  # "init" (pi_init, the paper's choice) or "previous" (ablation: pi_{i-1}'s own reference)
    batch_size: int = 32  # sequences per forward pass
    policy_from_sampling: bool = True  # reuse log pi_{i-1}(y|x) from the sampling pass: one forward pass saved


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 5e-6  # LoRA needs far more than the paper's full-FT 5e-7
    lr_scheduler: str = "cosine"  # paper: cosine
    warmup_ratio: float = 0.1  # paper: 10% of steps
    batch_size: int = 8  # pairs per device step
    grad_accum: int = 4  # effective batch = batch_size * grad_accum (paper 32)
    seed_epochs: int = 3  # round 0 (paper: 3 for a seed of <= 2K pairs)
    round_epochs: int = 1  # rounds 1..T (paper: 1)
    max_length: int = 1024  # prompt + response tokens (paper 2048)
    max_prompt_length: int = 512  # paper 1024
    gradient_checkpointing: bool = True
    precision: Precision = "auto"  # "auto" (bf16 on a GPU that has it, else fp32), "bf16", "fp16", "fp32"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class RefineConfig:
    alpha: float = 0.1  # smoothing strength for low-confidence pairs (paper 0.1); 0 = no smoothing
    low_conf_frac: float = 0.1  # K: bottom fraction of pairs by extrapolated margin that get smoothed (paper 10%)
    warmup_frac: float = 0.2  # no smoothing during this share of the round's optimizer steps (paper 20%)
    lambdas: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])  # per round; 0 = plain margin
    window_pairs: int = 50  # running window of per-pair margins for the K% threshold (public code: 50)
    vocab_chunk: int = 8192  # vocabulary chunk for the full-vocab log-normaliser of h_g (memory bound)


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass(frozen=True)
class RobustConfig:
    """Counter-measures against late-round drift (docs/method.md, "Counter-measures against drift"). Each OFF value
    is exactly the paper's loop (arXiv 2406.04412; method = "paper" sets them all, see PAPER below). The defaults are
    the combination that did best on the tiny bench's validation prompts (docs/results.md, "Counter-measures")."""

    # Share (0..1) of each round's (i >= 1) training pairs that are human seed pairs replayed from data/seed.jsonl
    # (DICE's gamma, which DICE also sets to 0.5). Replayed pairs are never smoothed. Off = 0 (self-labels only).
    gold_replay: float = 0.5
    # Factor per round (dimensionless): round i >= 1 trains at train.learning_rate * lr_decay ** (i - 1).
    # Off = 1 (the same learning rate every round).
    lr_decay: float = 1.0
    # Judge picks chosen/rejected by reward - a * length (tokens), `a` (reward per token) fitted per round so that
    # the mean chosen-minus-rejected length gap is about 0 (DICE). Stored rewards stay the true ones.
    # Off = false (chosen = highest reward).
    length_debias: bool = False
    # DPO reference in rounds >= 1: "previous" = off (pi_{i-1}: the merged model, adapter disabled) or "sft"
    # (pi_init, a fixed anchor, as RLHFlow's iterative DPO), scored in a separate pass before training.
    train_reference: TrainReference = "sft"
    # CREAM's consistency weighting in rounds >= 2: "off", "pair" (each pair smoothed by a = min(0.5, 1 - C), C the
    # rank agreement of this round's and the previous round's judge on its prompt's samples) or "round" (one a for
    # every pair, from the round's mean C). Replaces the paper's bottom-K smoothing in those rounds. Off = "off".
    consistency: ConsistencyMode = "pair"
    # Step budget (docs/method.md (E12)): at most this many optimizer steps in each round i >= 1 (the pools grow, so
    # later rounds would otherwise take several times round 1's steps at the same learning rate); the trainer's
    # schedule runs over the capped count and the pairs past it (in the trainer's shuffled order) are not seen.
    # Off = 0 (every pair, train.round_epochs epochs).
    max_steps: int = 0
    # Margin selection (docs/method.md (E13); SeRA, arXiv 2410.09362): keep this share (0..1] of each round's
    # self-labelled pairs, those with the largest implicit-reward margin r(y_w) - r(y_l) (the judge's own); the
    # replayed human pairs follow the kept count. Off = 1 (every pair).
    margin_keep: float = 1.0
    # Anchored rejected responses (docs/method.md (E14); Temporal Self-Rewarding, arXiv 2508.06026): in rounds i >= 2
    # the seed-DPO model pi_0 also answers every prompt (K samples, a stage of its own); the pair's chosen response is
    # the best of pi_{i-1}'s samples, its rejected response the worst of pi_0's, both by this round's judge (E2).
    # Off = false (chosen and rejected both from pi_{i-1}'s samples).
    anchor_rejected: bool = False


@dataclass(frozen=True)
class GuardConfig:
    """Which round `run` ships, and when the loop stops early (docs/method.md, "Round guard")."""

    # "last" = the paper (ship the last round); "guard" (default) = before round i >= from_round trains, compare its
    # self-labels with the seed-DPO judge pi_0's and stop (shipping round i-1) when they agree on fewer than
    # min_anchor_agreement of the pairs; or an external scorer ("oracle", "python:MODULE:FUNCTION",
    # "reward-model:PATH", scorers.py): ship the round whose answers to probe_prompts held-out prompts it scores best.
    select: str = "guard"
    min_anchor_agreement: float = 0.93  # share of pairs (0..1); picked on the tiny bench's validation prompts
    # The first round the guard may stop before (>= 2: round 1's labels are pi_0's own). 3: round 2 always trains; on
    # every run we measured round 2 beat round 1, and every stop before round 2 was a false alarm (docs/results.md).
    from_round: int = 3
    probe_prompts: int = 200  # held-out prompts (data/test.jsonl) answered per round when select is a scorer


@dataclass(frozen=True)
class RunConfig:
    model: str = ""  # SFT model: local folder or hub id; "" = the tiny preset's SFT model
    backend: Backend = "auto"  # "auto", "hf" or "unsloth"
    load_in_4bit: bool = False  # QLoRA via bitsandbytes (merges still go to full precision)
    trust_remote_code: bool = False  # never on unless asked
    chat_template: str = ""  # Jinja file for models that ship without one
    rounds: int = 3  # T (paper 3)
    beta: float = 0.1  # DPO temperature, for the judge and the loss (paper 0.1)
    # "selfie" (default): the measured-best loop, today the paper's plus the round guard (docs/results.md);
    # "paper": the paper's loop exactly (guard.select = last, every robust.* setting off, whatever else says).
    method: Method = "selfie"
    random_seed: int = 42  # NOT the labelled share: that is data.labelled_share
    threads: int = 0  # torch CPU threads; 0 = auto (1 for a small model on a CPU, else torch's default): numerics.py
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)


# ---------------------------------------------------------------------------------------------
# Loading, merging and validating


def _check_type(key: str, value, tp):
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, str) and value in choices(tp):
            return value
        raise UserError(f"{key} must be one of {', '.join(choices(tp))}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"config key {key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"config key {key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = [n for n in names if n.startswith(key[:3]) or key in n]
            hint = f"did you mean {', '.join(sorted(close))}?" if close else f"known keys: {', '.join(sorted(names))}"
            raise UserError(f"unknown config key {prefix}{key}", hint=hint)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(data[f.name], dict):
                raise UserError(f"config key {prefix}{f.name} must be a table of settings",
                                hint=f"set one of its keys (--set {prefix}{f.name}.KEY=VALUE), or write a "
                                f"[{prefix}{f.name}] table in a TOML file")
            kwargs[f.name] = _build(tp, data[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_type(prefix + f.name, data[f.name], tp)
    return cls(**kwargs)


def deep_merge(base: dict, over: dict) -> dict:
    """base with over's keys laid on top, nested tables merged key by key (a preset, then a file, then flags)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_path(name: str) -> Path:
    for folder in (PACKAGED_PRESETS, EXAMPLES_DIR):
        p = folder / f"{name}.toml"
        if p.is_file():
            return p
    known = sorted({p.stem for d in (PACKAGED_PRESETS, EXAMPLES_DIR) if d.is_dir() for p in d.glob("*.toml")})
    raise UserError(f"no preset named {name!r}", hint=f"known presets: {', '.join(known) or 'none'}")


def read_toml(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a folder, expected a .toml file")
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # TOML is UTF-8; an editor's byte-order mark is harmless
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})",
                        hint="save it as UTF-8 (TOML files are UTF-8)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None


def parse_override(text: str) -> dict:
    """'train.learning_rate=1e-5' -> {'train': {'learning_rate': 1e-05}}; values parse as TOML, else as strings."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-5")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def preset_for(preset: str | None, config_file: Path | None, overrides: list[dict], base: dict | None) -> str | None:
    """The preset a run's settings start from: the one named, else the built-in tiny preset when nothing names a model
    (no --config file, no model override, not a resumed run's saved settings), whatever the machine."""
    if preset is None and base is None and config_file is None and not any("model" in o for o in overrides):
        return "tiny"
    return preset


def load_config(preset: str | None = None, config_file: Path | None = None, overrides: list[dict] | None = None,
                base: dict | None = None):
    """Defaults (or `base`, a saved config.json on --resume) < preset < file < overrides. Returns a validated
    RunConfig.

    Each layer is checked on its own (unknown keys, types, a section given as a value) before the layers merge:
    merged first, a later layer's [data] table would replace an earlier layer's `data = 5` and hide it. Settings
    that the file and the overrides (what the user wrote; not the preset, not a resumed run's saved settings) give
    but that the chosen method would ignore are refused too (`check_ignored`)."""
    layers = [dict(base or {})]
    if preset:
        layers.append(read_toml(preset_path(preset)))
    explicit = []
    if config_file:
        explicit.append(read_toml(config_file))
    explicit += list(overrides or [])
    data: dict = {}
    for layer in layers + explicit:
        _build(RunConfig, layer)  # types and keys of this layer alone
        data = deep_merge(data, layer)
    if data.get("method") == "paper":
        data = _paper(data)
    from selfie_lite.validate import check_ignored, validate  # validate.py reads this module's dataclasses

    cfg = _build(RunConfig, data)
    validate(cfg)
    given: dict = {}
    for layer in explicit:
        given = deep_merge(given, layer)
    check_ignored(cfg, given)
    return cfg


# method = "paper": the paper's loop exactly (arXiv 2406.04412), in one place. Everything else (beta, lr, sampling,
# smoothing, noise detection) follows the config as usual: these are the settings that selfie-lite adds.
PAPER = {"guard": {"select": "last"},
         "robust": {"gold_replay": 0.0, "lr_decay": 1.0, "length_debias": False, "train_reference": "previous",
                    "consistency": "off", "max_steps": 0, "margin_keep": 1.0,
                    "anchor_rejected": False}}


def _paper(data: dict) -> dict:
    """Fill in the paper's values; a layer that asked for something else contradicts method = paper: refuse."""
    out = dict(data)
    for section, values in PAPER.items():
        given = dict(data.get(section) or {})
        for key, value in values.items():
            if key in given and given[key] != value:
                raise UserError(f"method = paper runs the paper's loop exactly, but {section}.{key} = "
                                f"{json.dumps(given[key])} is set too", hint=f"drop {section}.{key}, or drop method = paper")
            given[key] = value
        out[section] = given
    return out


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local paths (model, data source, chat template) made absolute, as config.json must store them: a path kept
    as typed (./sft) means another folder when `--resume` runs from another working directory, and there it may
    even exist and be another model. Hub ids (org/name) with no such local path are left alone."""

    def local(p: str) -> str:
        path = Path(p).expanduser()
        return str(path.resolve()) if p and path.exists() else p

    return dataclasses.replace(cfg, model=local(cfg.model), chat_template=local(cfg.chat_template),
                               data=dataclasses.replace(cfg.data, source=local(cfg.data.source)))


def from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, data)


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ, dotted; for --resume on a directory made with other settings."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {json.dumps(va)} -> {json.dumps(vb)}")
    return out
