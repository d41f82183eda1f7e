"""TwigVLM++ pruning head (P-head, DESIGN.md s.5) and the pieces its RL stage needs.

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

from twig_jax.config import TextConfig
from twig_jax.losses import shift_targets, token_ce
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


def gumbel_top_k(key: jax.Array, log_s: jax.Array, r: int, samples: int) -> jax.Array:  # [B, G, R] int32
    """`samples` ordered draws of r indices without replacement from softmax(log_s) per row.

    Adding Gumbel noise and taking the top r is one Plackett-Luce sample, in the order drawn
    (largest perturbed score first).
    """
    b, n = log_s.shape
    g = jax.random.gumbel(key, (b, samples, n), jnp.float32)
    _, idx = jax.lax.top_k(log_s[:, None, :] + g, r)
    return idx.astype(jnp.int32)


def plackett_luce_logprob(log_s: jax.Array, order: jax.Array) -> jax.Array:  # [B, G] float32
    """log P(order) for ordered draws without replacement: sum_i log s_{o_i} - log(1 - sum_{j<i} s_{o_j}).

    log_s: [B, N] log-probabilities (normalised); order: [B, G, R] indices.
    """
    ls = jnp.take_along_axis(log_s[:, None, :], order, axis=2)  # [B, G, R]
    p = jnp.exp(ls)
    taken_before = jnp.cumsum(p, axis=2) - p  # mass already drawn before step i
    rest = jnp.log(jnp.maximum(1.0 - taken_before, 1e-12))
    return jnp.sum(ls - rest, axis=2)


def coverage_similarity(feats: jax.Array) -> jax.Array:  # [B, N, N] float32
    """relu(cos) between every two visual tokens, the coverage keep-set's similarity.

    feats: [B, N, D] the visual tokens' hidden states (ttp.cover_visual: at layer K)."""
    f = feats.astype(jnp.float32)
    f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    return jnp.maximum(jnp.einsum("bid,bjd->bij", f, f), 0.0)


def coverage_gains(sim: jax.Array, w: jax.Array, covered: jax.Array) -> jax.Array:  # [..., N]
    """Each candidate's gain in the coverage objective sum_j w_j max_{i kept} sim_ij, given the
    coverage so far. sim: [..., N, N]; w: [..., N] (>= 0); covered: [..., N]."""
    return jnp.einsum("...ij,...j->...i", jnp.maximum(sim - covered[..., None, :], 0.0), w)


def coverage_picks(sim: jax.Array, w: jax.Array, r: int, choose) -> jax.Array:  # [..., R] int32
    """r picks, in order, each made by choose(t, gain) -> [...] from the untaken tokens' coverage
    gains ([..., N]; taken tokens at -1, below every gain). The greedy of ttp.cover_visual
    chooses the argmax, sample_cover draws in proportion to the gain.
    sim: [..., N, N] (broadcast to w's batch shape); w: [..., N] >= 0."""
    n = w.shape[-1]
    sim = jnp.broadcast_to(sim, w.shape[:-1] + (n, n))

    def pick(t, carry):
        order, taken, covered = carry  # [..., R], [..., N] bool, [..., N] best similarity to the kept set
        i = choose(t, jnp.where(taken, -1.0, coverage_gains(sim, w, covered))).astype(jnp.int32)  # [...]
        order = order.at[..., t].set(i)
        taken = taken | (jnp.arange(n) == i[..., None])
        covered = jnp.maximum(covered, jnp.take_along_axis(sim, i[..., None, None], axis=-2)[..., 0, :])
        return order, taken, covered

    init = (jnp.zeros(w.shape[:-1] + (r,), jnp.int32), jnp.zeros(w.shape, bool), jnp.zeros(w.shape, jnp.float32))
    return jax.lax.fori_loop(0, r, pick, init)[0]


