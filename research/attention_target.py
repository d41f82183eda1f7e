"""A training-only attention target: one decoder layer's heads are told where the asked object is.

The shapes world's short questions are lookups ("what colour is the cross ?": find the cross,
read its colour). A from-scratch model learns to read attributes from the image quickly but binds
the wrong object for a long time (in one probe, 24 of 25 wrong colour_of / shape_of answers name
another object of the scene). The generator knows which grid cells a question is about, so
training can add, for each such question, a loss on the attention of the row that predicts the
answer's first token: -log of the attention mass that `heads` heads of layer `layer` put on the
visual tokens of those cells. Attention supervision of this kind is an old VQA device (human
attention maps); here the target is exact. It changes the trained model's attention, which is
what TTP and FastV read, so any model trained with it is reported as such.

The lookup is two hops (the answer row gathers the question's key words, then matches them
against the patches), so an earlier layer can get a second target (`key layer`): from the same
row, the mass of its heads on the current question's key words (colour, shape, size words).

A relation ("is the A left of the B ?") needs both objects, each read by its own head: pulled
onto the union of A's and B's cells, both heads met the target by looking at B alone (a
probe: 0.96-0.99 of their mass on B and its words), and left_of fell from 23 to 17 of 28 under
that target. With roles, each target has
two: role 0 (the subject A: its cells and the key words before the relation word) and role 1 (the
reference B: its cells and the key words after it); supervised head h gets role h % 2. Every
other question's two roles are the same target.

Here are both halves of the library's extension point: `ShapesAttentionTargets` (a
`DataConfig.extra_fields`: the batch fields below, from each record's shapes-world "objects") and
`ShapesAttentionLoss` (a `TrainConfig.aux_loss`: the loss, logged as "attn_mass_nll");
`shapes_attention` builds the pair from `python -m research.train_attention`'s flags.

Batch fields (per sample from `ShapesAttentionTargets`, batched by the data pipeline):
  attn_rows [B, Q] int32       the row predicting each supervised answer's first token (0 if unused)
  attn_target [B, Q, 2, N]     per role, 1 on the visual tokens of the question's cells
  attn_key_target [B, Q, 2, S] per role, 1 on the key words of the question (the tokens in key_ids
                               between the previous answer, or the image, and the row)
  attn_valid [B, Q]            1 for a supervised question
  attn_img_start [B] int32     the sequence index of the first visual token
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import ClassVar, Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twig_jax.data import BadSample, ConversationEncoder
from twig_jax.data.shapes import RELATION_WORDS, ShapeObject, key_words, question_cells, relation_cells

ATTN_FIELDS = ("attn_rows", "attn_target", "attn_key_target", "attn_valid", "attn_img_start")


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


def _label_runs(label_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) indices of the runs of label tokens (answers), in order; end exclusive."""
    m = np.asarray(label_mask).astype(bool)
    edges = np.diff(np.concatenate([[0], m.astype(np.int8), [0]]))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def answer_rows(label_mask: np.ndarray) -> list[int]:
    """Per answer (a run of label tokens, in order) the row whose next-token prediction is the
    answer's first token."""
    return [int(j) - 1 for j in _label_runs(label_mask)[0] if j > 0]


