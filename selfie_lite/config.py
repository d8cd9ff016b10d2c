"""Every knob of the method as plain frozen dataclasses, with the paper's values as defaults.

Layers, last wins: defaults < preset (examples/<name>.toml) < --config FILE < flags (--set KEY=VALUE).
An unknown key or a value of the wrong type is named and stops the run before any weights load.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from selfie_lite.errors import UserError

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
PACKAGED_PRESETS = Path(__file__).resolve().parent / "presets"


@dataclass(frozen=True)
class DataConfig:
    source: str = ""  # hub name, .jsonl/.parquet file or save_to_disk folder; "" = the tiny preset's gold set
    split: str = "train"  # split name when `source` is a hub dataset or a DatasetDict folder
    seed: str = "3.3pct"  # LABELLED share kept as human pairs: "3.3pct", "3.3%" or a count like "2000"
    test_size: int = 1000  # held-out labelled pairs for evaluation (rows), taken before the pools
    pool_ratio: list[float] = field(default_factory=lambda: [8.0, 20.0, 30.0])  # paper: 8K:20K:30K
    pool_sizes: list[int] = field(default_factory=list)  # explicit prompts per round; overrides pool_ratio
    max_bad_rows: float = 0.01  # fraction of invalid rows tolerated (skipped and counted); more refuses to start


@dataclass(frozen=True)
class SampleConfig:
    num_samples: int = 2  # K responses per prompt (paper 2); chosen = best, rejected = worst
    temperature: float = 0.7  # paper 0.7
    top_p: float = 1.0  # paper 1.0
    max_new_tokens: int = 300  # paper 300
    batch_size: int = 32  # prompts per generate() call
    chunk_size: int = 256  # prompts per resumable shard on disk
    sampler: str = "generate"  # "generate" (the backend), "vllm" (GPU, if installed) or "auto"


@dataclass(frozen=True)
class JudgeConfig:
    reference: str = "init"  # "init" (pi_init, the paper's choice) or "previous" (ablation: pi_{i-1}'s own reference)
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
    precision: str = "auto"  # "auto" (bf16 on a GPU that has it, else fp32), "bf16", "fp16", "fp32"
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
class RunConfig:
    model: str = ""  # SFT model: local folder or hub id; "" = the tiny preset's SFT model
    backend: str = "auto"  # "auto", "hf" or "unsloth"
    load_in_4bit: bool = False  # QLoRA via bitsandbytes (merges still go to full precision)
    trust_remote_code: bool = False  # never on unless asked
    chat_template: str = ""  # Jinja file for models that ship without one
    rounds: int = 3  # T (paper 3)
    beta: float = 0.1  # DPO temperature, for the judge and the loss (paper 0.1)
    random_seed: int = 42  # NOT the labelled share: that is data.seed
    threads: int = 0  # torch CPU threads; 0 = auto (1 for a small model on a CPU, else torch's default): numerics.py
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


# ---------------------------------------------------------------------------------------------
# Labelled share: "3.3pct" | "3.3%" | "2000"


def parse_seed(text: str, n_rows: int | None = None) -> int | float:
    """Return a fraction (0 < f <= 1) for percentages or an int count; with n_rows, always the count."""
    raw = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(pct|%)", raw, flags=re.IGNORECASE)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise UserError(f"--seed {raw}: the labelled share must be above 0% and at most 100%")
        value: int | float = pct / 100.0
    elif re.fullmatch(r"\d+", raw):
        value = int(raw)
        if value <= 0:
            raise UserError(f"--seed {raw}: need at least one labelled pair", hint="try --seed 3.3pct")
    else:
        raise UserError(
            f"--seed {raw!r} is not a labelled share", hint="write a percentage (3.3pct, 3.3%) or a pair count (2000)"
        )
    if n_rows is None:
        return value
    count = max(1, round(value * n_rows)) if isinstance(value, float) else value
    if count > n_rows:
        raise UserError(f"--seed {raw} asks for {count} labelled pairs but the data has {n_rows} valid rows")
    return count


# ---------------------------------------------------------------------------------------------
# Loading, merging and validating


def _check_type(key: str, value, tp):
    origin = typing.get_origin(tp)
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
                raise UserError(f"config key {prefix}{f.name} must be a table of settings")
            kwargs[f.name] = _build(tp, data[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_type(prefix + f.name, data[f.name], tp)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
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


def load_config(preset: str | None = None, config_file: Path | None = None, overrides: list[dict] | None = None):
    """Defaults < preset < file < overrides. Returns a validated RunConfig."""
    data: dict = {}
    if preset:
        data = _deep_merge(data, read_toml(preset_path(preset)))
    if config_file:
        data = _deep_merge(data, read_toml(config_file))
    for o in overrides or []:
        data = _deep_merge(data, o)
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, data)


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that the types alone cannot express."""
    parse_seed(cfg.data.seed)
    if cfg.rounds < 0:
        raise UserError(f"rounds must be >= 0, got {cfg.rounds}")
    pools = cfg.data.pool_sizes or cfg.data.pool_ratio
    if len(pools) < cfg.rounds:
        raise UserError(
            f"{cfg.rounds} rounds need {cfg.rounds} prompt pools but data.pool_{'sizes' if cfg.data.pool_sizes else 'ratio'} "
            f"has {len(pools)}",
            hint="give one pool per round, or lower --rounds",
        )
    if any(p <= 0 for p in pools):
        raise UserError("every prompt pool must be larger than zero")
    if cfg.sample.num_samples < 2:
        raise UserError(f"sample.num_samples must be at least 2 to form a pair, got {cfg.sample.num_samples}")
    if not 0 < cfg.sample.top_p <= 1:
        raise UserError(f"sample.top_p must be in (0, 1], got {cfg.sample.top_p}")
    if cfg.sample.temperature <= 0:
        raise UserError(f"sample.temperature must be > 0 (sampling needs it), got {cfg.sample.temperature}")
    if cfg.beta <= 0:
        raise UserError(f"beta must be > 0, got {cfg.beta}")
    if not 0 <= cfg.refine.alpha < 0.5:
        raise UserError(f"refine.alpha must be in [0, 0.5), got {cfg.refine.alpha}")
    if not 0 <= cfg.refine.low_conf_frac <= 1:
        raise UserError(f"refine.low_conf_frac must be in [0, 1], got {cfg.refine.low_conf_frac}")
    if len(cfg.refine.lambdas) < cfg.rounds:
        raise UserError(f"refine.lambdas needs one value per round ({cfg.rounds}), got {len(cfg.refine.lambdas)}")
    if cfg.sample.sampler not in ("generate", "vllm", "auto"):
        raise UserError(f"sample.sampler must be generate, vllm or auto, got {cfg.sample.sampler!r}")
    if cfg.judge.reference not in ("init", "previous"):
        raise UserError(f"judge.reference must be 'init' or 'previous', got {cfg.judge.reference!r}")
    if cfg.backend not in ("auto", "hf", "unsloth"):
        raise UserError(f"backend must be auto, hf or unsloth, got {cfg.backend!r}")
    if cfg.train.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"train.precision must be auto, bf16, fp16 or fp32, got {cfg.train.precision!r}")
    if cfg.train.max_prompt_length >= cfg.train.max_length:
        raise UserError("train.max_prompt_length must be smaller than train.max_length")
    if cfg.threads < 0:
        raise UserError(f"threads must be >= 0 (0 = auto), got {cfg.threads}")
    for name in ("learning_rate",):
        if getattr(cfg.train, name) <= 0:
            raise UserError(f"train.{name} must be > 0")
    for name in ("batch_size", "grad_accum", "seed_epochs", "round_epochs"):
        if getattr(cfg.train, name) < 1:
            raise UserError(f"train.{name} must be >= 1")


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
