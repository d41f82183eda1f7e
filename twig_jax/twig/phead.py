"""TwigVLM++ pruning head (P-head, docs/design.md, "The P-head") and the pieces its RL stage needs.

The P-head scores the M visual tokens from the last twig layer's own attention, re-weighted by
two learned gates:

    s = mean_h softmax_k( (G_q(x_q) * q~_h) . (G_k(X_k) * K~_h) / sqrt(d_h) )

x_q is the normalised attention input of the last twig layer at the last prompt token, X_k the
same at the visual tokens, q~ / K~ that layer's own post-RoPE query / keys (frozen), and
G(x) = relu(x W) * sigmoid(x W) with a bias-free W. At inference s replaces the attention map in
TTP (method "phead"). Stage 2 trains only W_q and W_k by REINFORCE: keep-sets are sampled from s
without replacement (Plackett-Luce, drawn in one shot with the Gumbel-top-k trick) and rewarded
with the mean log-probability of the reference answer under the frozen base given that pruned
input (teacher forced, `pruned_answer_logprob`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from twig_jax.model.config import TextConfig
from twig_jax.model.layers import apply_rope, gather_rows, rms_norm, rope_cos_sin


class PHead(nnx.Module):
    """The two gates of the P-head: G_q over the query features, G_k over the key features."""

    def __init__(self, text_cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, init_scale: float = 1.0):
        d = text_cfg.hidden_size
        hq = text_cfg.num_attention_heads * text_cfg.head_dim
        hkv = text_cfg.num_key_value_heads * text_cfg.head_dim
        # init_scale 1 (std d^-1/2): gate pre-activations of unit scale, the head starts near a
        # smoothed copy of the layer's attention. A small init_scale starts near uniform scores, i.e.
        # near random pruning; both gates still get gradient (relu(z) sigmoid(z) has slope 1/2 at 0+).
        std = init_scale * d ** -0.5
        self.gate_q = nnx.Param((std * jax.random.normal(rngs.params(), (d, hq), jnp.float32)).astype(dtype))
        self.gate_k = nnx.Param((std * jax.random.normal(rngs.params(), (d, hkv), jnp.float32)).astype(dtype))


def _gate(x: jax.Array, w: jax.Array) -> jax.Array:  # [..., out]
    z = (x @ w).astype(jnp.float32)
    return jax.nn.relu(z) * jax.nn.sigmoid(z)


def phead_logits(text_cfg: TextConfig, layer_w: dict, p_head_w: dict, x: jax.Array, positions: jax.Array,
                 query_row: jax.Array, img_pos: jax.Array) -> jax.Array:  # [B, H, N] float32
    """Per-head P-head logits over the visual tokens (before the softmax over them).

    layer_w: the last twig layer's weights (one layer's dict); p_head_w: {"gate_q", "gate_k"};
    x: [B, S, D] the hidden state ENTERING the last twig layer; positions: [B, S] RoPE positions;
    query_row: [B] the last prompt token; img_pos: [B, N] sequence positions of the visual tokens.
    """
    b = x.shape[0]
    dh, h, hkv = text_cfg.head_dim, text_cfg.num_attention_heads, text_cfg.num_key_value_heads
    rows = jnp.concatenate([query_row[:, None].astype(jnp.int32), img_pos.astype(jnp.int32)], axis=1)  # [B, 1+N]
    hn = rms_norm(gather_rows(x, rows), layer_w["attn_norm"], text_cfg.rms_norm_eps)  # [B, 1+N, D]
    pos = gather_rows(positions, rows)  # [B, 1+N]
    cos, sin = rope_cos_sin(pos, dh, text_cfg.rope_theta, jnp.float32)
    q = hn[:, :1] @ layer_w["wq"]  # [B, 1, H*Dh]
    k = hn[:, 1:] @ layer_w["wk"]  # [B, N, Hkv*Dh]
    if "bq" in layer_w:
        q, k = q + layer_w["bq"], k + layer_w["bk"]
    q = apply_rope(q.reshape(b, 1, h, dh).transpose(0, 2, 1, 3).astype(jnp.float32), cos[:, :1], sin[:, :1])
    k = apply_rope(k.reshape(b, -1, hkv, dh).transpose(0, 2, 1, 3).astype(jnp.float32), cos[:, 1:], sin[:, 1:])
    gq = _gate(hn[:, :1], p_head_w["gate_q"]).reshape(b, 1, h, dh).transpose(0, 2, 1, 3)  # [B, H, 1, Dh]
    gk = _gate(hn[:, 1:], p_head_w["gate_k"]).reshape(b, -1, hkv, dh).transpose(0, 2, 1, 3)  # [B, Hkv, N, Dh]
    qg = (gq * q)[:, :, 0].reshape(b, hkv, h // hkv, dh)  # [B, Hkv, G, Dh]
    logits = jnp.einsum("bkgd,bknd->bkgn", qg, gk * k) * dh ** -0.5
    return logits.reshape(b, h, -1)


def phead_scores(text_cfg: TextConfig, layer_w: dict, p_head_w: dict, x: jax.Array, positions: jax.Array,
                 query_row: jax.Array, img_pos: jax.Array) -> jax.Array:  # [B, N] float32
    """s: the head-averaged softmax over the visual tokens (sums to 1 per row)."""
    return jnp.mean(jax.nn.softmax(phead_logits(text_cfg, layer_w, p_head_w, x, positions, query_row, img_pos),
                                   axis=-1), axis=1)


def p_head_weights(p_head: PHead) -> dict[str, jax.Array]:
    return {"gate_q": p_head.gate_q[...], "gate_k": p_head.gate_k[...]}


def with_p_head(twig, seed: int = 0, init_scale: float = 1.0):
    """The twig with a freshly initialised P-head (its config says p_head=True); the twig's own
    layers, norm and head are shared, not copied. A twig that has one already is returned as is."""
    import dataclasses

    if twig.p_head is not None:
        return twig
    twig.p_head = nnx.data(PHead(twig.text_cfg, rngs=nnx.Rngs(seed), dtype=twig.norm.get_value().dtype,
                                 init_scale=init_scale))
    twig.twig_cfg = dataclasses.replace(twig.twig_cfg, p_head=True)
    return twig


# ----------------------------------------------------------------------------------------------
# Sampling keep-sets and their log-probability


















# ----------------------------------------------------------------------------------------------
# The reward: the frozen base on a pruned, teacher-forced sequence






# ----------------------------------------------------------------------------------------------
# Stage-1 target: where the frozen base looks (AttnKL)