def supervision_fields(tokens: np.ndarray, label_mask: np.ndarray, image_token_index: int, num_image_tokens: int,
                       targets: Sequence[np.ndarray | tuple[np.ndarray, np.ndarray] | None], slots: int,
                       key_ids: Collection[int] = (), split_ids: Collection[int] = ()) -> dict[str, np.ndarray]:
    """The batch fields of one sample. targets: per answer turn in order, None (not supervised),
    a [N] mask (both roles) or a pair of [N] masks (subject, reference: the question's key words
    are split at its first token in split_ids); answers cut off by truncation are dropped, and at
    most `slots` are kept. key_ids: token ids of the key words (attn_key_target)."""
    tokens = np.asarray(tokens)
    rows = np.zeros((slots,), np.int32)  # [Q]
    target = np.zeros((slots, 2, num_image_tokens), np.float32)  # [Q, 2, N]
    key_target = np.zeros((slots, 2, tokens.shape[0]), np.float32)  # [Q, 2, S]
    valid = np.zeros((slots,), np.float32)  # [Q]
    img = np.flatnonzero(tokens == image_token_index)
    is_key = np.isin(tokens, np.asarray(list(key_ids), np.int64)).astype(np.float32)  # [S]
    is_split = np.isin(tokens, np.asarray(list(split_ids), np.int64))  # [S]
    starts, ends = _label_runs(label_mask)
    q = 0
    for i, (start, t) in enumerate(zip(starts, targets)):
        if t is None or q == slots or start == 0:
            continue
        roles = t if isinstance(t, tuple) else (t, t)
        if not all(np.asarray(r).any() for r in roles):
            continue
        row = int(start) - 1
        # The question lies between the previous answer (or the image) and the row.
        after = int(ends[i - 1]) if i else (int(img[-1]) + 1 if img.size else 0)
        rows[q], target[q], valid[q] = row, np.stack(roles), 1.0
        key_target[q, :, after:row + 1] = is_key[after:row + 1]
        if isinstance(t, tuple):
            split = np.flatnonzero(is_split[after:row + 1])
            if not split.size:
                raise ValueError(f"a two-role attention target needs a relation word (token ids {sorted(split_ids)}) "
                                 f"in its question, tokens {after}..{row}")
            cut = after + int(split[0])
            key_target[q, 0, cut:] = 0.0  # the subject's words come before the relation word
            key_target[q, 1, :cut] = 0.0
        q += 1
    if q and not img.size:
        raise ValueError("attention targets need an image in the sequence")
    return {"attn_rows": rows, "attn_target": target, "attn_key_target": key_target, "attn_valid": valid,
            "attn_img_start": np.int32(img[0] if img.size else 0)}


