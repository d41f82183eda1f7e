"""The host side of streaming: the decode loops call `dispatch` through an ordered io_callback, once
per SSD round or decoded token, and it hands the new tokens to the one sink in progress."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

import jax
import numpy as np

# One stream at a time (the lock); the callback runs on an XLA runtime thread, so a thread-local
# would not reach it.
_LOCK = threading.Lock()
_SINK: list[Callable | None] = [None]


def dispatch(tokens, n_emit, n_acc) -> None:  # tokens [1, W], n_emit [1], n_acc [1]
    sink = _SINK[0]
    if sink is not None:
        n = int(n_emit[0])
        if n > 0:
            sink([int(t) for t in np.asarray(tokens)[0, :n]], min(int(n_acc[0]), n))


@contextlib.contextmanager
def streaming_to(on_chunk: Callable[[list[int], int], None] | None):
    """Route dispatched tokens to on_chunk for the duration (None: nothing to route)."""
    if on_chunk is None:
        yield
        return
    with _LOCK:
        _SINK[0] = on_chunk
        try:
            yield
            jax.effects_barrier()  # every callback has run
        finally:
            _SINK[0] = None
