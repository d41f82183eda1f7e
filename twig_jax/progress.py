"""Progress of long work (rows answered, tensors converted, training steps) on stderr.

On a terminal: one line redrawn in place, with a bar, the rate and the time left. Otherwise (a log
file, CI): a plain line at most every `every_s` seconds and at the end, so logs stay readable.
"""

from __future__ import annotations

import math
import sys
import time


def format_seconds(s: float) -> str:
    if math.isnan(s) or math.isinf(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """`done` of `total` units, the rate since the first update, and the time left."""

    def __init__(self, total: int, unit: str = "rows", *, label: str = "", stream=None, enabled: bool = True,
                 every_s: float = 10.0, width: int = 24, clock=time.perf_counter):
        self.total, self.unit, self.label = max(int(total), 0), unit, label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s, self.width, self.clock = every_s, width, clock
        self.done = 0
        self.t0 = clock()
        self.last_print = -math.inf
        self.extra = ""

    def line(self) -> str:
        elapsed = self.clock() - self.t0
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        frac = self.done / self.total if self.total else 1.0
        head = f"{self.label}: " if self.label else ""
        bar = ""
        if self.tty:
            filled = int(round(frac * self.width))
            bar = "[" + "#" * filled + "." * (self.width - filled) + "] "
        rate_s = "?" if math.isnan(rate) else f"{rate:,.1f}"
        tail = f" {self.extra}" if self.extra else ""
        return (f"{head}{bar}{self.done}/{self.total} {self.unit} ({100 * frac:.0f}%), {rate_s} {self.unit}/s, "
                f"{format_seconds(left)} left{tail}")

    def advance(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        self.extra = extra or self.extra
        if not self.enabled:
            return
        now = self.clock()
        if self.tty:
            self.stream.write("\r" + self.line() + "   ")
            self.stream.flush()
        elif now - self.last_print >= self.every_s or self.done >= self.total:
            self.last_print = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
