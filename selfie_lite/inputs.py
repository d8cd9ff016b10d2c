"""What a run starts from, checked and fixed before anything trains: the SFT model (pi_init) and the data split.

resolve_inputs picks the model and data (the built-in tiny preset when none is given), preflight checks them before a
weight loads or a file is written, prepare_data splits the preference set once into the run folder (data/), and
check_resume_sft refuses a resume whose SFT model is not the one the run started from (model_fingerprint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from selfie_lite.config import RunConfig
from selfie_lite.data import load_split
from selfie_lite.errors import UserError, describe
from selfie_lite.fingerprint import model_fingerprint
from selfie_lite.rundir import atomic_write_json, atomic_write_jsonl, read_json


@dataclass
class Inputs:
    model_dir: Path  # pi_init
    data_source: str
    gold: Callable[[str, str], float] | None  # an oracle scorer where one exists (the tiny preset)
    tiny: bool


def resolve_inputs(cfg: RunConfig, console: Console | None = None) -> Inputs:
    """No --model / no data source means the built-in tiny preset (built on first use, then cached). A GGUF model
    (a .gguf file, a folder holding one, builtin:NAME) is converted once into a cached model folder
    (gguf.resolve_model), and the run uses that folder; config.json keeps the model as the user gave it.
    data.source = "builtin:smol": the smol preset's gold preference set and checker (selfie_lite/smol), on
    builtin:smollm2 unless a model is given."""
    from selfie_lite.gguf import resolve_model
    from selfie_lite.model_files import check_model_source

    model_dir, source, gold, tiny = cfg.model, cfg.data.source, None, False
    if source == SMOL_SOURCE and not model_dir:
        model_dir = SMOL_MODEL
    if model_dir:
        check_model_source(model_dir)  # before building anything
        model_dir = resolve_model(model_dir, progress=_say(console))  # a GGUF model: its converted folder
    if source == SMOL_SOURCE:
        from selfie_lite.smol import build_smol

        preset = build_smol(Path(model_dir), progress=_build_progress(console, "the smol preset"))
        source, gold = str(preset.preferences), preset.score
    elif not model_dir or not source:
        from selfie_lite.tiny.build import build_tiny
        from selfie_lite.tiny.task import score

        preset = build_tiny(progress=_build_progress(console))
        model_dir = model_dir or str(preset.model_dir)
        if not source:
            source, gold, tiny = str(preset.preferences), score, True
    return Inputs(Path(model_dir) if Path(model_dir).exists() else model_dir, source, gold, tiny)


SMOL_SOURCE, SMOL_MODEL = "builtin:smol", "builtin:smollm2"  # the real-model preset's data, and its default model


def _say(console):
    from rich.markup import escape

    return None if console is None else (lambda message: console.print(f"[dim]{escape(message)}[/dim]"))


def _build_progress(console, what: str = "the tiny preset"):
    if console is None:
        return None
    state = {"last": None}

    def report(stage: str, fraction: float):
        if stage != state["last"]:
            console.print(f"[dim]building {what}: {stage}[/dim]")
            state["last"] = stage

    return report


def preflight(cfg: RunConfig, backend, inputs: Inputs):
    """Everything that can be wrong with the input, checked before a single weight loads or a file is written:
    the model folder (or hub id while offline: its files are checked, its weights sampled for NaN, never loaded),
    its tokenizer and chat template, settings this machine cannot run, every data row, the split sizes, and the
    scorer that picks the shipped round (guard.select)."""
    from selfie_lite.model_files import check_chat_template, check_model_files, check_model_source

    check_model_source(inputs.model_dir)
    if cfg.train.precision == "fp16" and backend.device != "cuda":
        raise UserError("train.precision = fp16 needs a CUDA GPU, and this machine has none",
                        hint="use train.precision = fp32 (or auto) on a CPU")
    if Path(inputs.model_dir).exists():
        check_model_files(inputs.model_dir, cfg.lora, cfg.trust_remote_code)
        try:
            tok = backend.load_tokenizer(inputs.model_dir)
        except UserError:
            raise
        except Exception as e:  # tokenizers/transformers raise many types for a broken tokenizer
            raise UserError(f"could not load the tokenizer in {inputs.model_dir}: {describe(e)[:200]}",
                            hint="download or copy the model's tokenizer files again") from None
        where = f"--chat-template {cfg.chat_template}" if cfg.chat_template else f"of {inputs.model_dir}"
        check_chat_template(tok, where)
    split = load_split(cfg.data, cfg.rounds, cfg.random_seed, inputs.data_source)
    check_selection(cfg, [r["prompt"] for r in split.test_pairs])
    return split


def check_selection(cfg: RunConfig, test_prompts: list[str]) -> None:
    """guard.select = a scorer: parse it and check it against the probe prompts (the first guard.probe_prompts of
    the held-out test split) now, as `eval` does, rather than after every round has trained. Nothing heavy loads:
    a reward model's folder is checked, not loaded; a python scorer's module is imported (its own code runs)."""
    if cfg.guard.select in ("last", "guard"):
        return
    from selfie_lite.scorers import parse_scorer

    scorer = parse_scorer(cfg.guard.select, key="guard.select")
    prompts = test_prompts[: cfg.guard.probe_prompts]
    if not prompts:
        raise UserError(f"{cfg.guard.select} needs held-out prompts to probe the rounds with, but data.test_size = 0 "
                        "leaves none", hint="give data.test_size > 0, or select the round with the guard",
                        key="guard.select")
    scorer.check(prompts)
    scorer.close()


def prepare_data(cfg: RunConfig, run_dir: Path, inputs: Inputs, split=None) -> dict:
    """Split once and keep the split in the run folder: a resume never re-reads (or re-shuffles) the dataset.
    split.json also names the SFT model the run started from, for `selfie-lite eval` to compare against."""
    folder = run_dir / "data"
    if (folder / "split.json").is_file():
        return read_json(folder / "split.json")
    source = inputs.data_source
    split = split or load_split(cfg.data, cfg.rounds, cfg.random_seed, source)
    atomic_write_jsonl(folder / "seed.jsonl", [dict(r, pair_id=i) for i, r in enumerate(split.seed_pairs)])
    atomic_write_jsonl(folder / "test.jsonl", split.test_pairs)
    for i, pool in enumerate(split.pools, start=1):
        atomic_write_jsonl(folder / f"pool-{i}.jsonl", [{"prompt": p} for p in pool])
    info = {
        "source": source,
        "sft_model": str(inputs.model_dir),
        "sft_model_hash": model_fingerprint(inputs.model_dir),
        "valid_rows": split.n_rows,
        "skipped_bad_rows": split.n_bad,
        "dropped_identical_pairs": split.n_identical,
        "seed_pairs": len(split.seed_pairs),
        "pools": [len(p) for p in split.pools],
        "test_pairs": len(split.test_pairs),
    }
    atomic_write_json(folder / "split.json", info)  # last: its presence means the split is complete
    return info


def sft_model_of(run_dir: Path) -> str | None:
    """The SFT model (pi_init) a run started from. The tiny preset's cache can be rebuilt or moved (its SFT weights
    are not bit-identical across builds), so a run is compared with the model it really started from."""
    p = run_dir / "data" / "split.json"
    return read_json(p).get("sft_model") if p.is_file() else None


def check_resume_sft(run_dir: Path, model_dir=None) -> None:
    """On --resume: the SFT model must be the one the run started from (data/split.json), or the resumed rounds
    would train and judge against another pi_init without a word. model_dir is the model this resume would use
    (None: not known yet, the tiny preset's); the same weights moved elsewhere (--force --model NEW) pass, since
    the content hash is compared, not the path."""
    from selfie_lite.gguf import resolve_model

    p = Path(run_dir) / "data" / "split.json"
    info = read_json(p) if p.is_file() else {}
    recorded, want = info.get("sft_model"), info.get("sft_model_hash")
    if recorded and model_dir is not None:
        model_dir = resolve_model(model_dir)  # a GGUF model (builtin:NAME, x.gguf): the converted folder it recorded
    if not recorded:
        return  # no split yet: nothing has trained, any model is fine
    # A hash means it was a local folder. Checked before the model resolves, so the message names the run's model
    # rather than only "model folder ... does not exist".
    if want and not Path(recorded).exists() and not (model_dir and Path(model_dir).expanduser().exists()):
        raise UserError(
            f"{run_dir} started from the SFT model {recorded}, which is missing now"
            + (f" (this resume would use {model_dir})" if model_dir else ""),
            hint="put that model back where it was, or pass a copy of it with --model PATH --force; "
            "a different SFT model would mix two runs",
        )
    if model_dir is None or not want:
        return  # a hub model, or a run made before hashes were recorded: nothing to compare
    have = model_fingerprint(model_dir)
    if have != want:
        raise UserError(
            f"{run_dir} started from the SFT model {recorded} ({want[:19]}...), but this resume would use "
            f"{model_dir} ({(have or 'no local folder')[:19]}...)",
            hint="resume from the folder the run was started in, or restore that model; "
            "a different SFT model would mix two runs",
        )
