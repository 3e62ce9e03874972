"""Progress bars with a rate (rich), quiet when not on a terminal unless forced."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from rich.progress import Task
    from rich.text import Text

console = Console(stderr=True, highlight=False)


def warn(message: str) -> None:
    """Print one warning line to stderr."""
    console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def info(message: str) -> None:
    """Print one informational line to stderr."""
    console.print(message, soft_wrap=True, markup=False)


class _RateColumn(TextColumn):
    def __init__(self, unit: str) -> None:
        super().__init__("")
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        text = f"{speed:.2f} {self.unit}/s" if speed else f"? {self.unit}/s"
        from rich.text import Text

        return Text(text, style="progress.data.speed")


@contextmanager
def progress_bar(total: int | None, description: str, unit: str = "img") -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` callable driving a progress bar with a rate column."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=not sys.stderr.isatty(),
        disable=False,
    ) as prog:
        task = prog.add_task(description, total=total)
        yield cast("Callable[[int], None]", lambda n=1: prog.advance(task, n))
