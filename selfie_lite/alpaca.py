"""AlpacaEval's model_outputs files, from an eval's outputs (`selfie-lite eval --export alpaca-eval`)."""

from __future__ import annotations

import json
from pathlib import Path

from selfie_lite.rundir import atomic_write_text


def alpaca_eval_rows(rows: list[dict], generator: str) -> list[dict]:
    """AlpacaEval's model_outputs format: a JSON list of {"instruction", "output", "generator"} (+ "dataset" when
    the prompt file had one), one per prompt, in the prompt file's order. Only the first sample of each prompt."""
    out = []
    for r in rows:
        item = {"instruction": r["prompt"], "output": r["responses"][0], "generator": generator}
        if "dataset" in r:
            item["dataset"] = r["dataset"]
        out.append(item)
    return out


def export_alpaca_eval(outputs: dict[str, list[dict]], prompt_rows: list[dict], folder: Path, prefix: str = "") -> list[Path]:
    """One <folder>/<name>.json per model; pass it to `alpaca_eval --model_outputs FILE`."""
    paths = []
    for name, rows in outputs.items():
        merged = [{**pr, **r} for pr, r in zip(prompt_rows, rows, strict=True)]
        path = Path(folder) / f"{name}.json"
        atomic_write_text(path, json.dumps(alpaca_eval_rows(merged, f"{prefix}{name}"), indent=2, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths
