"""Build the tiny preset offline: gold preference set, held-out prompts, a BPE tokenizer and a small SFT model.

Why: machines with no GPU and no hub still need a real chat model and a labelled preference set, and the
oracle in task.py lets alignment quality be measured exactly. Everything is generated from fixed seeds,
so two builds on one machine give the same data (same data_hash) and the same weights.

The SFT data is a deliberately noisy mix of response styles (some wrong, some rambling, some unformatted),
so the SFT model's samples spread in oracle quality and DPO has room to move it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from selfie_lite.cachedir import build_once, cache_home, is_built
from selfie_lite.errors import RunError
from selfie_lite.rundir import atomic_write_jsonl, read_jsonl
from selfie_lite.tiny import task
from selfie_lite.tiny.sft import MODEL_CONFIG, one_quiet_thread, sample_responses, train_sft

PRESET_NAME = "tiny-v2"
DATA_SEED = 0
N_PREFERENCES = 6000
N_EVAL = 300
N_VAL = 300
N_SFT = 12000

# The world (bench v2, docs/results.md "The bench"): answers are written by six "responders", one per style, each
# with its own care: the canonical writer is almost always right, the rambler often wrong. As in UltraFeedback,
# where stronger models write both better content and better form, quality is a property of WHO answers, and the
# SFT model learns that mixture. Aligning it means moving its mass to the careful responder: a direction the seed
# DPO can find from a few hundred pairs, and that its implicit reward can then spread (the paper's premise).
# v1 drew correctness independently of style (p = 0.8 for every style): the judge then learned form only.
RESPONDERS = {"canonical": 0.95, "filler": 0.85, "trailing": 0.75, "loose": 0.55, "bare": 0.55, "ramble": 0.45}
# The SFT mix: how often each responder wrote an SFT answer. Tuned (validation prompts) so that about half of the
# SFT model's samples at temperature 0.7 are "good" (correct and formatted), see sft_report.
SFT_STYLE_WEIGHTS = {"canonical": 0.30, "filler": 0.14, "trailing": 0.14, "loose": 0.14, "bare": 0.14, "ramble": 0.14}
# Gold pairs are binarized like UltraFeedback's: PREF_CANDIDATES answers from responders drawn uniformly,
# chosen = the best by the oracle, rejected = a random one scored strictly lower.
PREF_CANDIDATES = 4

SPECIAL_TOKENS = {
    "pad": "<pad>",
    "bos": "<s>",
    "eos": "</s>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}
VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
# Two thin layers and many small steps beat a deeper or wider model per CPU-second here (0.49M params, about
# 80 s of one core). Three epochs were not enough: frac_good then swung 0.35-0.50 with the data seed.


@dataclass(frozen=True)
class TinyPreset:
    root: Path
    model_dir: Path
    preferences: Path
    eval_prompts: Path
    val_prompts: Path
    manifest: dict


def default_cache_dir() -> Path:
    """Where build_tiny puts the preset by default: $SELFIE_LITE_CACHE/tiny-v2, else the XDG cache folder
    ($XDG_CACHE_HOME or ~/.cache)/selfie-lite/tiny-v2."""
    return cache_home() / PRESET_NAME


def _preset_at(root: Path) -> TinyPreset:
    manifest = json.loads((root / "manifest.json").read_text())
    return TinyPreset(
        root=root,
        model_dir=root / "sft-model",
        preferences=root / "preferences.jsonl",
        eval_prompts=root / "eval_prompts.jsonl",
        val_prompts=root / "val_prompts.jsonl",
        manifest=manifest,
    )


# ---------------------------------------------------------------------------------------------
# Data


def generate_data(seed: int = DATA_SEED) -> dict[str, list[dict]]:
    """Eval, val, preference and SFT rows; eval and val prompts appear nowhere else."""
    # One random stream per part, so that changing how one part is drawn leaves the others as they were.
    held_rng, pref_rng, sft_rng = (random.Random(f"{seed}/{part}") for part in ("held-out", "preferences", "sft"))
    held_out: list[str] = []
    while len(held_out) < N_EVAL + N_VAL:
        p = task.make_prompt(held_rng)
        if p not in held_out:
            held_out.append(p)
    held_set = set(held_out)

    def train_prompt(rng: random.Random) -> str:  # any prompt but the held-out ones (repeats allowed)
        while (p := task.make_prompt(rng)) in held_set:
            pass
        return p

    preferences = [_gold_pair(train_prompt(pref_rng), pref_rng) for _ in range(N_PREFERENCES)]
    sft = []
    for _ in range(N_SFT):
        prompt = train_prompt(sft_rng)
        sft.append({"prompt": prompt, "response": task.random_response(prompt, sft_rng, SFT_STYLE_WEIGHTS, RESPONDERS)})
    return {
        "preferences": preferences,
        "eval_prompts": [{"prompt": p} for p in held_out[:N_EVAL]],
        "val_prompts": [{"prompt": p} for p in held_out[N_EVAL:]],
        "sft": sft,
    }


def _gold_pair(prompt: str, rng: random.Random) -> dict:
    while True:
        candidates = [task.random_response(prompt, rng, p_correct=RESPONDERS) for _ in range(PREF_CANDIDATES)]
        scored = [(r, task.score(prompt, r)) for r in candidates]
        best = max(sc for _, sc in scored)
        worse = [(r, sc) for r, sc in scored if sc < best]
        if worse:  # else every candidate ties: draw again
            break
    chosen, score_chosen = next((r, sc) for r, sc in scored if sc == best)
    rejected, score_rejected = rng.choice(worse)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


def data_hash(data: dict) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_corpus(data: dict) -> list[str]:
    """Training texts, plus the task words repeated so that each becomes one token (list tasks then
    work on whole tokens, which a tiny model learns far faster than letter runs)."""
    texts = [r["prompt"] for r in data["sft"]] + [r["response"] for r in data["sft"]]
    for r in data["preferences"]:
        texts += [r["prompt"], r["chosen"], r["rejected"]]
    # Upper-case words too (v2): spelt letter by letter, "Write fish in capital letters." was out of the model's reach.
    return texts + [" " + " ".join(task.WORDS)] * 500 + [" " + " ".join(w.upper() for w in task.WORDS)] * 500


def train_tokenizer(texts: list[str]):
    """Byte-level BPE wrapped as a PreTrainedTokenizerFast with our chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        extra_special_tokens=[SPECIAL_TOKENS[k] for k in ("system", "user", "assistant")],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # generation pads on the left; the SFT loop pads by itself
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )


