"""Build the smol preset's gold preference set and held-out prompts from an SFT model (SmolLM2-135M-Instruct).

The model answers one prompt per (request, topic) "base" (sampled with the project's backend, temperature 0.7, short
answers); every gold prompt of that base (the same request with other instructions) then gets candidate answers from
several writers (writers.py: the model's own answer, and editors that follow all, some or none of the instructions,
or run out of room), as UltraFeedback has several models answer each prompt. The checker (our "human") labels them:
of PREF_CANDIDATES writers drawn at random, chosen = the best, rejected = one scored strictly lower; a draw where all
tie is drawn again from every writer, and dropped if they still tie.

Built once per model, builder version and sizes into the cache (atomically, one builder at a time:
cachedir.build_once), deterministic from DATA_SEED on a given machine (sampling runs on SAMPLE_THREADS threads, so the core
count does not change the text; another CPU family may still round differently).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from selfie_lite.errors import RunError
from selfie_lite.rundir import atomic_write_jsonl
from selfie_lite.smol import checker, task, writers

BUILDER_VERSION = "smol-v1"  # part of the cache key: bump it whenever task.py, writers.py or this file change the data
SOURCE = "builtin:smol"  # data.source that names this preset's gold set
DATA_SEED = 0
PREF_CANDIDATES = 3
# Writers drawn for a gold pair, by weight: the model's own answer and the careful editor most often.
WRITER_WEIGHTS = {"policy": 1.0, "careful": 1.0, "partial": 0.8, "careless": 0.8, "truncated": 0.6}
SAMPLE_THREADS = 2  # fixed, so that the samples do not depend on the core count (2 is also the fastest here)


@dataclass(frozen=True)
class BuildSizes:
    """How much the build makes. The defaults fit the 20-minute budget of `selfie-lite run --preset smol` on 2 cores:
    192 answers of at most 64 tokens take about 1.5 minutes to sample there (about 100 tokens/s, batched)."""

    n_bases: int = 192  # (request, topic) pairs the model answers once each
    per_base: int = 5  # gold prompts per base: 960 pairs before ties are dropped
    n_eval: int = 200  # held-out prompts for `selfie-lite eval`
    n_val: int = 200  # held-out prompts for tuning (never the eval prompts)
    max_new_tokens: int = 64
    temperature: float = 0.7  # the preset's sample.temperature (the paper's)
    batch_size: int = 48  # prompts per generate() call: the fastest measured on 2 cores
    seed: int = DATA_SEED


@dataclass(frozen=True)
class SmolPreset:
    root: Path
    model_dir: Path  # the SFT model the gold set was built from
    preferences: Path  # the gold preference set (.jsonl: prompt, chosen, rejected, score_chosen, score_rejected)
    eval_prompts: Path
    val_prompts: Path
    manifest: dict = field(compare=False)

    @property
    def score(self) -> Callable[[str, str], float]:
        """The oracle: share of a prompt's instructions met, in [0, 1] (checker.score)."""
        return checker.score


def default_cache_dir() -> Path:
    """$SELFIE_LITE_CACHE/smol, else ($XDG_CACHE_HOME or ~/.cache)/selfie-lite/smol; one build per model inside."""
    from selfie_lite.cachedir import cache_home

    return cache_home() / "smol"


