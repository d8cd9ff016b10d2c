"""`selfie-lite report RUN_DIR`: what happened round by round, as a Rich table and a PNG.

Reads: <run>/config.json, round-<i>/done/<stage>.json (the stages' metrics), round-<i>/pairs.jsonl (per-pair
margins and who was smoothed, from train.py's pair_stats) and <run>/eval.json when `selfie-lite eval` has run.
Writes: nothing but the PNG it is asked for (matplotlib, part of the default install).
"""

from __future__ import annotations

import math
from pathlib import Path

from rich import box
from rich.markup import escape
from rich.table import Table

from selfie_lite.disk import format_bytes
from selfie_lite.rundir import read_json, read_jsonl, round_dirs, stage_metrics

# Per-pair keys written by train.py (TrainResult.pair_stats): the plain DPO margin z, the extrapolated margin z_g
# that decides who is smoothed, and whether the pair was smoothed the last time it was seen.
MARGIN_KEY, PICK_KEY, SMOOTHED_KEY = "margin", "extrapolated_margin", "smoothed"


def collect(run_dir: Path) -> dict:
    """Everything the table and the figure need, from the run folder's files."""
    run_dir = Path(run_dir)
    rounds = []
    for i, d in round_dirs(run_dir):
        metrics = stage_metrics(d)
        if not metrics:
            continue
        pairs = []
        if (d / "pairs.jsonl").is_file():
            keep = ("pair_id", MARGIN_KEY, PICK_KEY, SMOOTHED_KEY, "low_confidence", "p_chosen", "reward_chosen",
                    "reward_rejected")
            pairs = [{k: r[k] for k in keep if k in r} for r in read_jsonl(d / "pairs.jsonl")]
        rounds.append({"round": i, "metrics": metrics, "pairs": pairs})
    ev = run_dir / "eval.json"
    cfg = run_dir / "config.json"
    summary = run_dir / "summary.json"
    return {
        "run_dir": str(run_dir),
        "config": read_json(cfg) if cfg.is_file() else {},
        "summary": read_json(summary) if summary.is_file() else None,
        "rounds": rounds,
        "eval": _eval_file(ev) if ev.is_file() else None,
    }


def _eval_file(path: Path) -> dict:
    return read_json(path)


