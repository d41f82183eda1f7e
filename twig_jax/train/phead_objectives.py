"""What the P-head's training reads: the pruned base's answer log-probability (the RL reward), the
attention rows and targets of the distillation stage, and the group-relative advantage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from twig_jax.model.config import TextConfig
from twig_jax.train.losses import shift_targets, token_ce
from twig_jax.model.layers import gather_rows, rope_cos_sin


def group_advantage(rewards: jax.Array, eps: float = 1e-6, scale: bool = True) -> jax.Array:  # [B, G]
    """Group-normalised advantage: (r - mean) / std over each example's G samples; scale=False
    keeps r - mean, so an example whose samples all score about the same (a description the
    pruned model gets right whatever it keeps) adds little instead of unit-size noise."""
    centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    if not scale:
        return centred
    return centred / (jnp.std(rewards, axis=1, keepdims=True) + eps)


def pruned_logits(text_cfg: TextConfig, base_w: dict, head_fn, h_k: jax.Array, is_image: jax.Array,
                  keep: jax.Array, *, K: int, Kf: int, N: int) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced logits of the pruned base at every text position.

    h_k: [B, S, D] hidden state entering base layer K (full sequence); is_image: [B, S];
    keep: [B, R] kept visual indices (any order); base_w: stacked base weights; head_fn: final
    norm + LM head. Base layers K..Kf-1 see text + the kept visual tokens, layers Kf..L-1 text only
    (FinalWipe), all at their original RoPE positions, causal in sequence order.
    Returns logits [B, S-N, V] (float32) and the sequence position of each text entry [B, S-N].
    """
    # Imported here: ttp.py imports the Twig, which imports this module.
    from twig_jax.model.llama import scan_layers
    from twig_jax.twig.keep import pruned_indices, text_in_pruned, visual_positions

    b, s = is_image.shape
    r = keep.shape[1]
    img_pos = visual_positions(is_image, N)
    idx = pruned_indices(is_image, img_pos, jnp.sort(keep, axis=1), s - N + r)  # [B, M]
    h = scan_layers(text_cfg, base_w, gather_rows(h_k, idx), idx, K, Kf)  # [B, M, D]
    text_in_mid = text_in_pruned(is_image, idx, s - N)  # [B, S-N]
    text_pos = gather_rows(idx, text_in_mid)  # [B, S-N]
    h = scan_layers(text_cfg, base_w, gather_rows(h, text_in_mid), text_pos, Kf, text_cfg.num_hidden_layers)
    return head_fn(h), text_pos


def pruned_answer_logprob(text_cfg: TextConfig, base_w: dict, head_fn, h_k: jax.Array, tokens: jax.Array,
                          label_mask: jax.Array, is_image: jax.Array, keep: jax.Array, *, K: int, Kf: int,
                          N: int) -> jax.Array:  # [B] float32
    """Mean log-probability of the answer tokens (label_mask) under the pruned base, teacher forced."""
    logits, text_pos = pruned_logits(text_cfg, base_w, head_fn, h_k, is_image, keep, K=K, Kf=Kf, N=N)
    targets, weights = shift_targets(tokens, label_mask)  # next token of each sequence position
    t = jnp.take_along_axis(targets, text_pos, axis=1)
    w = jnp.take_along_axis(weights, text_pos, axis=1)
    lp = -token_ce(logits, t)  # [B, S-N]
    return jnp.sum(lp * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def attention_rows(label_mask: jax.Array, rows: str) -> jax.Array:  # [B, S] float32
    """Query-row weights for the AttnKL target. "last": the last prompt token (docs/design.md, "The P-head");
    "answer": every row that predicts an answer token (the last prompt token and the answer but its
    last token), i.e. where the base looks while it produces the whole reference answer."""
    m = label_mask.astype(jnp.float32)
    predicts = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)  # row t predicts token t+1
    if rows == "answer":
        return predicts
    if rows == "last":
        first = jnp.argmax(label_mask, axis=1) - 1
        return jax.nn.one_hot(first, label_mask.shape[1], dtype=jnp.float32)
    raise ValueError(f"rows={rows!r} must be 'last' or 'answer'")


def attention_over_visual(text_cfg: TextConfig, stacked_w: dict, h: jax.Array, positions: jax.Array, layer: int,
                          row_weights: jax.Array, img_pos: jax.Array) -> jax.Array:  # [B, N] float32
    """Layer `layer` (of the stacked weights: the base's, or the twig's) head-averaged attention
    over the visual tokens, summed over the query rows in row_weights [B, S] and renormalised over
    the visual tokens (a distribution). As AttnKL's a_base; with the last prompt row of the last
    twig layer, its top R is TTP's keep-set (renormalising does not change the order).

    h: [B, S, D] the hidden state entering that layer (full, unpruned sequence, causal)."""
    from twig_jax.model.llama import decoder_layer

    b, s, _ = h.shape
    w = {k: v[layer] for k, v in stacked_w.items()}
    cos, sin = rope_cos_sin(positions, text_cfg.head_dim, text_cfg.rope_theta, h.dtype)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool))[None], (b, s, s))
    _, probs = decoder_layer(text_cfg, w, h, cos, sin, lambda k, v: (k, v), mask, True, probs_query=row_weights)
    per_key = jnp.take_along_axis(jnp.mean(probs, axis=1), img_pos, axis=1)  # [B, N]
    return per_key / jnp.maximum(jnp.sum(per_key, axis=1, keepdims=True), 1e-30)
