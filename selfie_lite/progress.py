"""Rich progress bars for the long stages: one bar per stage, with throughput and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """The stages call start/advance/finish; only this class knows about Rich."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
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
        )
        self._tokens: dict = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False

    def start(self, name: str, total: int, done: int = 0, unit: str = "") -> int:
        task = self.progress.add_task(name, total=total, completed=done, unit=unit, rate="")
        self._tokens[task] = 0
        return task

    def advance(self, task: int, n: int = 1, tokens: int | None = None, **fields) -> None:
        t = self.progress.tasks[task] if task < len(self.progress.tasks) else None
        rate = ""
        if tokens is not None:
            self._tokens[task] += tokens
            if t is not None and t.elapsed:
                rate = f"{self._tokens[task] / t.elapsed:,.0f} tok/s"
        elif t is not None and t.elapsed:
            rate = f"{(t.completed + n) / t.elapsed:,.1f}/s"
        self.progress.update(task, advance=n, rate=rate, **fields)

    def set_total(self, task: int, total: int) -> None:
        self.progress.update(task, total=total)

    def finish(self, task: int) -> None:
        t = self.progress.tasks[task]
        self.progress.update(task, completed=t.total)
