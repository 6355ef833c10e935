"""Progress of long work, on a terminal or in a log file: the one progress reporter of every popyou command.

    with Progress("gen-data", total=n, console=console, unit="images") as progress:
        for batch in ...:
            progress.advance(len(batch))

On a terminal it is a live rich bar (done/total, rate, elapsed, ETA). Anywhere else (a log file, SLURM, nohup,
`accelerate launch ... > log`) it writes one plain line every N seconds, and one at the end:

    2025-05-01 12:00:30 gen-data 1,200/100,000 images (1.2%), 40.1 images/s, elapsed 30s, ETA 41m 06s

N is 30 by default; `--progress-every SECONDS` on each long-running command, or the environment variable
POPYOU_PROGRESS_EVERY, changes it (0: a line at every update). Training adds its own fields (loss, lr, tokens/s)
and asks for a line at every --log-every step besides.
"""
from __future__ import annotations

import math
import os
import time

PROGRESS_ENV = "POPYOU_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0


def set_progress_every(seconds: float | None) -> None:
    """--progress-every: sets the environment variable, so that launched child processes follow it too."""
    if seconds is None:
        return
    from popyou_cli.core.errors import PopyouError

    if not math.isfinite(seconds) or seconds < 0:
        raise PopyouError(f"--progress-every must be a number of seconds >= 0 (got {seconds})")
    os.environ[PROGRESS_ENV] = repr(float(seconds))


def progress_every() -> float:
    """Seconds between two log lines: POPYOU_PROGRESS_EVERY, else 30."""
    from popyou_cli.core.errors import PopyouError

    text = os.environ.get(PROGRESS_ENV, "").strip()
    if not text:
        return DEFAULT_EVERY_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds < 0:
        raise PopyouError(f"{PROGRESS_ENV} must be a number of seconds >= 0 (got '{text}')")
    return seconds


def duration(seconds: float) -> str:
    """12s, 3m 05s, 2h 07m: short enough for a log line."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


class Progress:
    """done/total of one piece of work; see the module docstring. `fields` are extra values shown after the
    rate (training: loss, lr, tokens/s); `fmt` formats them into one string."""

    def __init__(self, label: str, total: int, *, console=None, unit: str = "images", enabled: bool = True,
                 start: int = 0, fmt=None, every: float | None = None):
        self.label, self.total, self.unit, self.fmt = label, int(total), unit, fmt
        self.done = self.start = int(start)
        self.fields: dict = {}
        self.console = console
        self.enabled = enabled and console is not None and self.total > 0
        self.terminal = self.enabled and bool(getattr(console, "is_terminal", False))
        self.every = progress_every() if every is None else every
        self._bar = self._task = None
        self._t0 = self._last_line = time.monotonic()
        self._done_in_line = None  # the count the last log line showed

    # ------------------------------------------------------------------------------------------ use
    def __enter__(self) -> "Progress":
        self._t0 = self._last_line = time.monotonic()
        if self.terminal:
            self._bar = self._rich_bar()
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.done, info="")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
            self._bar = None
        elif self.enabled and exc_type is None and self.done > self.start and self.done != self._done_in_line:
            self.line()  # the last state, in a log file, unless the last line already said it

    def advance(self, k: int = 1, **fields) -> None:
        self.update(self.done + k, **fields)

    def update(self, done: int, *, log: bool = False, **fields) -> None:
        """Set the count (and the extra fields); log=True asks for a log line now (training's --log-every)."""
        self.done = int(done)
        self.fields.update(fields)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, info=self._fields_text())
            return
        now = time.monotonic()
        if log or now - self._last_line >= self.every:
            self.line(now)

    # ------------------------------------------------------------------------------------------ text
    @property
    def rate(self) -> float:
        """Units per second since this progress started (a resumed run counts only its own work)."""
        elapsed = time.monotonic() - self._t0
        return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

    def text(self, now: float | None = None) -> str:
        """The log line, without its timestamp."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._t0
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = duration(left / rate) if rate > 0 else ("0s" if left <= 0 else "?")
        percent = 100.0 * self.done / self.total if self.total else 100.0
        extra = self._fields_text()
        return (f"{self.label} {self.done:,}/{self.total:,} {self.unit} ({percent:.1f}%), "
                f"{_rate(rate)} {self.unit}/s, elapsed {duration(elapsed)}, ETA {eta}" + (f", {extra}" if extra else ""))

    def line(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._last_line, self._done_in_line = now, self.done
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        # markup off: the line is plain text (rich would eat square brackets and turn :x: into emoji).
        self.console.print(f"{stamp} {self.text(now)}", highlight=False, markup=False, emoji=False, soft_wrap=True)

    def _fields_text(self) -> str:
        if not self.fields:
            return ""
        return self.fmt(self.fields) if self.fmt else ", ".join(f"{k} {v}" for k, v in self.fields.items())

    def _rich_bar(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        from rich.progress import Progress as RichProgress
        from rich.text import Text

        unit = self.unit

        class Rate(ProgressColumn):  # rich's own speed column speaks of bytes
            def render(self, task):
                return Text(f"{_rate(task.speed)} {unit}/s" if task.speed else f"- {unit}/s", style="cyan")

        return RichProgress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                            Rate(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}", markup=False), console=self.console, transient=False)


def _rate(rate: float) -> str:
    return f"{rate:.2f}" if rate < 10 else f"{rate:,.1f}" if rate < 1000 else f"{rate:,.0f}"
