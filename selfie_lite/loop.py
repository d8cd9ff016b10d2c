"""The SPA rounds, top to bottom (spa-method.md).

    round 0:      train (DPO on the seed pairs, reference = pi_init) -> merge            => pi_0
    round i>=1:   sample (pi_{i-1}) -> judge (pi_{i-1} vs pi_init) -> train (LoRA DPO from pi_{i-1}, reference
                  pi_{i-1}, per-pair smoothing of low-confidence pairs) -> merge          => pi_i

Each stage runs only if its done-marker is missing, writes its outputs atomically, then marks itself done, so a run
killed anywhere resumes with `--resume` at the first unfinished stage and reaches the same result.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from selfie_lite.config import RunConfig
from selfie_lite.data import load_split
from selfie_lite.errors import UserError
from selfie_lite.guard import guard_stage, select_by_judge, stop_reason
from selfie_lite.judge import judge_round
from selfie_lite.merge import merge_round
from selfie_lite.numerics import resolve_threads, torch_threads
from selfie_lite.rundir import (
    adapter_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    check_free_space,
    config_rev,
    format_bytes,
    fresh_tmp_dir,
    is_done,
    mark_done,
    marker,
    maybe_kill,
    merged_model_bytes,
    read_json,
    read_jsonl,
    replace_dir,
    stage_metrics,
)
from selfie_lite.sample import load_samples, sample_round


@dataclass
class Inputs:
    model_dir: Path  # pi_init
    data_source: str
    gold: Callable[[str, str], float] | None  # an oracle scorer where one exists (the tiny preset)
    tiny: bool


def resolve_inputs(cfg: RunConfig, console: Console | None = None) -> Inputs:
    """No --model / no data source means the built-in tiny preset (built on first use, then cached)."""
    from selfie_lite.backends.hf import check_model_source

    model_dir, source, gold, tiny = cfg.model, cfg.data.source, None, False
    if model_dir:
        check_model_source(model_dir)  # before building anything
    if not model_dir or not source:
        from selfie_lite.tiny.build import build_tiny
        from selfie_lite.tiny.task import score

        preset = build_tiny(progress=_build_progress(console))
        model_dir = model_dir or str(preset.model_dir)
        if not source:
            source, gold, tiny = str(preset.preferences), score, True
    return Inputs(Path(model_dir) if Path(model_dir).exists() else model_dir, source, gold, tiny)


def _build_progress(console):
    if console is None:
        return None
    state = {"last": None}

    def report(stage: str, fraction: float):
        if stage != state["last"]:
            console.print(f"[dim]building the tiny preset: {stage}[/dim]")
            state["last"] = stage

    return report


def preflight(cfg: RunConfig, backend, inputs: Inputs):
    """Everything that can be wrong with the input, checked before a single weight loads or a file is written:
    the model folder (or hub id while offline), its chat template, every data row, the split sizes."""
    from selfie_lite.backends.hf import check_model_source

    check_model_source(inputs.model_dir)
    if Path(inputs.model_dir).exists():
        backend.load_tokenizer(inputs.model_dir)
    return load_split(cfg.data, cfg.rounds, cfg.random_seed, inputs.data_source)


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


FULL_HASH_BYTES = 64 * 2**20  # weight files up to this size are hashed whole
SAMPLE_BLOCKS, BLOCK_BYTES = 64, 64 * 2**10


def model_fingerprint(model_dir) -> str | None:
    """A content hash of a local model folder: config.json plus every *.safetensors file; None for a hub id.

    Small files (the tiny preset, test models) are hashed whole. A 7B model is ~15 GB: reading it all would add
    a minute to every resume, so for files over FULL_HASH_BYTES we hash the safetensors header (names, dtypes,
    shapes, offsets) and 64 blocks of 64 KiB spread evenly over the file (4 MB read per file). Two fine-tunes of
    one base differ in nearly every weight, so a sampled block tells them apart; sizes and mtimes would not do,
    since a plain `cp` changes mtimes and a fine-tune keeps the sizes."""
    import hashlib

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        if not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= FULL_HASH_BYTES:
                for block in iter(lambda: fh.read(2**20), b""):
                    h.update(block)
                continue
            header_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header_len, size - 8)))
            for k in range(SAMPLE_BLOCKS):
                fh.seek(k * (size - BLOCK_BYTES) // (SAMPLE_BLOCKS - 1))
                h.update(fh.read(BLOCK_BYTES))
    return "sha256:" + h.hexdigest()


def check_resume_sft(run_dir: Path, model_dir=None) -> None:
    """On --resume: the SFT model must be the one the run started from (data/split.json), or the resumed rounds
    would train and judge against another pi_init without a word. model_dir is the model this resume would use
    (None: not known yet, the tiny preset's); the same weights moved elsewhere (--force --model NEW) pass, since
    the content hash is compared, not the path."""
    p = Path(run_dir) / "data" / "split.json"
    info = read_json(p) if p.is_file() else {}
    recorded, want = info.get("sft_model"), info.get("sft_model_hash")
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


def train_stage(cfg: RunConfig, round_dir: Path, backend, base_dir: Path, pairs: list[dict], round_idx: int,
                progress=None) -> dict:
    """LoRA DPO from base_dir with the adapter-disabled base as reference (or, with robust.train_reference =
    "sft" in rounds >= 1, pi_init's precomputed log-probs from round-<i>/train_reference_logps.json); at the
    round's learning rate (robust.lr_decay); writes adapter/ and pairs.jsonl."""
    import dataclasses

    from selfie_lite.robust import read_reference_table, round_learning_rate
    from selfie_lite.train import train_dpo

    model, tok = backend.load(base_dir, trainable=True)
    model = backend.add_lora(model, cfg.lora, seed=cfg.random_seed + round_idx)
    # Room for what this round writes after training (its adapter, then the merged model), checked before the
    # training that a full disk would otherwise throw away.
    adapter, merged = adapter_bytes(model), merged_model_bytes(base_dir, getattr(backend, "device", "cpu"))
    check_free_space(round_dir, adapter + (merged or 0), f"train round {round_idx} and merge it",
                     f"adapter {format_bytes(adapter)} + merged model {format_bytes(merged or 0)}")
    seed_round = round_idx == 0
    task = progress.start("train (seed DPO)" if seed_round else "train (SPA DPO)", total=1, unit="steps") if progress else None

    def on_step(step, total, logs):
        if progress:
            progress.set_total(task, total)
            progress.advance(task, 1)
        maybe_kill("train", step)

    lr = round_learning_rate(cfg.train.learning_rate, cfg.robust.lr_decay, round_idx)
    train = cfg.train if lr == cfg.train.learning_rate else dataclasses.replace(cfg.train, learning_rate=lr)
    sft_ref = not seed_round and cfg.robust.train_reference == "sft"
    result = train_dpo(
        model, tok, [{k: p[k] for k in ("pair_id", "prompt", "chosen", "rejected", "gold") if k in p} for p in pairs],
        beta=cfg.beta, train=train,
        refine=None if seed_round else cfg.refine,
        lam=0.0 if seed_round else cfg.refine.lambdas[round_idx - 1],
        epochs=cfg.train.seed_epochs if seed_round else cfg.train.round_epochs,
        out_dir=round_dir / "trainer", seed=cfg.random_seed + round_idx, on_step=on_step,
        ref_logps=read_reference_table(round_dir) if sft_ref else None,
        report_to=getattr(getattr(progress, "tracker", None), "report_to", "none"),
    )
    tmp = fresh_tmp_dir(round_dir / "adapter")  # the adapter first: the training is lost until it is on disk
    backend.save_adapter(model, tmp)
    replace_dir(tmp, round_dir / "adapter")
    if progress:
        progress.finish(task)
    with contextlib.suppress(OSError):
        (round_dir / "trainer").rmdir()  # the Trainer's output_dir: empty, since nothing is saved through it
    backend.free(model)
    rows = [dict(p, **result.pair_stats.get(p["pair_id"], {})) for p in pairs]
    atomic_write_jsonl(round_dir / "pairs.jsonl", rows)
    return result.metrics


def _robust_pairs(cfg: RunConfig, run_dir: Path, rd: Path, backend, init_dir: Path, pairs: list[dict], i: int,
                  progress) -> list[dict]:
    """Round i's training set with the robust counter-measures that act before training: replayed seed pairs
    (robust.gold_replay, drawn the same on every resume) and, for robust.train_reference = "sft", the pi_init
    reference pass (a stage of its own, skipped once done). Both off: `pairs` unchanged, the paper."""
    from selfie_lite.robust import gold_replay, reference_stage

    if cfg.robust.gold_replay > 0:
        seed = read_jsonl(run_dir / "data" / "seed.jsonl")
        pairs = gold_replay(pairs, seed, cfg.robust.gold_replay, cfg.random_seed, i)
    if cfg.robust.train_reference == "sft" and not is_done(rd, "train") and not is_done(rd, "reference"):
        mark_done(rd, "reference", reference_stage(cfg, rd, backend, init_dir, pairs, progress))
    return pairs


def gold_agreement(pairs: list[dict], gold) -> dict:
    """How often the self-labels agree with the oracle: over all pairs (ties count half), and over the pairs the
    oracle does not tie (the judge's accuracy where there is something to get right); the tiny preset only."""
    agree = tie = 0
    for p in pairs:
        c, r = gold(p["prompt"], p["chosen"]), gold(p["prompt"], p["rejected"])
        agree += c > r
        tie += c == r
    n = max(1, len(pairs))
    return {"gold_agreement": (agree + 0.5 * tie) / n, "gold_ties": tie / n,
            "gold_agreement_untied": agree / (n - tie) if n > tie else None}


def run_rounds(cfg: RunConfig, run_dir: Path, backend, inputs: Inputs, console: Console, progress=None,
               split=None) -> dict:
    threads = resolve_threads(cfg.threads, inputs.model_dir, getattr(backend, "device", "cpu"))
    with torch_threads(threads) as n_threads:
        return _run_rounds(cfg, run_dir, backend, inputs, console, progress, split, n_threads)


def _run_rounds(cfg: RunConfig, run_dir: Path, backend, inputs: Inputs, console: Console, progress, split,
                n_threads: int) -> dict:
    t_start = time.perf_counter()
    split = prepare_data(cfg, run_dir, inputs, split)
    init_dir = Path(inputs.model_dir)
    prev = init_dir
    history = []
    stopped = None
    for i in range(cfg.rounds + 1):
        rd = run_dir / f"round-{i}"
        rd.mkdir(parents=True, exist_ok=True)
        if i == 0:
            pairs = read_jsonl(run_dir / "data" / "seed.jsonl")
        else:
            if not is_done(rd, "sample"):
                prompts = [r["prompt"] for r in read_jsonl(run_dir / "data" / f"pool-{i}.jsonl")]
                mark_done(rd, "sample", sample_round(cfg, rd, backend, prev, prompts, i, progress))
            if not is_done(rd, "judge"):
                ref = init_dir if cfg.judge.reference == "init" or i == 1 else run_dir / f"round-{i - 2}" / "model"
                pairs, m = judge_round(cfg, rd, backend, load_samples(rd), prev, ref, progress)
                if inputs.gold:
                    m.update(gold_agreement(pairs, inputs.gold))
                mark_done(rd, "judge", m)
            pairs = read_jsonl(rd / "judged.jsonl")
            if not pairs:
                from selfie_lite.errors import RunError

                raise RunError(
                    f"round {i}: every sampled pair was identical or empty, nothing to train on",
                    hint="raise sample.temperature or sample.num_samples, then --resume",
                )
        if i >= 2 and cfg.guard.select == "guard":
            if not is_done(rd, "guard"):
                mark_done(rd, "guard", guard_stage(cfg, rd, backend, load_samples(rd), pairs,
                                                   run_dir / "round-0" / "model", init_dir, progress))
            # The measured agreement is on disk, so a resume stops at the same place; the verdict uses the current
            # threshold, so `--resume --force --set guard.min_anchor_agreement=X` can let a stopped run go on.
            g = read_json(marker(rd, "guard"))
            g |= {"threshold": cfg.guard.min_anchor_agreement,
                  "stop": g["anchor_agreement"] < cfg.guard.min_anchor_agreement}
            if g["stop"]:
                stopped = stop_reason(i, g)
                console.print(f"[yellow]guard:[/yellow] {escape(stopped)}")
                break
        if i >= 1:
            pairs = _robust_pairs(cfg, run_dir, rd, backend, init_dir, pairs, i, progress)
        if not is_done(rd, "train"):
            mark_done(rd, "train", train_stage(cfg, rd, backend, prev, pairs, i, progress))
        if not is_done(rd, "merge"):
            mark_done(rd, "merge", merge_round(backend, prev, rd / "adapter", rd / "model"))
        metrics = stage_metrics(rd)
        atomic_write_json(rd / "metrics.json", metrics)
        history.append({"round": i, **metrics})
        console.print(round_table(i, metrics))
        if progress is not None and hasattr(progress, "round_done"):
            progress.round_done(i, metrics)  # --report-to
        prev = rd / "model"
    last = len(history) - 1
    final, why = last, "the last round (guard.select = last: the paper's loop)"
    if stopped:
        why = stopped
    elif cfg.guard.select == "guard":
        why = "the last round: every round's self-labels passed the guard"
    selection = None
    if cfg.guard.select not in ("last", "guard"):
        selection = select_by_judge(cfg, run_dir, backend, init_dir, last, progress)
        final = selection["round"]
        why = (f"round {final} scored best under {cfg.guard.select} on {selection['prompts']} held-out prompts ("
               + ", ".join(f"round {k}: {v:.3f}" for k, v in selection["scores"].items()) + ")")
    console.print(f"final model: round {final}, {escape(why)}")
    summary = {
        "final_model": str((run_dir / f"round-{final}" / "model").resolve()),
        "final_round": final,
        "final_why": why,
        "selection": selection,
        "rounds": cfg.rounds,
        "config_rev": config_rev(run_dir),  # each stage's own revision is in per_round (see config-history.jsonl)
        "data": split,
        "seconds_this_session": round(time.perf_counter() - t_start, 1),
        "torch_threads": n_threads,
        "per_round": history,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def round_table(i: int, m: dict) -> Table:
    t = Table(title=f"round {i}" + (" (seed DPO)" if i == 0 else ""), title_justify="left", show_header=True)
    for col in ("stage", "items", "seconds", "throughput", "details"):
        t.add_column(col)
    s, j, tr, mg = m.get("sample", {}), m.get("judge", {}), m.get("train", {}), m.get("merge", {})
    if s:
        t.add_row("sample", f"{s['prompts']} prompts", _fmt(s.get("seconds"), ".1f"), f"{_fmt(s.get('tokens_per_s'), '.0f')} tok/s",
                  f"mean length {s['mean_response_tokens']:.1f} tokens")
    if j:
        extra = f", gold agreement {j['gold_agreement']:.2f}" if "gold_agreement" in j else ""
        t.add_row("judge", f"{j['pairs']} pairs", _fmt(j.get("seconds"), ".1f"), f"{_fmt(j.get('sequences_per_s'), '.0f')} seq/s",
                  f"dropped {j['dropped_identical']} identical or tied{extra}")
    g = m.get("guard", {})
    if g:
        t.add_row("guard", f"{j.get('pairs', '-')} pairs", _fmt(g.get("seconds"), ".1f"), "",
                  f"anchor agreement {g['anchor_agreement']:.2f} (stop below {g['threshold']:.2f})")
    if tr:
        t.add_row("train", f"{tr.get('pairs', '-')} pairs", _fmt(tr.get("seconds"), ".1f"), f"{_fmt(tr.get('pairs_per_s'), '.1f')} pairs/s",
                  f"loss {_fmt(tr.get('loss_start'))} -> {_fmt(tr.get('loss_end'))}, margin {_fmt(tr.get('mean_margin'))}, "
                  f"smoothed {_fmt(tr.get('frac_smoothed'), '.2f')}")
    if mg:
        t.add_row("merge", "1 model", _fmt(mg.get("seconds"), ".1f"), "", f"{mg['model_bytes'] / 1e6:.1f} MB")
    return t