# ---------------------------------------------------------------------------------------------
# Build


def build_tiny(
    cache_dir: Path | None = None, force: bool = False, progress: Callable[[str, float], None] | None = None
) -> TinyPreset:
    """Build the preset into cache_dir (default: default_cache_dir()), or return it at once if built.

    The build runs in a temp folder beside the target and is renamed into place, so an interrupted build
    never leaves a half-built preset; a second process waits for the first builder (cachedir.build_once).
    progress(stage, fraction) reports the fraction of the whole build.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not force and is_built(root):
        return _preset_at(root)
    report = progress or (lambda stage, frac: None)
    try:
        build_once(root, lambda tmp: _build_into(tmp, report), force=force,
                   on_wait=lambda: report("waiting for another process's build", 0.0))
    except OSError as e:
        raise RunError(
            f"could not build the tiny preset in {root}: {e}",
            hint="free some disk space (it needs ~5 MB), or point SELFIE_LITE_CACHE at a writable folder",
        ) from e
    return _preset_at(root)


def _build_into(out: Path, progress: Callable[[str, float], None]) -> None:
    import tokenizers
    import torch
    import transformers
    from transformers import GenerationConfig

    import selfie_lite

    t0 = time.perf_counter()
    progress("data", 0.0)
    data = generate_data(DATA_SEED)
    for name in ("preferences", "eval_prompts", "val_prompts", "sft"):
        atomic_write_jsonl(out / f"{name}.jsonl", data[name])
    t_data = time.perf_counter()

    progress("tokenizer", 0.03)
    tokenizer = train_tokenizer(tokenizer_corpus(data))
    t_tok = time.perf_counter()

    progress("sft", 0.05)
    with one_quiet_thread():
        model, sft_info = train_sft(tokenizer, data["sft"], progress=lambda f: progress("sft", 0.05 + 0.92 * f))
        t_sft = time.perf_counter()

        progress("save", 0.98)
        model_dir = out / "sft-model"
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(model_dir)  # transformers 5 always writes model.safetensors
        tokenizer.save_pretrained(model_dir)

    files = {}
    for name in ("preferences", "eval_prompts", "val_prompts", "sft"):
        path = out / f"{name}.jsonl"
        files[path.name] = {"rows": len(data[name]), "bytes": path.stat().st_size, "sha256": _file_sha256(path)}
    weights = model_dir / "model.safetensors"
    manifest = {
        "name": PRESET_NAME,
        "data_seed": DATA_SEED,
        "data_sha256": data_hash(data),
        "files": files,
        "model": {
            "params": sum(p.numel() for p in model.parameters()),
            "bytes": weights.stat().st_size,
            "sha256": _file_sha256(weights),
            "vocab_size": len(tokenizer),
            "config": MODEL_CONFIG,
        },
        "sft": sft_info,
        "sft_mix": {"style_weights": SFT_STYLE_WEIGHTS, "p_correct_by_style": RESPONDERS},
        "oracle": {"weights": {"correct": 0.60, "formatted": 0.25, "concise": 0.15}, "good_score": task.GOOD_SCORE},
        "build_seconds": {
            "data": round(t_data - t0, 2),
            "tokenizer": round(t_tok - t_data, 2),
            "sft": round(t_sft - t_tok, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
        "versions": {
            "selfie_lite": selfie_lite.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks the build done
    progress("done", 1.0)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Report


def sft_report(preset: TinyPreset, n_prompts: int = 200, seed: int = 0) -> dict:
    """Oracle quality of the SFT model's samples (temperature 0.7) on the first n eval prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [row["prompt"] for row in read_jsonl(preset.eval_prompts)[:n_prompts]]
    with one_quiet_thread():
        tokenizer = AutoTokenizer.from_pretrained(preset.model_dir)
        model = AutoModelForCausalLM.from_pretrained(preset.model_dir, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        samples = sample_responses(model, tokenizer, prompts, temperature=0.7, seed=seed)
        seconds = time.perf_counter() - t0
    details = [task.score_details(p, s["text"]) for p, s in zip(prompts, samples, strict=True)]
    n = len(details)
    by_kind: dict[str, list[bool]] = {}
    for p, d in zip(prompts, details, strict=True):
        by_kind.setdefault(task.parse_prompt(p).kind, []).append(d["score"] >= task.GOOD_SCORE)
    return {
        "n_prompts": n,
        "mean_score": sum(d["score"] for d in details) / n,
        "frac_good": sum(d["score"] >= task.GOOD_SCORE for d in details) / n,
        "frac_correct": sum(d["correct"] for d in details) / n,
        "frac_formatted": sum(d["formatted"] for d in details) / n,
        "frac_concise": sum(d["concise"] for d in details) / n,
        "mean_length_tokens": sum(s["n_tokens"] for s in samples) / n,
        "frac_finished": sum(s["finished"] for s in samples) / n,
        "tokens_per_s": sum(s["n_tokens"] + s["finished"] for s in samples) / seconds,
        "frac_good_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())},
    }
