"""Progress of a long loop as plain lines with rate and ETA, for output that is no terminal (``dvc repro``).

One ``Progress`` per loop; ``update(done)`` (or ``advance(n)``) after each item prints, at most every
``every`` seconds and always for the first and the last item, one line::

    pretrain:base step 300/6000 (5.0 %) 0.14 s/step, elapsed 0:45, ETA 13:18 loss=0.81 lr=0.0003

Rate and ETA count only the items done in this process since the reporter's anchor: ``start`` items done
when it was made (a resumed loop passes where it resumes), or with ``start=None`` the first ``update`` (its
line has no rate yet): the set-up before the loop's first item then never enters the rate. Only the main
process prints (callers pass ``main``); the clock is injectable for tests. ``soar`` and ``pipeline`` both
use it, so it lives in ``soar`` (which never imports ``pipeline``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

DEFAULT_EVERY = 10.0  # seconds between two lines of one loop: long loops print regularly, short ones twice


def clock_text(seconds: float) -> str:
    """A duration as ``m:ss`` under an hour, ``h:mm:ss`` from an hour on (whole seconds)."""
    h, rest = divmod(max(0, round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def rate_text(seconds_per_item: float, unit: str) -> str:
    """``2.31 s/step`` at a second per item or slower, ``14.2 step/s`` (``1780 step/s``) when faster."""
    if seconds_per_item >= 1:
        return f"{seconds_per_item:.2f} s/{unit}"
    per_second = 1 / seconds_per_item
    return f"{per_second:.{2 if per_second < 10 else 1 if per_second < 100 else 0}f} {unit}/s"


class Progress:
    """Plain-line progress of ``total`` items named ``unit`` under ``label`` (module doc).

    ``start``: items already done when this process began (a resumed training's step), counted neither in
    the rate nor in the ETA; None anchors at the first ``update``. ``main``: whether this process prints.
    ``every``: seconds between lines (0: every update). ``stream``: where lines go (None: ``sys.stdout``).
    """

    def __init__(self, label: str, total: int, *, unit: str = "item", start: int | None = 0, main: bool = True,
                 every: float = DEFAULT_EVERY, clock: Callable[[], float] = time.monotonic,
                 stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit, self.main, self.every = label, total, unit, main, every
        self.clock, self.stream = clock, stream
        self.began = clock()
        self.anchor: tuple[int, float] | None = None if start is None else (start, self.began)
        self.done = start or 0
        self.printed: float | None = None  # clock of the last line
        self.finished = False  # the last item's line is out

    def line(self, done: int, now: float, note: str = "") -> str:
        """The line for ``done`` items at clock ``now`` (rate and ETA once the anchor has items after it)."""
        pct = 100.0 * done / self.total if self.total else 100.0
        timing = []
        count, since = (done - self.anchor[0], now - self.anchor[1]) if self.anchor else (0, 0.0)
        per = since / count if count > 0 and since > 0 else None
        if per is not None:
            timing.append(rate_text(per, self.unit))
        timing.append(f"elapsed {clock_text(now - self.began)}")
        if per is not None:
            timing.append(f"ETA {clock_text(per * max(0, self.total - done))}")
        text = f"{self.label} {self.unit} {done}/{self.total} ({pct:.1f} %) " + ", ".join(timing)
        return f"{text} {note}" if note else text

    def update(self, done: int, note: str = "") -> str | None:
        """``done`` items are done (``note``: appended to the line); returns the line printed, or None."""
        now = self.clock()
        if self.anchor is None:
            self.anchor = (done, now)
        self.done = done
        last = done >= self.total
        if not self.main or self.finished or (
                not last and self.printed is not None and now - self.printed < self.every):
            return None
        text = self.line(done, now, note)
        print(text, file=self.stream or sys.stdout, flush=True)
        self.printed, self.finished = now, last
        return text

    def advance(self, n: int = 1, note: str = "") -> str | None:
        """``n`` more items are done; as ``update``."""
        return self.update(self.done + n, note)
