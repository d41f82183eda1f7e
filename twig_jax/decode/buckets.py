"""Shape buckets: compiled shapes come from (batch, prompt, new-token) buckets, so calls of similar
sizes reuse one executable; and the error every bad generation input raises."""

from __future__ import annotations

from typing import Sequence


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


# Every 128 tokens from 512 to 2048: a LLaVA prompt (576 visual tokens + text) wastes < 20% on padding.
PROMPT_BUCKETS = (64, 128, 256, 384) + tuple(range(512, 2049, 128)) + (2560, 3072, 3584, 4096)


# Prompts with an image: the N visual tokens are exact, so only the text needs a bucket (length =
# N + a text bucket, or the prompt bucket where that is shorter). A 144-visual-token prompt with 20
# words pads to 176, not to 256; TTP's pruned groups (R visual + text) shrink by the same padding.
TEXT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


NEW_TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class InputError(ValueError):
    """Bad user input to generation (named, never a raw XLA trace)."""


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise InputError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")
