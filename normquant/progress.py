"""Progress of long loops (blocks, evaluation windows, self-generation): a bar on a terminal, plain lines in a log.

* On a terminal: a tqdm bar on stderr.
* Redirected (stderr not a terminal): plain ``normquant: blocks 12/30 (40%), 1m02s elapsed, ~1m33s left`` lines,
  at most one per 10% of the work or per 30 s, none in a loop's first 5 s — no ``\\r`` updates in log files.
* ``configure("off")`` (the CLI's ``--quiet``): nothing.

After the first step of a loop whose projection exceeds :data:`ESTIMATE_AFTER_S`, one line says how long the
whole loop will take (steps x the measured seconds of the first step), before the rest of the work starts::

    normquant: blocks: the first of 30 took 41.2 s; all 30: about 21 min

Lines go to the ``normquant.progress`` logger at INFO (the CLI shows them unless ``--quiet``).

>>> with progress_bar(total=3, desc="demo", enabled=False) as bar:
...     for _ in range(3):
...         bar.update()
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator

log = logging.getLogger(__name__)

#: a loop projected to take longer than this (seconds) gets the one-line estimate after its first step
ESTIMATE_AFTER_S = 30.0
#: plain-line mode: a line per this fraction of the work, or per this many seconds, whichever comes first
LINE_EVERY_FRACTION = 0.1
LINE_EVERY_S = 30.0
#: plain-line mode: no lines before the loop has run this long (seconds)
LINES_AFTER_S = 5.0

_MODE: str | None = None  # None: bar on a terminal, lines otherwise; "bar" | "lines" | "off"


def configure(mode: str | None) -> None:
    """``None`` (automatic), ``"bar"``, ``"lines"`` or ``"off"`` for every progress display from now on."""
    global _MODE
    if mode not in (None, "bar", "lines", "off"):
        raise ValueError(f"progress mode must be None, 'bar', 'lines' or 'off', not {mode!r}")
    _MODE = mode


def mode() -> str:
    """The effective display mode now."""
    if _MODE is not None:
        return _MODE
    return "bar" if _isatty(sys.stderr) else "lines"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_seconds(s: float) -> str:
    """``42 s``, ``3m05s``, ``1h10m``."""
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _about(s: float) -> str:
    if s < 90:
        return f"about {s:.0f} s"
    if s < 5400:
        return f"about {s / 60:.0f} min"
    return f"about {s / 3600:.1f} h"


class Progress:
    """A progress display with tqdm's ``update`` / ``total`` / ``set_postfix`` / ``close`` (and iteration)."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.desc, self.unit, self.n = desc, unit, 0
        self.mode = mode() if enabled else "off"
        self._total = total
        self._start = time.perf_counter()
        self._last_line_t, self._last_line_n = self._start, 0
        self._estimated = False
        self._postfix = ""
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int | None) -> None:
        if self._total is None and self.n == 0:  # the loop only now knows its size: time it from here
            self._start = self._last_line_t = time.perf_counter()
        self._total = value
        if self._bar is not None:
            self._bar.total = value
            self._bar.refresh()

    def set_postfix(self, **kwargs) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        if self._bar is not None:
            self._bar.set_postfix(**kwargs)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        if self.mode == "off":
            return
        now = time.perf_counter()
        elapsed = now - self._start
        if not self._estimated and self._total and self.n < self._total:
            self._estimated = True
            projected = elapsed / self.n * self._total
            if projected > ESTIMATE_AFTER_S:
                first = "first" if self.n == 1 else f"first {self.n}"
                self._say(f"{self.desc}: the {first} of {self._total} took {elapsed:.1f} s; "
                          f"all {self._total}: {_about(projected)}")
        if self.mode == "lines" and elapsed >= LINES_AFTER_S:  # a short loop prints nothing
            step = max(1, int(round((self._total or 0) * LINE_EVERY_FRACTION)))
            done = self._total is not None and self.n >= self._total
            if done or self.n - self._last_line_n >= step or now - self._last_line_t >= LINE_EVERY_S:
                self._last_line_t, self._last_line_n = now, self.n
                self._say(self._line(elapsed))

    def _line(self, elapsed: float) -> str:
        if self._total:
            left = elapsed / self.n * (self._total - self.n) if self.n else 0.0
            text = (f"{self.desc} {self.n}/{self._total} ({100 * self.n / self._total:.0f}%), "
                    f"{format_seconds(elapsed)} elapsed, ~{format_seconds(left)} left")
        else:
            text = f"{self.desc} {self.n} {self.unit}, {format_seconds(elapsed)} elapsed"
        return f"{text}{', ' + self._postfix if self._postfix else ''}"

    def _say(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(f"normquant: {message}", file=sys.stderr)
        else:
            log.info(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True) -> Progress:
    """A :class:`Progress` (see the module docstring); ``enabled=False`` shows nothing."""
    return Progress(iterable, total=total, desc=desc, unit=unit, enabled=enabled)
