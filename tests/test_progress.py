"""twig_jax.progress: the line's counts, rate and time left against hand-computed values."""

import io

from twig_jax.progress import Progress, format_seconds


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_are_throttled_and_exact():
    clock, out = Clock(), io.StringIO()
    p = Progress(10, "rows", label="generate", stream=out, every_s=5.0, clock=clock)
    clock.t += 2.0
    p.advance(2)  # first update always prints: 2 rows in 2 s -> 1 row/s, 8 left -> 0:08
    clock.t += 1.0
    p.advance(1)  # 1 s later: throttled
    clock.t += 5.0
    p.advance(1)  # 4 rows in 8 s
    clock.t += 1.0
    p.advance(6)  # the last update always prints: 10 rows in 9 s
    lines = out.getvalue().splitlines()
    assert lines == ["generate: 2/10 rows (20%), 1.0 rows/s, 0:08 left",
                     "generate: 4/10 rows (40%), 0.5 rows/s, 0:12 left",
                     "generate: 10/10 rows (100%), 1.1 rows/s, 0:00 left"]


def test_terminal_redraws_one_line_with_a_bar():
    clock, out = Clock(), Tty()
    with Progress(4, "tensors", stream=out, width=8, clock=clock) as p:
        clock.t += 1.0
        p.advance(1)
        clock.t += 1.0
        p.advance(1)
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n")
    assert "[####....] 2/4 tensors (50%), 1.0 tensors/s, 0:02 left" in text


def test_format_seconds():
    assert [format_seconds(x) for x in (0, 59.4, 61, 3600, 3725, float("nan"))] == \
        ["0:00", "0:59", "1:01", "1:00:00", "1:02:05", "?"]
