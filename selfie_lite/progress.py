"""Progress for the long stages: a live display of Rich bars in a terminal, plain log lines everywhere else.

In a terminal, one bar per stage with throughput and ETA; results printed during the run (the per-round tables, the
guard's verdict) go through `Reporter.print`, which puts them above the live bars so that a redraw never erases them.

When stderr is not a terminal (nohup, CI, a log file, a notebook's `!` cell) a live display shows nothing until it
stops, so each stage logs one line when it starts, one every `log_every_s` seconds (items done, rate, ETA) and one
when it ends. SELFIE_LITE_LOG_EVERY sets the interval (seconds, default 30).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

DEFAULT_LOG_EVERY_S = 30.0


def _log_every_s() -> float:
    try:
        return max(0.0, float(os.environ.get("SELFIE_LITE_LOG_EVERY", DEFAULT_LOG_EVERY_S)))
    except ValueError:
        return DEFAULT_LOG_EVERY_S


def _duration(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=round(seconds)))


def _rate(done: float, elapsed: float) -> str:
    """Items per second, or seconds per item when an item takes longer than ten seconds (a real model's training step
    on a CPU): "0.0/s" would say nothing."""
    if done <= 0 or elapsed <= 0:
        return ""
    per_s = done / elapsed
    return f"{per_s:,.1f}/s" if per_s >= 0.1 else f"{elapsed / done:,.0f} s each"


def _remaining(t) -> float | None:
    """Seconds left at the mean pace so far. Rich's own estimate averages the last 30 seconds only, so it has no
    figure when one item takes longer than that; the whole stage's mean pace always has one."""
    if not t.total or t.completed <= 0 or not t.elapsed:
        return None
    return max(0.0, (t.total - t.completed) * t.elapsed / t.completed)


class Reporter:
    """The stages call start/advance/finish; only this class knows about Rich.

    console: where the bars (or log lines) go, stderr. out: where results go (`print`), stdout. tracker: an
    optional --report-to tracker that also receives each finished round's metrics (`round_done`).
    """

    def __init__(self, console: Console | None = None, out: Console | None = None, tracker=None,
                 log_every_s: float | None = None):
        self.console = console or Console(stderr=True)
        self.out = out or self.console
        self.tracker = tracker
        self.live = self.console.is_terminal and not self.console.is_jupyter
        self.log_every_s = _log_every_s() if log_every_s is None else log_every_s
        self.progress = Progress(
            TextColumn("[bold]{task.description:<20}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.live,  # without a terminal the tasks still keep count, speed and ETA for the log lines
        )
        self._tokens: dict = {}
        self._logged: dict = {}  # task -> time of its last log line

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False

    # -- results ------------------------------------------------------------------------------

    def print(self, *objects, **kwargs) -> None:
        """Print a result. With live bars on the terminal that stdout also shows, print it through the live display
        (above the bars, where no redraw erases it); otherwise to `out` as usual."""
        if self.live and self.progress.live.is_started and self.out.is_terminal:
            self.progress.console.print(*objects, **kwargs)
        else:
            self.out.print(*objects, **kwargs)

    def round_done(self, round_idx: int, metrics: dict) -> None:
        """A round finished: its metrics go to the --report-to tracker (the table is printed by the loop)."""
        if self.tracker is not None:
            self.tracker.log_round(round_idx, metrics)

    # -- stages -------------------------------------------------------------------------------

    def _log(self, task: int, what: str) -> None:
        t = self.progress.tasks[task]
        self.console.print(f"{time.strftime('%H:%M:%S')} {escape(t.description)}: {what}", highlight=False,
                           soft_wrap=True, markup=False)
        self._logged[task] = time.monotonic()

    def _counts(self, task: int) -> str:
        t = self.progress.tasks[task]
        unit = t.fields.get("unit") or "items"
        total = f"/{t.total:,.0f}" if t.total else ""
        pct = f" ({t.completed / t.total:.0%})" if t.total else ""
        return f"{t.completed:,.0f}{total} {unit}{pct}"

    def start(self, name: str, total: int, done: int = 0, unit: str = "") -> int:
        task = self.progress.add_task(name, total=total, completed=done, unit=unit, rate="")
        self._tokens[task] = 0
        if not self.live:
            # total 1 is a placeholder until the stage knows its size (training: set_total at the first step)
            self._log(task, "start" + (f", {self._counts(task)}" + (" already done" if done else "") if total > 1 else ""))
        return task

    def advance(self, task: int, n: int = 1, tokens: int | None = None, **fields) -> None:
        t = self.progress.tasks[task] if task < len(self.progress.tasks) else None
        rate = ""
        if tokens is not None:
            self._tokens[task] += tokens
            if t is not None and t.elapsed:
                rate = f"{self._tokens[task] / t.elapsed:,.0f} tok/s"
        elif t is not None and t.elapsed:
            rate = _rate(t.completed + n, t.elapsed)
        self.progress.update(task, advance=n, rate=rate, **fields)
        if not self.live and time.monotonic() - self._logged.get(task, 0.0) >= self.log_every_s:
            t = self.progress.tasks[task]
            self._log(task, f"{self._counts(task)}" + (f", {rate}" if rate else "")
                      + f", elapsed {_duration(t.elapsed)}, eta {_duration(_remaining(t))}")

    def set_total(self, task: int, total: int) -> None:
        self.progress.update(task, total=total)

    def finish(self, task: int) -> None:
        t = self.progress.tasks[task]
        self.progress.update(task, completed=t.total)
        if not self.live:
            self._log(task, f"done, {self._counts(task)} in {_duration(t.elapsed)}")