def _f(v, spec=".3f"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def report_table(data: dict) -> Table:
    """Training, one row per round: what the judge labelled, the round guard's signals, how the round's DPO went;
    and, once the run has finished, which round it ships and why (summary.json)."""
    summary = data.get("summary") or {}
    shipped = (escape(f"\nships round {summary['final_round']}: {summary.get('final_why', '')}")
               if "final_round" in summary else "")
    t = Table(title=f"run {data['run_dir']}: per round", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
              caption="gold: self-labels agreeing with the oracle (tiny preset); anchor: self-labels agreeing with "
                      "the seed-DPO judge (the round guard's signal, rounds >= 2); p(ch): mean judge confidence (it rises "
                      "as labels drift: not a quality signal); distinct: share of distinct samples per prompt; "
                      "smooth: share of pairs smoothed after warm-up; loss: first -> last step; margin: mean DPO margin "
                      "z; acc: share of pairs with z > 0; len: mean tokens of the round's samples" + shipped,
              caption_justify="left")
    for c in ("round", "pairs", "gold", "anchor", "p(ch)", "distinct", "smooth", "loss", "margin", "acc", "len"):
        t.add_column(c, justify="left" if c == "round" else "right", no_wrap=True)
    for r in data["rounds"]:
        m = r["metrics"]
        sampled, judged, trained = (m.get(k, {}) for k in ("sample", "judge", "train"))
        t.add_row(
            f"{r['round']} seed" if r["round"] == 0 else str(r["round"]),
            _f(trained.get("pairs", judged.get("pairs")), "d") if (trained or judged) else "-",
            _f(judged.get("gold_agreement")),
            _f(m.get("guard", {}).get("anchor_agreement")),
            _f(judged.get("mean_p_chosen")),
            _f(judged.get("distinct_samples"), ".2f"),
            _f(trained.get("frac_smoothed"), ".2f") if r["round"] > 0 else "-",
            f"{_f(trained.get('loss_start'))}→{_f(trained.get('loss_end'))}" if trained else "-",
            _f(trained.get("mean_margin")),
            _f(trained.get("reward_accuracy"), ".2f"),
            _f(sampled.get("mean_response_tokens"), ".1f"),
        )
    return t


def round_table(i: int, m: dict) -> Table:
    t = Table(title=f"round {i}" + (" (seed DPO)" if i == 0 else ""), title_justify="left", show_header=True)
    for col in ("stage", "items", "seconds", "throughput", "details"):
        t.add_column(col)
    sampled, judged, trained, merged = (m.get(k, {}) for k in ("sample", "judge", "train", "merge"))
    guard, consistency = m.get("guard", {}), m.get("consistency", {})
    if sampled:
        t.add_row("sample", f"{sampled['prompts']} prompts", _f(sampled.get("seconds"), ".1f"), f"{_f(sampled.get('tokens_per_s'), '.0f')} tok/s",
                  f"mean length {sampled['mean_response_tokens']:.1f} tokens")
    if judged:
        extra = f", gold agreement {judged['gold_agreement']:.2f}" if "gold_agreement" in judged else ""
        signals = f", p(chosen) {_f(judged.get('mean_p_chosen'), '.2f')}, distinct {_f(judged.get('distinct_samples'), '.2f')}"
        t.add_row("judge", f"{judged['pairs']} pairs", _f(judged.get("seconds"), ".1f"), f"{_f(judged.get('sequences_per_s'), '.0f')} seq/s",
                  f"dropped {judged['dropped_identical']} identical or tied{signals}{extra}")
    if guard:
        t.add_row("guard", f"{judged.get('pairs', '-')} pairs", _f(guard.get("seconds"), ".1f"), "",
                  f"anchor agreement {guard['anchor_agreement']:.2f} (stop below {guard['threshold']:.2f})")
    if consistency:
        t.add_row("consistency", f"{consistency['pairs']} pairs", _f(consistency.get("seconds"), ".1f"), "",
                  f"judges agree {consistency['mean_consistency']:.2f} (CREAM, {consistency['mode']}), mean smoothing {consistency['mean_smoothing']:.3f}")
    if trained:
        t.add_row("train", f"{trained.get('pairs', '-')} pairs", _f(trained.get("seconds"), ".1f"), f"{_f(trained.get('pairs_per_s'), '.1f')} pairs/s",
                  f"loss {_f(trained.get('loss_start'))} -> {_f(trained.get('loss_end'))}, margin {_f(trained.get('mean_margin'))}, "
                  f"smoothed {_f(trained.get('frac_smoothed'), '.2f')}")
    if merged:
        t.add_row("merge", "1 model", _f(merged.get("seconds"), ".1f"), "", format_bytes(merged['model_bytes']))
    return t


def eval_table(result: dict) -> Table:
    """Evaluation, one row per model (eval.json as `selfie-lite eval` writes it)."""
    s = result["settings"]
    title = f"eval: {s['prompts']} prompts, scorer {s['scorer'] or 'none'}, baseline {Path(s['baseline']).name}"
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("model", no_wrap=True)
    if s["scorer"]:
        t.add_column("win rate", justify="right", no_wrap=True)
        t.add_column("W/T/L", justify="right", no_wrap=True)
        t.add_column("score", justify="right", no_wrap=True)
    if s.get("labelled_pairs"):
        t.add_column("seed-pair acc", justify="right", no_wrap=True)
    has_gold = any("self_label_gold_agreement" in m for m in result["models"].values())
    if has_gold:
        t.add_column("self-label agr", justify="right", no_wrap=True)
    t.add_column("tokens", justify="right", no_wrap=True)
    t.add_column("words", justify="right", no_wrap=True)
    for name, m in result["models"].items():
        row = [name]
        if s["scorer"]:
            row += [_f(m.get("win_rate")), f"{m.get('wins', '-')}/{m.get('ties', '-')}/{m.get('losses', '-')}",
                    _f(m.get("mean_score"))]
        if s.get("labelled_pairs"):
            row.append(_f(m.get("seed_pair_accuracy")))
        if has_gold:
            row.append(_f(m.get("self_label_gold_agreement")))
        row += [_f(m.get("mean_response_tokens"), ".1f"), _f(m.get("mean_response_words"), ".1f")]
        t.add_row(*row)
    return t


# ---------------------------------------------------------------------------------------------
# The figure


def plot_report(data: dict, path: Path) -> Path:
    """A 2-row figure. Top: win rate / agreement per round, fraction smoothed, response length, DPO loss per step.
    Bottom: one histogram per self-labelled round of the margin that picks who is smoothed (z_g),
    smoothed pairs against kept ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = data["rounds"]
    ev = data.get("eval") or {}
    ev_models = ev.get("models", {})
    scorer = ev.get("settings", {}).get("scorer")
    self_rounds = [r for r in rounds if r["round"] > 0 and r["pairs"]]
    n_hist = max(1, len(self_rounds))
    fig = plt.figure(figsize=(max(17, 4.2 * n_hist), 8.6), layout="constrained")
    rows = fig.add_gridspec(2, 1)
    top, bottom = rows[0].subgridspec(1, 4), rows[1].subgridspec(1, n_hist)
    ax_win, ax_sm, ax_len, ax_loss = (fig.add_subplot(top[0, k]) for k in range(4))
    hist_axes = [fig.add_subplot(bottom[0, k]) for k in range(n_hist)]

    # x positions: SFT at -1, round i at i.
    xs_all = [-1] + [r["round"] for r in rounds]
    labels = {-1: "SFT", 0: "0\nseed DPO"}

    def setup_x(ax):
        ax.set_xticks(xs_all, [labels.get(x, str(x)) for x in xs_all])
        ax.set_xlim(min(xs_all) - 0.5, max(xs_all) + 0.5)
        ax.grid(axis="y", alpha=0.3)

    # 1. Win rate against SFT, plus the other accuracies in [0, 1].
    series = []
    if scorer:
        series.append(("win rate vs SFT (" + scorer.split(":")[0] + ")", "win_rate", "tab:blue", "o", 8))
    series.append(("seed-pair accuracy (held-out pairs)", "seed_pair_accuracy", "tab:green", "s", -13))
    shown = []
    for label, key, color, marker, dy in series:
        pts = [(x, ev_models.get("sft" if x == -1 else f"round-{x}", {}).get(key)) for x in xs_all]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax_win.plot(*zip(*pts, strict=True), marker=marker, color=color, label=label, lw=2)
            shown += [y for _, y in pts]
            if key == "win_rate":  # numbers on the headline series only: three labelled lines would collide
                for x, y in pts:
                    ax_win.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, dy), ha="center",
                                    fontsize=8, color=color)
    gold = [(r["round"], r["metrics"].get("judge", {}).get("gold_agreement")) for r in rounds]
    gold = [(x, y) for x, y in gold if y is not None]
    if gold:
        ax_win.plot(*zip(*gold, strict=True), marker="^", color="tab:purple", lw=2, ls="--",
                    label="self-labels agreeing with gold")
        shown += [y for _, y in gold]
    ax_win.axhline(0.5, color="grey", lw=1, ls=":")
    lo, hi = min(shown + [0.5]), max(shown + [0.5])
    ax_win.set_ylim(max(0.0, lo - 0.1), min(1.02, hi + 0.1))  # zoomed: the differences are often a few points
    ax_win.set_title("Win rate and label quality per round")
    ax_win.set_ylabel("fraction (0.5 = coin flip / tie with SFT)")
    setup_x(ax_win)
    if ax_win.get_legend_handles_labels()[0]:  # below the axes: inside, it hides points whatever corner it takes
        ax_win.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=1, frameon=False)
    if not ev_models:
        ax_win.text(0.5, 0.5, "no eval.json yet:\nrun `selfie-lite eval RUN_DIR`", transform=ax_win.transAxes,
                    ha="center", va="center", color="grey")

    # 2. Fraction of pairs smoothed (after the warm-up), per self-labelled round.
    sm = [(r["round"], r["metrics"].get("train", {}).get("frac_smoothed")) for r in rounds if r["round"] > 0]
    sm = [(x, y) for x, y in sm if y is not None]
    if sm:
        bars = ax_sm.bar([x for x, _ in sm], [y for _, y in sm], color="tab:orange", width=0.6)
        ax_sm.bar_label(bars, fmt="%.2f", fontsize=8)
        top = max(y for _, y in sm)
        ax_sm.set_ylim(0, max(0.2, top * 1.3))
    target = data.get("config", {}).get("refine", {}).get("low_conf_frac")
    if target is not None:
        ax_sm.axhline(target, color="grey", ls=":", lw=1, label=f"K = {target:g} (target share)")
        ax_sm.legend(loc="upper right", fontsize=8)
    ax_sm.set_title("Fraction of pairs smoothed (after warm-up)")
    ax_sm.set_xlabel("round")
    xs_sm = [r["round"] for r in rounds if r["round"] > 0] or [1]
    ax_sm.set_xticks(xs_sm)
    ax_sm.set_xlim(min(xs_sm) - 0.6, max(xs_sm) + 0.6)
    ax_sm.grid(axis="y", alpha=0.3)

    # 3. Response length: eval outputs of each model, and the round's own samples (drawn from the previous model).
    le = [(x, ev_models.get("sft" if x == -1 else f"round-{x}", {}).get("mean_response_tokens")) for x in xs_all]
    le = [(x, y) for x, y in le if y is not None]
    if le:
        ax_len.plot(*zip(*le, strict=True), marker="o", lw=2, color="tab:blue", label="eval outputs of this model")
    samp = [(r["round"] - 1, r["metrics"].get("sample", {}).get("mean_response_tokens")) for r in rounds]
    samp = [(x, y) for x, y in samp if y is not None]
    if samp:
        ax_len.plot(*zip(*samp, strict=True), marker="s", lw=2, ls="--", color="tab:gray",
                    label="training samples drawn from it")
    ax_len.set_title("Mean response length")
    ax_len.set_ylabel("tokens")
    ax_len.margins(y=0.25)  # not from 0: a change of a few tokens is what matters, and it would look flat
    setup_x(ax_len)
    if le or samp:
        ax_len.legend(loc="best", fontsize=8)

    _plot_loss(ax_loss, rounds)

    # 4. Margins of smoothed vs kept pairs.
    for ax, r in zip(hist_axes, self_rounds or [None], strict=False):
        if r is None:
            ax.text(0.5, 0.5, "no self-labelled round trained yet", ha="center", va="center", color="grey",
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        key = PICK_KEY if any(PICK_KEY in p for p in r["pairs"]) else MARGIN_KEY
        kept = [p[key] for p in r["pairs"] if key in p and not p.get(SMOOTHED_KEY)]
        smoothed = [p[key] for p in r["pairs"] if key in p and p.get(SMOOTHED_KEY)]
        values = kept + smoothed
        if not values:
            ax.text(0.5, 0.5, "no per-pair margins", ha="center", va="center", transform=ax.transAxes)
            continue
        # x range: the 1st..99th percentile, so a few far outliers do not squeeze the bulk into one bar;
        # values outside are clipped into the edge bins (and counted in the legend).
        ordered = sorted(values)
        lo, hi = ordered[int(0.01 * (len(ordered) - 1))], ordered[int(0.99 * (len(ordered) - 1))]
        lo, hi = min(lo, min(smoothed, default=lo)), max(hi, 0.0)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = [lo + (hi - lo) * k / 40 for k in range(41)]
        outside = sum(v < lo or v > hi for v in values)

        def clip(vs, lo=lo, hi=hi):
            return [min(max(v, lo), hi) for v in vs]

        ax.hist(clip(kept), bins=bins, color="tab:blue", alpha=0.6, label=f"kept ({len(kept)})")
        ax.hist(clip(smoothed), bins=bins, color="tab:orange", alpha=0.9, label=f"smoothed ({len(smoothed)})")
        if outside:
            ax.plot([], [], " ", label=f"{outside} outliers (in the edge bars)")
        ax.axvline(0, color="black", lw=0.8)
        lam = r["metrics"].get("train", {}).get("lam")
        ax.set_title(f"round {r['round']}: margins" + (f" (lambda = {lam:g})" if lam is not None else ""))
        ax.set_xlabel("extrapolated margin z_g (decides smoothing)" if key == PICK_KEY else "DPO margin z")
        ax.set_ylabel("pairs")
        ax.legend(loc="upper right", fontsize=7.5)  # the bulk sits near 0, the right tail is low
        ax.grid(alpha=0.3)

    fig.suptitle(f"selfie-lite run {Path(data['run_dir']).name}", fontsize=13)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_loss(ax, rounds: list[dict]) -> None:
    """The DPO loss at every optimizer step, round after round on one step axis (train.json's loss_curve); runs made
    before it was recorded show each round's first and last loss."""
    offset = 0
    for r in rounds:
        tr = r["metrics"].get("train", {})
        curve = tr.get("loss_curve") or [v for v in (tr.get("loss_start"), tr.get("loss_end")) if v is not None]
        if not curve:
            continue
        xs = range(offset + 1, offset + len(curve) + 1)
        ax.plot(xs, curve, lw=1.5, marker="" if len(curve) > 2 else "o", label="seed DPO" if r["round"] == 0 else f"round {r['round']}")
        if offset:
            ax.axvline(offset + 0.5, color="grey", lw=0.8, ls=":")
        offset += len(curve)
    ax.axhline(math.log(2), color="grey", lw=1, ls="--", label="log 2 (no preference yet)")
    ax.set_title("DPO loss per optimizer step")
    ax.set_xlabel("step (rounds one after another)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if offset:
        ax.legend(loc="best", fontsize=7.5)
    else:
        ax.text(0.5, 0.5, "no training yet", transform=ax.transAxes, ha="center", va="center", color="grey")