def _mass_nll(p_keys: jax.Array, target: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """p_keys [B, h, Q, K] attention of the supervised heads from each row over K keys, target
    [B, Q, 2, K] 0/1 per role (head i gets role i % 2): (sum over valid rows of the mean over
    heads of -log mass on the head's target, row count). A head whose target is empty (no key
    word survived) is left out of its row's mean; a row with none is skipped."""
    h = p_keys.shape[1]
    per_head = target[:, :, jnp.arange(h) % 2].astype(jnp.float32)  # [B, Q, h, K]
    mass = jnp.einsum("bhqk,bqhk->bqh", p_keys.astype(jnp.float32), per_head)  # [B, Q, h]
    has = (jnp.sum(per_head, axis=-1) > 0).astype(jnp.float32)  # [B, Q, h]
    n_heads = jnp.sum(has, axis=-1)  # [B, Q]
    nll = jnp.sum(-jnp.log(mass + 1e-6) * has, axis=-1) / jnp.maximum(n_heads, 1.0)  # [B, Q]
    valid = valid.astype(jnp.float32) * (n_heads > 0)
    return jnp.sum(nll * valid), jnp.sum(valid)


def _row_probs(probs: jax.Array, batch: dict, heads: int) -> jax.Array:  # [B, heads, Q, S]
    """The supervised heads' attention from each batch row's attn_rows."""
    h = probs.shape[1]
    if not 1 <= heads <= h:
        raise ValueError(f"attention target heads={heads} must be in 1..{h}")
    return jnp.take_along_axis(probs[:, :heads], batch["attn_rows"][:, None, :, None], axis=2)


def key_mass_loss(probs: jax.Array, batch: dict, heads: int) -> tuple[jax.Array, jax.Array]:
    """As attention_mass_loss, for the key-word target: the mass on the question's key words."""
    p = _row_probs(probs, batch, heads)  # [B, h, Q, S]
    return _mass_nll(p, batch["attn_key_target"], batch["attn_valid"])


def attention_mass_loss(probs: jax.Array, batch: dict, heads: int) -> tuple[jax.Array, jax.Array]:
    """(sum over supervised questions of -log attention mass on the target, question count).

    probs: [B, H, S, S] one layer's attention probabilities over the full causal sequence. The
    first `heads` heads are each supervised (a dedicated lookup head; the others stay free)."""
    p = _row_probs(probs, batch, heads)  # [B, h, Q, S]
    n = batch["attn_target"].shape[-1]
    key = batch["attn_img_start"][:, None] + jnp.arange(n)[None]  # [B, N]
    p_img = jnp.take_along_axis(p, key[:, None, None, :], axis=3)  # [B, h, Q, N]
    return _mass_nll(p_img, batch["attn_target"], batch["attn_valid"])


def _token_ids(tok, words: Sequence[str]) -> list[int]:
    """Token ids of shapes-world words (one word-level token each; unknown words dropped)."""
    ids = [tok.convert_tokens_to_ids(w) for w in words]
    unk = getattr(tok, "unk_token_id", None)
    return [i for i in ids if i is not None and i != unk]


@dataclasses.dataclass(frozen=True)
class ShapesAttentionTargets:
    """`DataConfig.extra_fields`: the ATTN_FIELDS of each sample, from the record's "objects" (the
    cells every short question is about)."""

    roles: bool = False  # a relation's two objects are two targets (subject: even heads, reference: odd heads)
    slots: int = 8  # supervised questions per sample, at most
    field_names: ClassVar[tuple[str, ...]] = ATTN_FIELDS

    def __post_init__(self):
        if self.slots < 1:
            raise ValueError(f"attention target slots={self.slots} must be >= 1")

    def sample_fields(self, record: Mapping, tokens: np.ndarray, label_mask: np.ndarray,
                      encoder: ConversationEncoder) -> dict[str, np.ndarray]:
        try:
            objects = [ShapeObject.from_key(k) for k in record["objects"]]
        except (KeyError, TypeError, ValueError) as e:
            raise BadSample("malformed",
                            f"attention targets need the record's shapes-world 'objects' ({e!r})") from None
        n = encoder.num_image_tokens
        targets = []
        for msg in record["conversations"]:
            if str(msg.get("from", "")).lower() not in ("human", "user"):
                continue
            question = str(msg.get("value", ""))
            pair = relation_cells(question, objects) if self.roles else None
            if pair is not None:
                targets.append((cells_patch_mask([pair[0]], n), cells_patch_mask([pair[1]], n)))
                continue
            cells = question_cells(question, objects)
            targets.append(None if cells is None else cells_patch_mask(cells, n))
        # key words: the attribute words a question names an object by; relation words ("left",
        # "above"): where a relation's subject ends
        return supervision_fields(tokens, label_mask, encoder.image_token_index, n, targets, self.slots,
                                  _token_ids(encoder.tok, key_words()), _token_ids(encoder.tok, RELATION_WORDS))


@dataclasses.dataclass(frozen=True)
class ShapesAttentionLoss:
    """`TrainConfig.aux_loss`: layer `layer`'s first `heads` heads onto the asked object's visual
    tokens and, with `key_layer`, that layer's first `heads` heads onto the question's key words
    (its -log mass added per question, same count); weight `weight`."""

    layer: int
    heads: int = 1
    key_layer: int | None = None
    weight: float = 1.0
    batch_fields: ClassVar[tuple[str, ...]] = ATTN_FIELDS
    metric: ClassVar[str] = "attn_mass_nll"

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,) + (() if self.key_layer is None else (self.key_layer,))

    def sums(self, probs: Sequence[jax.Array], batch: dict) -> tuple[jax.Array, jax.Array]:
        nll, count = attention_mass_loss(probs[0], batch, self.heads)
        if self.key_layer is not None:
            key_nll, key_count = key_mass_loss(probs[1], batch, self.heads)
            nll = nll + key_nll * count / jnp.maximum(key_count, 1.0)
        return nll, count


def shapes_attention(attn_layer: int | None, attn_heads: int = 1, attn_key_layer: int | None = None,
                     attn_weight: float = 1.0, attn_roles: bool = False,
                     ) -> tuple[ShapesAttentionTargets, ShapesAttentionLoss]:
    """The data and loss halves of the attention target, from research.train_attention's flags."""
    if attn_layer is None:
        raise ValueError("the attention target (and its second hop, attn_key_layer, or its roles) needs attn_layer")
    return (ShapesAttentionTargets(roles=attn_roles),
            ShapesAttentionLoss(layer=attn_layer, heads=attn_heads, key_layer=attn_key_layer, weight=attn_weight))


__all__ = ["ATTN_FIELDS", "cells_patch_mask", "answer_rows", "supervision_fields", "attention_mass_loss",
           "key_mass_loss", "ShapesAttentionTargets", "ShapesAttentionLoss", "shapes_attention"]
