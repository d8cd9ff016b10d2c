"""`selfie-lite tiny build` and `selfie-lite tiny info`: the built-in tiny preset's commands (a Typer group, added to
the app by cli.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from selfie_lite.console import console, err_console, esc, friendly_errors, json_output
from selfie_lite.errors import UserError

app = typer.Typer(help="The built-in tiny preset: a small model, task and oracle that run on a CPU.", no_args_is_help=True)



@app.command("build")
@friendly_errors
def tiny_build(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a build is cached.")] = False,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Where to build (default: $SELFIE_LITE_CACHE/tiny-v2, else ~/.cache/selfie-lite/tiny-v2, honouring $XDG_CACHE_HOME).")] = None,
):
    """Build the tiny preset (tokenizer, SFT model, gold preference set) into the cache. Runs once, offline.

    Example:

      selfie-lite tiny build
    """
    from selfie_lite.tiny.build import build_tiny

    t0 = time.perf_counter()
    with err_console.status("building the tiny preset") as status:
        preset = build_tiny(cache_dir, force=force, progress=lambda stage, frac: status.update(f"building: {stage} ({frac:.0%})"))
    console.print(f"tiny preset ready in {esc(preset.root)} ({time.perf_counter() - t0:.1f} s)", highlight=False)


@app.command("info")
@friendly_errors
def tiny_info(
    prompts: Annotated[int, typer.Option("--prompts", help="Held-out prompts to sample for the SFT figures.")] = 200,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="The preset's folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest, the SFT figures and the calibration as JSON to stdout.")] = False,
):
    """What the tiny preset holds, and how its SFT model scores under the oracle on held-out prompts.

    Example:

      selfie-lite tiny info
    """
    from rich.table import Table

    from selfie_lite.disk import format_bytes
    from selfie_lite.tiny.build import build_tiny, sft_report

    if prompts < 1:
        raise UserError(f"--prompts must be at least 1, got {prompts}")
    preset = build_tiny(cache_dir)
    m = preset.manifest
    t = Table(title=f"tiny preset: {esc(preset.root)}", title_justify="left", show_header=False)
    t.add_column(style="dim")
    t.add_column()
    files = m.get("files", {})
    for name in ("preferences.jsonl", "eval_prompts.jsonl", "val_prompts.jsonl", "sft.jsonl"):
        if name in files:
            t.add_row(name, f"{files[name]['rows']:,} rows")
    model = m.get("model", {})
    if model:
        c = model.get("config", {})
        t.add_row("SFT model", f"Llama, {model['params']:,} parameters ({format_bytes(model['bytes'])}), "
                  f"{c.get('num_hidden_layers')} layers x {c.get('hidden_size')}, vocabulary {model.get('vocab_size')}")
    if "oracle" in m:
        w = m["oracle"]["weights"]
        t.add_row("oracle", " + ".join(f"{v} {k}" for k, v in w.items()) + f"; good = score >= {m['oracle']['good_score']}")
    t.add_row("data sha256", str(m.get("data_sha256", m.get("data_hash", "?")))[:16] + "...")
    if "build_seconds" in m:
        t.add_row("build time", f"{m['build_seconds']['total']:.0f} s")
    rep = sft_report(preset, n_prompts=prompts)
    t.add_row("", "")
    t.add_row(f"SFT on {rep.get('n_prompts', prompts)} held-out prompts", "(temperature 0.7, one sample each)")
    for k in ("mean_score", "frac_good", "frac_correct", "frac_formatted", "frac_concise", "mean_length_tokens"):
        if k in rep:
            t.add_row(f"  {k}", f"{rep[k]:.3f}")
    by_kind = rep.get("frac_good_by_kind", {})
    if by_kind:
        t.add_row("  frac_good by task", ", ".join(f"{k} {v:.2f}" for k, v in sorted(by_kind.items())))
    with json_output(as_json) as emit:
        console.print(t)
        calib = _print_calibration()
        emit({"root": str(preset.root), "manifest": m, "sft": rep, "calibration": calib})


def _print_calibration():
    """The bench's calibration against the paper's baselines, as benchmarks/results.py last measured it."""
    from rich.markup import escape
    from rich.table import Table

    from selfie_lite.tiny import calibration

    calib = calibration.load()
    if calib is None:
        console.print("[dim]no calibration figures shipped: run python benchmarks/results.py[/dim]")
        return None
    t = Table(title=f"calibration against the paper's baselines ({len(calib['seeds'])} random seeds; "
              f"{escape(calib['source'])})", title_justify="left")
    for col in ("figure", "target", "mean ± sd", "holds"):
        t.add_column(col)
    for f in calib["figures"].values():
        t.add_row(f["what"], calibration.target_text(*f["target"]), f"{f['mean']:.3f} ± {f['sd']:.3f}",
                  "yes" if f["holds"] else "[red]no[/red]")
    console.print(t)
    return calib