def sample_cover(key: jax.Array, log_s: jax.Array, sim: jax.Array, r: int, samples: int,
                 sharpness: float = 1.0) -> jax.Array:  # [B, G, R]
    """`samples` ordered keep-sets from the coverage policy: step t picks an untaken token with
    probability gain_t(i)^sharpness / sum of the untaken gains^sharpness (gains as in
    coverage_gains, weights s). Its most likely step is the greedy of ttp.cover_visual, so RL on it
    trains the P-head for the keep-set rule it is used with (select="cover"); a sharpness above 1
    draws sets closer to that greedy one. log_s: [B, N]; sim: [B, N, N]."""
    b, n = log_s.shape
    w = jnp.broadcast_to(jnp.exp(log_s)[:, None], (b, samples, n))  # [B, G, N]

    def draw(t, gain):  # [B, G, N] -> [B, G]
        logits = jnp.where(gain < 0, -jnp.inf, sharpness * jnp.log(jnp.maximum(gain, 1e-30)))
        return jax.random.categorical(jax.random.fold_in(key, t), logits, axis=-1)

    return coverage_picks(sim[:, None], w, r, draw)


def cover_logprob(log_s: jax.Array, sim: jax.Array, order: jax.Array,
                  sharpness: float = 1.0) -> jax.Array:  # [B, G] float32
    """log P(order) under sample_cover's policy (same sharpness a): sum_t a log gain_t(o_t) -
    log sum_{i untaken} gain_t(i)^a.

    The coverage before each step depends only on the order (a running max), so every step's
    gains are computed at once (a [B, G, R, N, N] intermediate: fine for RL batches at N = 144,
    large at N = 576); differentiable in log_s. order: [B, G, R]."""
    b, g, r = order.shape
    n = log_s.shape[1]
    w = jnp.exp(log_s)[:, None, None, :]  # [B, 1, 1, N]
    rows = jnp.take_along_axis(sim[:, None], order[..., None], axis=2)  # [B, G, R, N] sim of each pick
    covered = jnp.concatenate([jnp.zeros((b, g, 1, n)), jax.lax.cummax(rows, axis=2)[:, :, :-1]], axis=2)
    gain = coverage_gains(sim[:, None, None], w, covered)  # [B, G, R, N]
    taken = jnp.cumsum(jax.nn.one_hot(order, n, dtype=jnp.int32), axis=2) - jax.nn.one_hot(order, n, dtype=jnp.int32)
    lg = sharpness * jnp.log(jnp.maximum(gain, 1e-30))
    norm = jax.nn.logsumexp(jnp.where(taken > 0, -jnp.inf, lg), axis=-1)  # [B, G, R]
    chosen = jnp.take_along_axis(lg, order[..., None], axis=-1)[..., 0]
    return jnp.sum(chosen - norm, axis=-1)


def group_advantage(rewards: jax.Array, eps: float = 1e-6, scale: bool = True) -> jax.Array:  # [B, G]
    """Group-normalised advantage: (r - mean) / std over each example's G samples; scale=False
    keeps r - mean, so an example whose samples all score about the same (a description the
    pruned model gets right whatever it keeps) adds little instead of unit-size noise."""
    centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    if not scale:
        return centred
    return centred / (jnp.std(rewards, axis=1, keepdims=True) + eps)


# ----------------------------------------------------------------------------------------------
# The reward: the frozen base on a pruned, teacher-forced sequence


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
    from twig_jax.train_lib import scan_layers
    from twig_jax.ttp import pruned_indices, text_in_pruned, visual_positions

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


# ----------------------------------------------------------------------------------------------
# Stage-1 target: where the frozen base looks (AttnKL)


def attention_rows(label_mask: jax.Array, rows: str) -> jax.Array:  # [B, S] float32
    """Query-row weights for the AttnKL target. "last": the last prompt token (DESIGN.md s.5);
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
    from twig_jax.model.llama import _layer

    b, s, _ = h.shape
    w = {k: v[layer] for k, v in stacked_w.items()}
    cos, sin = rope_cos_sin(positions, text_cfg.head_dim, text_cfg.rope_theta, h.dtype)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool))[None], (b, s, s))
    _, probs = _layer(text_cfg, w, h, cos, sin, lambda k, v: (k, v), mask, True, probs_query=row_weights)
    per_key = jnp.take_along_axis(jnp.mean(probs, axis=1), img_pos, axis=1)  # [B, N]
    return per_key / jnp.maximum(jnp.sum(per_key, axis=1, keepdims=True), 1e-30)
