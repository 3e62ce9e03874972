"""Progress bars with a rate (rich) on a terminal; in a log file, a progress line every 30 s and at the end."""

from __future__ import annotations

import sys
import time
from collections import Counter
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


#: warnings of one kind shown before the rest are only counted (see :func:`warn`)
WARN_LIMIT = 20
_WARNED: Counter[str] = Counter()


def warn(message: str, kind: str | None = None) -> None:
    """Print one warning line to stderr; of one ``kind`` (e.g. "skipped"), only the first :data:`WARN_LIMIT`
    (20 000 bad images must not bury the console: callers list them all in their JSON summary)."""
    if kind is not None:
        _WARNED[kind] += 1
        if _WARNED[kind] > WARN_LIMIT:
            return
    console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def end_warnings() -> None:
    """One line per kind of warning :func:`warn` held back (how many, and where they are listed); counts start again."""
    for kind, count in sorted(_WARNED.items()):
        if count > WARN_LIMIT:
            console.print(
                f"[yellow]warning:[/] {count - WARN_LIMIT} more '{kind}' warnings like these, listed in the run's JSON summary", soft_wrap=True
            )
    _WARNED.clear()


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


#: seconds between progress lines when stderr is not a terminal (a log file, CI)
LOG_EVERY_S = 30.0


@contextmanager
def _progress_lines(total: int | None, description: str, unit: str) -> Iterator[Callable[[int], None]]:
    """Progress for a log file: a line every :data:`LOG_EVERY_S` seconds and one at the end (count, rate, elapsed, left)."""
    start = last = time.monotonic()
    done = 0

    def line(now: float) -> None:
        rate = done / (now - start) if now > start else 0.0
        left = f", about {(total - done) / rate:.0f} s left" if total and rate > 0 and done < total else ""
        of = f"/{total}" if total else ""
        info(f"{description}: {done}{of} {unit}, {rate:.2f} {unit}/s, {now - start:.0f} s{left}")

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= LOG_EVERY_S:
            last = now
            line(now)

    yield advance
    if done:
        line(time.monotonic())


@contextmanager
def progress_bar(total: int | None, description: str, unit: str = "img") -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` callable driving a progress bar with a rate column (progress lines in a log file)."""
    if not sys.stderr.isatty():
        with _progress_lines(total, description, unit) as advance:
            yield advance
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as prog:
        task = prog.add_task(description, total=total)
        yield cast("Callable[[int], None]", lambda n=1: prog.advance(task, n))