def build_key(model_dir: Path, sizes: BuildSizes) -> str:
    """The model's content hash, the builder version and the sizes: a new model or builder gets its own build."""
    from selfie_lite.fingerprint import model_fingerprint

    blob = json.dumps({"model": model_fingerprint(model_dir) or str(model_dir), "builder": BUILDER_VERSION,
                       "sizes": asdict(sizes)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _preset_at(root: Path) -> SmolPreset:
    manifest = json.loads((root / "manifest.json").read_text())
    return SmolPreset(root=root, model_dir=Path(manifest["model_dir"]), preferences=root / "preferences.jsonl",
                      eval_prompts=root / "eval_prompts.jsonl", val_prompts=root / "val_prompts.jsonl",
                      manifest=manifest)


# ---------------------------------------------------------------------------------------------
# Prompts (pure Python: no model)


def generate_prompts(sizes: BuildSizes = BuildSizes()) -> dict:
    """{"bases": [[request, topic]], "gold": [[prompt text] per base], "eval": [...], "val": [...]}. The first gold
    prompt of a base is the one the model answers. Eval and val prompts appear nowhere else."""
    base_rng, held_rng, gold_rng = (random.Random(f"{sizes.seed}/{part}") for part in ("bases", "held-out", "gold"))
    bases = [(r, t) for r in task.REQUESTS for t in task.TOPICS]
    base_rng.shuffle(bases)
    if sizes.n_bases > len(bases):
        raise ValueError(f"n_bases {sizes.n_bases} > {len(bases)} (request, topic) pairs")
    bases = bases[: sizes.n_bases]
    held: list[str] = []
    seen: set[str] = set()
    while len(held) < sizes.n_eval + sizes.n_val:
        p = task.make_prompt(held_rng).text()
        if p not in seen:
            held.append(p)
            seen.add(p)
    gold = []
    for request, topic in bases:
        group: list[str] = []
        for _ in range(1000):
            if len(group) == sizes.per_base:
                break
            p = task.make_prompt(gold_rng, request=request, topic=topic).text()
            if p not in seen:
                group.append(p)
                seen.add(p)
        gold.append(group)
    return {"bases": [list(b) for b in bases], "gold": gold, "eval": held[: sizes.n_eval], "val": held[sizes.n_eval :]}


def gold_pair(prompt: str, source: str, rng: random.Random) -> dict | None:
    """One labelled pair for `prompt` from writers editing `source`; None when every writer's answer scores the
    same (nothing to prefer)."""
    p = task.parse_prompt(prompt)
    names = list(WRITER_WEIGHTS)
    drawn: list[str] = []
    while len(drawn) < PREF_CANDIDATES:  # without replacement, by weight
        left = [w for w in names if w not in drawn]
        drawn.append(rng.choices(left, weights=[WRITER_WEIGHTS[w] for w in left])[0])
    for writers_now in (drawn, names):
        cands = []
        for w in writers_now:
            text = writers.write(w, p, source, random.Random(f"{prompt}/{w}/{rng.random()}"))
            if text.strip() and all(text.strip() != c[1].strip() for c in cands):
                cands.append((w, text, checker.score(prompt, text)))
        best = max((c[2] for c in cands), default=None)
        worse = [c for c in cands if c[2] < best] if cands else []
        if worse:
            chosen = next(c for c in cands if c[2] == best)
            rejected = rng.choice(worse)
            return {"prompt": prompt, "chosen": chosen[1], "rejected": rejected[1], "score_chosen": chosen[2],
                    "score_rejected": rejected[2], "writer_chosen": chosen[0], "writer_rejected": rejected[0]}
    return None


def gold_pairs(prompts: dict, samples: list[str], seed: int = DATA_SEED) -> tuple[list[dict], int]:
    """The labelled pairs, shuffled, and the number of prompts dropped for ties. samples[i] is the model's answer
    for base i (to its first gold prompt)."""
    rng = random.Random(f"{seed}/pairs")
    rows, ties = [], 0
    for group, source in zip(prompts["gold"], samples, strict=True):
        for prompt in group:
            row = gold_pair(prompt, source, rng)
            if row is None:
                ties += 1
            else:
                rows.append(row)
    rng.shuffle(rows)
    return rows, ties


def label_stats(rows: list[dict], ties: int) -> dict:
    """How the gold labels split: the share of instructions met by chosen and by rejected answers, who wrote them."""
    n = len(rows)
    strict = [checker.score_details(r["prompt"], r["chosen"])["strict"] for r in rows]
    return {
        "pairs": n,
        "dropped_ties": ties,
        "mean_score_chosen": sum(r["score_chosen"] for r in rows) / n if n else None,
        "mean_score_rejected": sum(r["score_rejected"] for r in rows) / n if n else None,
        "strict_chosen": sum(strict) / n if n else None,
        "writer_chosen": dict(Counter(r["writer_chosen"] for r in rows).most_common()),
        "writer_rejected": dict(Counter(r["writer_rejected"] for r in rows).most_common()),
    }


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_sources(model_dir: Path, prompts: list[str], sizes: BuildSizes,
                   progress: Callable[[float], None] | None = None) -> tuple[list[str], dict]:
    """The model's answer to each prompt (the project's HF backend: pure temperature sampling, seeded), and the
    sampling figures."""
    from selfie_lite.backends.hf import HFBackend
    from selfie_lite.config import from_dict
    from selfie_lite.numerics import torch_threads

    threads = max(1, min(SAMPLE_THREADS, os.cpu_count() or 1))
    backend = HFBackend(from_dict({}))
    with torch_threads(threads):
        model, tok = backend.load(model_dir)
        done = {"prompts": 0, "tokens": 0}

        def on_batch(n: int, n_tokens: int) -> None:
            done["prompts"] += n
            done["tokens"] += n_tokens
            if progress:
                progress(done["prompts"] / len(prompts))

        t0 = time.perf_counter()
        rows = backend.generate(model, tok, prompts, num_samples=1, temperature=sizes.temperature, top_p=1.0,
                                max_new_tokens=sizes.max_new_tokens, batch_size=sizes.batch_size, seed=sizes.seed,
                                on_batch=on_batch)
        seconds = time.perf_counter() - t0
        eos = model.generation_config.eos_token_id
        eos = set(eos) if isinstance(eos, list) else {eos, tok.eos_token_id} - {None}
        backend.free(model)
    texts = [r["responses"][0] for r in rows]
    finished = sum(bool(r["response_ids"][0]) and r["response_ids"][0][-1] in eos for r in rows)
    return texts, {"prompts": len(prompts), "tokens": done["tokens"], "seconds": round(seconds, 2),
                   "tokens_per_s": round(done["tokens"] / seconds, 1) if seconds else None,
                   "frac_finished": finished / len(rows) if rows else None, "threads": threads}


# ---------------------------------------------------------------------------------------------
# Build


def build_smol(model_dir, progress: Callable[[str, float], None] | None = None, *, cache_dir: Path | None = None,
               sizes: BuildSizes = BuildSizes(), force: bool = False) -> SmolPreset:
    """The smol preset built from the SFT model in model_dir, into cache_dir (default: default_cache_dir()) under a
    key of the model's hash, the builder version and the sizes; returned at once if already built.

    progress(stage, fraction) reports the fraction of the whole build. As build_tiny: the build runs in a temp
    folder renamed into place, one process at a time per cache folder (cachedir.build_once)."""
    from selfie_lite.cachedir import build_once, is_built

    model_dir = Path(model_dir)
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"{BUILDER_VERSION}-{build_key(model_dir, sizes)}"
    if not force and is_built(root):
        return _preset_at(root)
    report = progress or (lambda stage, frac: None)
    try:
        build_once(root, lambda tmp: _build_into(tmp, model_dir, sizes, report), force=force,
                   on_wait=lambda: report("waiting for another process's build", 0.0))
    except OSError as e:
        raise RunError(f"could not build the smol preset in {root}: {e}",
                       hint="free some disk space (it needs ~2 MB), or point SELFIE_LITE_CACHE at a writable folder") from e
    return _preset_at(root)


def _build_into(out: Path, model_dir: Path, sizes: BuildSizes, progress: Callable[[str, float], None]) -> None:
    import torch
    import transformers

    import selfie_lite
    from selfie_lite.fingerprint import model_fingerprint
    from selfie_lite.tiny.build import _file_sha256

    t0 = time.perf_counter()
    progress("prompts", 0.0)
    prompts = generate_prompts(sizes)
    sampled = [group[0] for group in prompts["gold"]]
    progress("sampling the model's answers", 0.02)
    samples, sampling = sample_sources(model_dir, sampled, sizes,
                                       progress=lambda f: progress("sampling the model's answers", 0.02 + 0.93 * f))
    t_sample = time.perf_counter()
    progress("labelling pairs", 0.96)
    rows, ties = gold_pairs(prompts, samples, sizes.seed)
    files = {
        "preferences": rows,
        "eval_prompts": [{"prompt": p} for p in prompts["eval"]],
        "val_prompts": [{"prompt": p} for p in prompts["val"]],
        "sft_samples": [{"prompt": p, "response": r} for p, r in zip(sampled, samples, strict=True)],
    }
    for name, data in files.items():
        atomic_write_jsonl(out / f"{name}.jsonl", data)
    manifest = {
        "name": BUILDER_VERSION,
        "model_dir": str(model_dir.resolve()) if model_dir.exists() else str(model_dir),
        "model_hash": model_fingerprint(model_dir),
        "sizes": asdict(sizes),
        "files": {f"{name}.jsonl": {"rows": len(data), "sha256": _file_sha256(out / f"{name}.jsonl")}
                  for name, data in files.items()},
        "labels": label_stats(rows, ties),
        "sft_samples": checker.summarize(sampled, samples),  # the model's own answers, by the checker
        "sampling": sampling,
        "oracle": "share of the prompt's instructions met (selfie_lite.smol.checker.score)",
        "build_seconds": {"sample": round(t_sample - t0, 2), "total": round(time.perf_counter() - t0, 2)},
        "versions": {"selfie_lite": selfie_lite.__version__, "python": platform.python_version(),
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks the build done
    progress("done", 1.0)
