"""A rich progress bar for training loops (implements models.train.loop.Progress)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichProgress:
    """One bar per epoch with the running loss; a summary line when the epoch ends."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self._bar: Progress | None = None
        self._task = None

    def start(self, name: str, total: int) -> None:
        self._bar = Progress(TextColumn("{task.description:<28}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                             TimeElapsedColumn(), TimeRemainingColumn(),
                             console=self.console, transient=True)
        self._bar.start()
        self._task = self._bar.add_task(name, total=total, loss=0.0)

    def advance(self, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, loss=loss)

    def finish(self, summary: str) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self.console.print(summary)
