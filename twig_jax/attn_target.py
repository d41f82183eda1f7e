"""A training-only attention target: one decoder layer's heads are told where the asked object is.

The shapes world's short questions are lookups ("what colour is the cross ?": find the cross,
read its colour). A from-scratch model learns to read attributes from the image quickly but binds
the wrong object for a long time (session 10: 24 of 25 wrong colour_of / shape_of answers name
another object of the scene). The generator knows which grid cells a question is about, so
training can add, for each such question, a loss on the attention of the row that predicts the
answer's first token: -log of the attention mass that `heads` heads of layer `layer` put on the
visual tokens of those cells. Attention supervision of this kind is an old VQA device (human
attention maps); here the target is exact. It changes the trained model's attention, which is
what TTP and FastV read, so any model trained with it is reported as such.

Batch fields (from `twig_jax.data.SampleProcessor` with `DataConfig.attn_targets`):
  attn_rows [B, Q] int32    the row predicting each supervised answer's first token (0 if unused)
  attn_target [B, Q, N]     1 on the visual tokens of the question's cells
  attn_valid [B, Q]         1 for a supervised question
  attn_img_start [B] int32  the sequence index of the first visual token
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ATTN_FIELDS = ("attn_rows", "attn_target", "attn_valid", "attn_img_start")


def cells_patch_mask(cells: Sequence[int], num_image_tokens: int, grid_cells: int = 3) -> np.ndarray:  # [N]
    """1.0 on the patches (row-major, no CLS) that lie in the given cells of a grid_cells x
    grid_cells layout over the square patch grid."""
    side = math.isqrt(num_image_tokens)
    if side * side != num_image_tokens or side % grid_cells:
        raise ValueError(f"{num_image_tokens} visual tokens are not a square patch grid divisible into "
                         f"{grid_cells} x {grid_cells} cells")
    per = side // grid_cells
    r, c = np.divmod(np.arange(num_image_tokens), side)
    cell = (r // per) * grid_cells + c // per  # [N]
    return np.isin(cell, np.asarray(list(cells), np.int64)).astype(np.float32)


def answer_rows(label_mask: np.ndarray) -> list[int]:
    """Per answer (a run of label tokens, in order) the row whose next-token prediction is the
    answer's first token."""
    m = np.asarray(label_mask).astype(bool)
    starts = np.flatnonzero(m & ~np.concatenate([[False], m[:-1]]))
    return [int(j) - 1 for j in starts if j > 0]


def supervision_fields(tokens: np.ndarray, label_mask: np.ndarray, image_token_index: int, num_image_tokens: int,
                       targets: Sequence[np.ndarray | None], slots: int) -> dict[str, np.ndarray]:
    """The batch fields of one sample. targets: per answer turn in order, a [N] mask or None
    (not supervised); answers cut off by truncation are dropped, and at most `slots` are kept."""
    rows = np.zeros((slots,), np.int32)  # [Q]
    target = np.zeros((slots, num_image_tokens), np.float32)  # [Q, N]
    valid = np.zeros((slots,), np.float32)  # [Q]
    img = np.flatnonzero(np.asarray(tokens) == image_token_index)
    q = 0
    for row, t in zip(answer_rows(label_mask), targets):
        if t is None or q == slots or not t.any():
            continue
        rows[q], target[q], valid[q] = row, t, 1.0
        q += 1
    if q and not img.size:
        raise ValueError("attention targets need an image in the sequence")
    return {"attn_rows": rows, "attn_target": target, "attn_valid": valid,
            "attn_img_start": np.int32(img[0] if img.size else 0)}


def attention_mass_loss(probs: jax.Array, batch: dict, heads: int) -> tuple[jax.Array, jax.Array]:
    """(sum over supervised questions of -log attention mass on the target, question count).

    probs: [B, H, S, S] one layer's attention probabilities over the full causal sequence. The
    first `heads` heads are each supervised (a dedicated lookup head; the others stay free)."""
    b, h, s, _ = probs.shape
    if not 1 <= heads <= h:
        raise ValueError(f"attention target heads={heads} must be in 1..{h}")
    rows = batch["attn_rows"]  # [B, Q]
    target = batch["attn_target"].astype(jnp.float32)  # [B, Q, N]
    n = target.shape[-1]
    p = jnp.take_along_axis(probs[:, :heads], rows[:, None, :, None], axis=2)  # [B, h, Q, S]
    key = batch["attn_img_start"][:, None] + jnp.arange(n)[None]  # [B, N]
    p_img = jnp.take_along_axis(p, key[:, None, None, :], axis=3).astype(jnp.float32)  # [B, h, Q, N]
    mass = jnp.einsum("bhqn,bqn->bhq", p_img, target)  # [B, h, Q]
    nll = -jnp.log(mass + 1e-6).mean(axis=1)  # [B, Q]
    valid = batch["attn_valid"].astype(jnp.float32)
    return jnp.sum(nll * valid), jnp.sum(valid)


__all__ = ["ATTN_FIELDS", "cells_patch_mask", "answer_rows", "supervision_fields", "attention_mass_loss"]
