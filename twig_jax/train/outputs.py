"""Where the training commands write, and how they say what is wrong.

An output directory is replaced as a whole (a new sibling renamed into place), so it may only be
one the command made: absent, empty, or holding a twig (or a trained model) of ours. Anything
else needs --force, and nothing ever replaces a run's inputs (the base, the input twig, the data,
the checkpoint directory) or a directory holding one, --force or not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Mapping, NoReturn

from twig_jax.twig.io import TRAINING_RECORD_FILE, holds_only_twig


class UsageError(ValueError):
    """Bad input to a training command: reported as one line with status 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `PROG: error: ...` line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def report(prog: str, problem: object) -> int:
    """Print `PROG: error: problem` as one line on stderr; the status of bad input (2)."""
    text = " ".join(str(problem).split()) or type(problem).__name__
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    return 2


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def holds_trained_model(path: str) -> bool:
    """A converted model directory that `twig-jax train --train-all` wrote (its training record)."""
    return (os.path.isfile(os.path.join(path, "twig_jax.json"))
            and os.path.isfile(os.path.join(path, TRAINING_RECORD_FILE)))


def check_output(out: str, inputs: Mapping[str, str | None], *, force: bool, flag: str = "--out",
                 holds_ours: Callable[[str], bool] | None = None, what: str = "a twig") -> str:
    """The real path `out` will be written as, or UsageError naming why it may not be.

    inputs: {flag: path} of everything the run reads (None: not given). `out` may not be one of
    them or a folder holding one; inside one it may only be new, empty or `what` of ours (a twig
    beside its base); anywhere else it may also hold anything with `force`. holds_ours: whether a
    directory holds `what` of ours (default: io.holds_only_twig)."""
    real = _real(out)
    for name, path in inputs.items():
        if not path:
            continue
        p = _real(path)
        if real == p:
            kind = "directory" if os.path.isdir(p) else "file"
            raise UsageError(f"{flag} {out} is the {name} {kind}: refusing to write there (even with --force)")
        if _inside(p, real):
            raise UsageError(f"{flag} {out} holds the {name} path {path}: refusing to replace it (even with --force)")
    if not os.path.lexists(real) or (os.path.isdir(real) and not os.listdir(real)):
        return real
    if (holds_ours or holds_only_twig)(real):
        return real
    entries = sorted(os.listdir(real)) if os.path.isdir(real) else []
    shown = (", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")) if entries else "a file"
    inside = [name for name, path in inputs.items() if path and _inside(real, _real(path))]
    if inside:
        raise UsageError(f"{flag} {out} lies inside the {inside[0]} directory and holds {shown}, not {what} of ours: "
                         "refusing to replace it (even with --force)")
    if not force:
        raise UsageError(f"{flag} {out} holds {shown}, not {what} of ours: refusing to replace it "
                         "(--force replaces it)")
    return real


def training_record(**fields) -> str:
    """The JSON text of a training record (TRAINING_RECORD_FILE)."""
    return json.dumps(fields, indent=2, default=str) + "\n"


__all__ = ["UsageError", "OneLineArgumentParser", "report", "holds_trained_model", "check_output", "training_record"]
