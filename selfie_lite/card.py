"""The model card: a README.md with the Hugging Face Hub's YAML front matter, written into the model folder a run
ships (round-<final>/model/) when the run ends, and updated by `selfie-lite eval` with its figures.

Reads: RUN/config.json (or the loop's settings), RUN/summary.json (which round ships and why, the per-round
metrics), RUN/eval.json when there is one. Writes: round-<final>/model/README.md, only when its content changed.

The front matter is huggingface_hub's ModelCardData (base_model, library_name, license, datasets, tags,
pipeline_tag): the library that the Hub's own tools use renders it, so the Hub reads what it expects. base_model and
datasets are set only when they are Hub ids (the Hub checks base_model against its models); the license is
carried over from the base model when known: the built-in SmolLM2 (Apache-2.0), or the `license` of the base model's
own card in its folder or in the Hugging Face cache (no download).

Resume: the merge stage's outputs and digest (loop.STAGE_OUTPUTS["merge"]: config.json, tokenizer_config.json,
*.safetensors under model/) do not include README.md, so a card never makes a finished stage look changed or damaged;
a merge that is redone replaces the folder, and the run's end writes the card again. The card holds no timings, so a
resumed run that changes nothing leaves the file as it was.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

MARK = "<!-- selfie-lite model card: written by `selfie-lite run`, updated by `selfie-lite eval` -->"
TAGS = ["selfie-lite", "dpo", "spa", "trl", "lora"]

# Base models known without a Hub lookup: builtin:NAME (gguf.BUILTIN_MODELS) -> its Hub id and license.
BUILTIN = {"builtin:smollm2": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
                               "name": "SmolLM2-135M-Instruct"}}


# ---------------------------------------------------------------------------------------------
# Where the base model and data came from


def hub_id_of(model: str) -> str | None:
    """The Hub id a model string names: a hub id itself, a built-in model's, or a Hugging Face cache snapshot's
    (.../models--ORG--NAME/snapshots/<commit>). None for a local folder of unknown origin (the tiny preset's)."""
    from selfie_lite.hub import looks_like_hub_id

    if not model:
        return None
    if model in BUILTIN:
        return BUILTIN[model]["base_model"]
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", str(model))
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    return model if looks_like_hub_id(model) else None


def base_license(model: str) -> str | None:
    """The base model's license when it is known offline: a built-in model's, or the license in the front matter of
    the README.md beside its weights (a local folder or the Hub cache's snapshot)."""
    if model in BUILTIN:
        return BUILTIN[model]["license"]
    readme = None
    if model and Path(model).expanduser().is_dir():
        readme = Path(model).expanduser() / "README.md"
    elif hub_id_of(model):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(hub_id_of(model), "README.md")
            readme = Path(found) if isinstance(found, str) else None
        except Exception:  # an odd id, a broken cache: no license rather than no card
            readme = None
    if readme is None or not readme.is_file():
        return None
    data = front_matter(readme.read_text(encoding="utf-8", errors="replace"))
    lic = data.get("license") if isinstance(data, dict) else None
    return lic if isinstance(lic, str) else None


def front_matter(text: str) -> dict:
    """The YAML front matter of a README ({} when there is none or it does not parse)."""
    import yaml

    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def dataset_id_of(source: str) -> str | None:
    from selfie_lite.hub import looks_like_hub_id

    return source if source and looks_like_hub_id(source) else None


# ---------------------------------------------------------------------------------------------
# The command that makes the run again


def reproduce_command(cfg: dict) -> str:
    """`selfie-lite run ...` with the settings of config.json: the preset whose settings it is closest to (or none),
    then what differs from it as named flags (--model, --data, --seed, --rounds, --random-seed, --beta) and --set."""
    from selfie_lite.config import EXAMPLES_DIR, PACKAGED_PRESETS, RunConfig, load_config, to_dict

    cfg = dict(cfg)
    flat = _flat(cfg)
    presets = sorted({p.stem for d in (PACKAGED_PRESETS, EXAMPLES_DIR) if d.is_dir() for p in d.glob("*.toml")})
    best = None
    for preset in [None, *presets]:
        try:
            base = _flat(to_dict(load_config(preset) if preset else RunConfig()))  # None: the plain defaults
        except Exception:  # a preset that does not load here: not a candidate
            continue
        if (preset is not None and base.get("model") != flat.get("model")) or (preset is None and not flat.get("model")):
            continue  # a preset of another model is no start; no model and no preset is the tiny preset: say so
        diff = {k: v for k, v in flat.items() if base.get(k) != v}
        if best is None or len(diff) < len(best[1]):
            best = (preset, diff)
    preset, diff = best if best is not None else (None, flat)
    if flat.get("method") == "paper":  # method = paper sets these itself (config.PAPER); saying them again is refused
        from selfie_lite.config import PAPER

        for section, values in PAPER.items():
            for key in values:
                diff.pop(f"{section}.{key}", None)
    named = {"model": "--model", "data.source": "--data", "data.labelled_share": "--seed", "rounds": "--rounds",
             "random_seed": "--random-seed", "beta": "--beta"}
    words = ["selfie-lite", "run"] + (["--preset", preset] if preset else [])
    for key, flag in named.items():
        if key in diff:
            words += [flag, str(diff.pop(key))]
    for key, value in diff.items():
        words += ["--set", f"{key}={_toml(value)}"]
    return " ".join(shlex.quote(w) for w in words)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _toml(value) -> str:
    """value as --set writes it (config.parse_override: TOML, else the raw text as a string)."""
    import json
    import tomllib

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        try:
            tomllib.loads(f"v = {value}")
        except tomllib.TOMLDecodeError:
            if value and "=" not in value:
                return value  # read back as the same string: method=paper, not method="paper"
    return json.dumps(value)  # numbers, strings and lists of them read the same in TOML


# ---------------------------------------------------------------------------------------------
# The card


def _f(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def card_text(cfg: dict, summary: dict, eval_result: dict | None = None, extra_tags: list[str] | None = None,
              gguf_files: list[str] | None = None) -> str:
    """The README.md of the shipped model: front matter, what was run, which round ships and why, the per-round
    table, the eval figures when given, and the command that makes the run again."""
    from huggingface_hub import ModelCard, ModelCardData

    from selfie_lite import __version__

    model = str(cfg.get("model") or "")
    source = str(cfg.get("data", {}).get("source") or "")
    base_id = hub_id_of(model)
    dataset = dataset_id_of(source)
    data = ModelCardData(
        base_model=base_id, library_name="transformers", license=base_license(model),
        datasets=[dataset] if dataset else None, pipeline_tag="text-generation",
        tags=TAGS + [t for t in (extra_tags or []) if t not in TAGS])
    final = summary.get("final_round")
    base_name = BUILTIN.get(model, {}).get("name") or base_id or (Path(model).name if model else
                                                                  "the tiny preset's SFT model")
    split = summary.get("data") or {}
    method = cfg.get("method", "selfie")
    share = cfg.get("data", {}).get("labelled_share")
    title = base_name if model else "The tiny preset's SFT model"  # a model's own name keeps its case
    asked = cfg.get("rounds")
    lines = [
        MARK, "",
        f"# {title}, aligned with SPA (selfie-lite)", "",
        f"{title} after Spread Preference Annotation (SPA, arXiv 2406.04412) with selfie-lite {__version__}: "
        "DPO on a small labelled share of a preference set (round 0), then rounds in which the model samples "
        "answers, labels them with its own implicit reward and trains on them (LoRA DPO, merged into the weights "
        "after every round). This folder is the model of round "
        f"{final}, the one the run ships.", "",
        "## What was run", "",
        "| | |", "|---|---|",
        f"| SFT model | `{model or 'the tiny preset (built by selfie-lite)'}` |",
        f"| preference data | `{source or 'the tiny preset'}`" + (f" ({split['valid_rows']:,} valid rows)"
                                                                   if "valid_rows" in split else "") + " |",
        f"| method | {method} ("
        + ("the paper's loop exactly" if method == "paper" else "SPA with selfie-lite's counter-measures against "
           "late-round drift: docs/method.md") + ") |",
        f"| labelled share | {share}" + (f" ({split['seed_pairs']:,} human-labelled seed pairs)"
                                         if "seed_pairs" in split else "") + " |",
        f"| rounds | {asked} self-labelling round{'' if asked == 1 else 's'} asked for; rounds 0-{_last_round(summary)} "
        "finished"
        + (f", prompts per round {', '.join(str(n) for n in split['pools'])}" if split.get("pools") else "") + " |",
        f"| ships | round {final}: {_cell(summary.get('final_why', ''))} |",
        f"| beta (DPO) | {cfg.get('beta')} |",
        f"| learning rate | {cfg.get('train', {}).get('learning_rate')} |",
        f"| LoRA | r {cfg.get('lora', {}).get('r')}, alpha {cfg.get('lora', {}).get('alpha')} |",
        f"| random seed | {cfg.get('random_seed')} |",
        "",
        "## Per round", "",
        "gold: self-labels that agree with the gold labels (where the run has them); anchor: self-labels that agree "
        "with the seed-DPO judge (the round guard's signal); p(chosen): the judge's mean confidence; smoothed: share of "
        "pairs smoothed; loss: first -> last step; margin: mean DPO margin; len: mean tokens of the round's samples.", "",
        "| round | pairs | gold | anchor | p(chosen) | smoothed | loss | margin | len |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.get("per_round", []):
        i = r.get("round")
        judged, trained, sampled = r.get("judge", {}), r.get("train", {}), r.get("sample", {})
        label = f"{i} (seed DPO)" if i == 0 else str(i)
        if i == final:
            label = f"**{label}, ships**"
        lines.append("| " + " | ".join([
            label, str(trained.get("pairs", judged.get("pairs", "-"))), _f(judged.get("gold_agreement")),
            _f(r.get("guard", {}).get("anchor_agreement")), _f(judged.get("mean_p_chosen")),
            _f(trained.get("frac_smoothed"), ".2f") if i else "-",
            f"{_f(trained.get('loss_start'))} -> {_f(trained.get('loss_end'))}" if trained else "-",
            _f(trained.get("mean_margin")), _f(sampled.get("mean_response_tokens"), ".1f")]) + " |")
    lines.append("")
    if eval_result:
        lines += eval_section(eval_result, final)
    else:
        lines += ["## Evaluation", "", "Not evaluated yet: `selfie-lite eval RUN` adds its figures here.", ""]
    if gguf_files:
        lines += ["## GGUF", "", "For llama.cpp, Ollama and LM Studio (converted with llama.cpp's converter by "
                  "`selfie-lite export`): " + ", ".join(f"`{g}`" for g in gguf_files) + ".", ""]
    lines += [
        "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")',
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")',
        'inputs = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,',
        '                                 return_tensors="pt", return_dict=True)',
        "out = model.generate(**inputs, max_new_tokens=64)",
        'print(tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```", "",
        "## Reproduce", "",
        "```bash",
        f"pip install selfie-lite=={__version__}",
        reproduce_command(cfg),
        "```", "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def _last_round(summary: dict):
    rounds = [r.get("round") for r in summary.get("per_round", [])]
    return max(rounds) if rounds else "-"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def eval_section(result: dict, final) -> list[str]:
    s = result.get("settings", {})
    scorer = s.get("scorer")
    lines = ["## Evaluation", "",
             f"`selfie-lite eval`: {s.get('prompts')} held-out prompts, scorer {scorer or 'none'}, baseline "
             f"`{Path(str(s.get('baseline', ''))).name}` (win rate: ties count half), temperature "
             f"{s.get('temperature')}, {s.get('max_new_tokens')} new tokens at most.", ""]
    gold = any("self_label_gold_agreement" in m for m in result.get("models", {}).values())
    cols = (["model"] + (["win rate", "W/T/L", "score"] if scorer else []) + ["seed-pair acc"]
            + (["self-label gold agreement"] if gold else []) + ["tokens"])
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in result.get("models", {}).items():
        label = f"**{name}, ships**" if name == f"round-{final}" else name
        row = [label]
        if scorer:
            row += [_f(m.get("win_rate")), f"{m.get('wins', '-')}/{m.get('ties', '-')}/{m.get('losses', '-')}",
                    _f(m.get("mean_score"))]
        row += [_f(m.get("seed_pair_accuracy"))] + ([_f(m.get("self_label_gold_agreement"))] if gold else [])
        row += [_f(m.get("mean_response_tokens"), ".1f")]
        lines.append("| " + " | ".join(_cell(x) for x in row) + " |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------
# Writing it


def write_card(run_dir: Path, cfg: dict | None = None, summary: dict | None = None,
               eval_result: dict | None = None) -> Path | None:
    """Write the card into the model folder the run ships (summary.json's final round); None when the run has not
    shipped one yet, or when that folder's README.md is not one of ours (a user's own card is left alone). Cards
    of ours in other rounds' model folders (an earlier end of the run shipped another round) are removed: only
    the shipped model has a card. cfg, summary: config.json's and summary.json's content (read when None);
    eval_result: eval.json's (default: RUN/eval.json when there is one)."""
    from selfie_lite.rundir import atomic_write_text, read_json, round_dirs

    run_dir = Path(run_dir)
    if summary is None:
        if not (run_dir / "summary.json").is_file():
            return None
        summary = read_json(run_dir / "summary.json")
    final = summary.get("final_round")
    if not isinstance(final, int):
        return None
    model = run_dir / f"round-{final}" / "model"
    if not model.is_dir():
        return None
    cfg = cfg if cfg is not None else read_json(run_dir / "config.json")
    if eval_result is None and (run_dir / "eval.json").is_file():
        eval_result = read_json(run_dir / "eval.json")
    for _, d in round_dirs(run_dir):
        old = d / "model" / "README.md"
        if d.name != f"round-{final}" and is_ours(old):
            old.unlink()
    path = model / "README.md"
    if path.exists() and not is_ours(path):
        return None
    text = card_text(cfg, summary, eval_result)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return path


def is_ours(path: Path) -> bool:
    try:
        return path.is_file() and MARK in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
