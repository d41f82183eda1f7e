"""Shape buckets: compiled shapes come from (batch, prompt, new-token) buckets, so calls of similar
sizes reuse one executable; and the error every bad generation input raises."""

from __future__ import annotations

from typing import Sequence

import numpy as np


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


class Batcher:
    """Input checks and right-padding into (batch, prompt, new-token) buckets: what every generator
    does before it compiles or runs anything. text_buckets: prompts with an image pad to N visual
    tokens + a text bucket (None: every prompt pads to a prompt bucket)."""

    def __init__(self, cfg, *, max_cache_len: int | None = None, batch_buckets: Sequence[int] = BATCH_BUCKETS,
                 prompt_buckets: Sequence[int] = PROMPT_BUCKETS, new_token_buckets: Sequence[int] = NEW_TOKEN_BUCKETS,
                 text_buckets: Sequence[int] | None = TEXT_BUCKETS, batch_multiple: int = 1):
        self.cfg = cfg  # twig_jax.model.config.LlavaConfig
        self.max_cache_len = max_cache_len or cfg.text.max_position_embeddings
        # On a mesh every batch bucket is a multiple of the devices the batch is split over.
        self.batch_buckets = tuple(sorted({-(-int(b) // batch_multiple) * batch_multiple for b in batch_buckets}))
        self.prompt_buckets = tuple(prompt_buckets)
        self.new_token_buckets = tuple(new_token_buckets)
        self.text_buckets = None if text_buckets is None else tuple(text_buckets)

    # --- input checks -------------------------------------------------------------------------
    @staticmethod
    def row_budgets(max_new_tokens: int | Sequence[int], n: int) -> np.ndarray:  # [n] int32
        """Each row's new-token budget: one int for every row, or one per row."""
        if isinstance(max_new_tokens, (int, np.integer)):
            budgets = np.full((n,), int(max_new_tokens), np.int64)
        else:
            budgets = np.asarray(list(max_new_tokens), np.int64)
            if budgets.shape != (n,):
                raise InputError(f"max_new_tokens has {budgets.size} budgets for {n} prompts")
        bad = [int(m) for m in budgets if m < 1]
        if bad:
            raise InputError(f"max_new_tokens must be >= 1, got {bad[0]}")
        return budgets.astype(np.int32)

    def padded_budgets(self, max_new_tokens: int | Sequence[int], n: int, b: int) -> np.ndarray:  # [b] int32
        """row_budgets for the n prompts, and 1 for the b - n padding rows of a batch bucket."""
        out = np.ones((b,), np.int32)
        out[:n] = self.row_budgets(max_new_tokens, n)
        return out

    def check_inputs(self, prompts: Sequence[Sequence[int]], pixel_values,
                     max_new_tokens: int | Sequence[int]) -> None:
        cfg = self.cfg
        if len(prompts) == 0:
            raise InputError("empty batch: no prompts given")
        budgets = self.row_budgets(max_new_tokens, len(prompts))
        n_img = cfg.num_image_tokens
        for i, p in enumerate(prompts):
            max_new_tokens = int(budgets[i])
            if len(p) == 0:
                raise InputError(f"prompt {i} is empty")
            # The image placeholder is replaced by image features, never embedded: it may lie
            # outside the vocabulary (liuhaotian's -200); the count check below places it.
            bad = [t for t in p if not 0 <= t < cfg.text.vocab_size and t != cfg.image_token_index]
            if bad:
                raise InputError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.text.vocab_size}): {bad[:5]}")
            if len(p) + max_new_tokens > self.max_cache_len:
                raise InputError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that needs "
                    f"{len(p) + max_new_tokens} cache slots, over the cache capacity {self.max_cache_len}")
            count = sum(1 for t in p if t == cfg.image_token_index)
            want = 0 if pixel_values is None else n_img
            if count != want:
                what = "no image given" if pixel_values is None else "one image per prompt"
                raise InputError(
                    f"prompt {i} has {count} image placeholder tokens (id {cfg.image_token_index}); "
                    f"expected {want} ({what}, {n_img} visual tokens per image)")
        if pixel_values is not None:
            v = cfg.vision
            want_shape = (len(prompts), v.num_channels, v.image_size, v.image_size)
            if tuple(pixel_values.shape) != want_shape:
                raise InputError(
                    f"pixel_values has shape {tuple(pixel_values.shape)}; expected {want_shape} "
                    f"([batch, channels, image_size, image_size])")

    def prompt_bucket(self, longest: int, with_image: bool) -> int:
        """Padded prompt length for a batch whose longest prompt has `longest` tokens: the smaller of
        its prompt bucket and (with an image and text_buckets) N + its text's bucket."""
        fits = []
        if longest <= self.prompt_buckets[-1]:
            fits.append(bucket(longest, self.prompt_buckets, "prompt length"))
        n_img = self.cfg.num_image_tokens
        if with_image and self.text_buckets is not None and longest - n_img <= self.text_buckets[-1]:
            fits.append(n_img + bucket(longest - n_img, self.text_buckets, "prompt text length"))
        if not fits:
            raise InputError(f"prompt length {longest} exceeds the largest prompt bucket {self.prompt_buckets[-1]}"
                             + (f" (and its text, {longest - n_img} tokens besides the image, the largest text "
                                f"bucket {self.text_buckets[-1]})" if with_image and self.text_buckets else ""))
        return min(fits)

    def pad_inputs(self, prompts, pixel_values, max_new_tokens: int | Sequence[int]):
        """Right-pad prompts into (batch, prompt) buckets; returns arrays plus the bucket sizes (the
        new-token bucket fits the largest budget)."""
        n = len(prompts)
        b = bucket(n, self.batch_buckets, "batch size")
        s = self.prompt_bucket(max(len(p) for p in prompts), pixel_values is not None)
        new = bucket(int(self.row_budgets(max_new_tokens, n).max()), self.new_token_buckets, "max_new_tokens")
        capacity = min(s + new, max(s, self.max_cache_len))
        pad = self.cfg.text.pad_token_id or 0
        tokens = np.full((b, s), pad, np.int32)
        lengths = np.ones((b,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        active = np.arange(b) < n
        pv = None
        if pixel_values is not None:
            pv = np.zeros((b,) + tuple(pixel_values.shape[1:]), np.float32)
            pv[:n] = np.asarray(pixel_values, np.float32)
        return tokens, lengths, active, pv, new, capacity
