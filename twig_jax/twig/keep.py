"""Keep rules: which R of the N visual tokens the pruned layers see, from per-token scores.

Top R (the paper), score-weighted coverage, and Plackett-Luce draws (the P-head's policy), plus
the static gathers that lay the kept tokens out (docs/design.md, "Keep rules").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from twig_jax.twig.config import TwigConfigError


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


def visual_positions(is_image: jax.Array, n: int) -> jax.Array:  # [B, N] int32
    """Sequence positions of the n image placeholders of each row, in order."""
    return jax.vmap(lambda m: jnp.nonzero(m, size=n, fill_value=0)[0])(is_image).astype(jnp.int32)


def score_query(lengths: jax.Array, is_image: jax.Array, score_rows: str) -> jax.Array:
    """Which query rows the scores read, as run_layers' probs_query: "last": the row of the last
    prompt token, [B] int (released TwigVLM code); "text": every valid text row, [B, S] weights
    (the paper's equation)."""
    if score_rows == "last":
        return (lengths - 1).astype(jnp.int32)
    if score_rows == "text":
        s = is_image.shape[1]
        return ((~is_image) & (jnp.arange(s)[None] < lengths[:, None])).astype(jnp.float32)  # [B, S]
    raise TwigConfigError(f"score_rows={score_rows!r} must be 'last' or 'text'")


def scores_from_probs(row_probs: jax.Array, img_pos: jax.Array) -> jax.Array:  # [B, N] float32
    """Head-averaged attention onto the visual tokens.

    row_probs: [B, H, S] one layer's attention probabilities over the (fresh) prompt, already
    reduced to the query rows of score_query (run_layers(..., probs_query=...)).
    """
    per_key = jnp.mean(row_probs.astype(jnp.float32), axis=1)  # [B, S]
    return jnp.take_along_axis(per_key, img_pos, axis=1)  # [B, N]


def select_visual(scores: jax.Array, r: int) -> jax.Array:  # [B, R] int32
    """Top-r visual indices (into 0..N-1), sorted ascending so kept tokens keep their order."""
    if r == scores.shape[1]:
        return jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32)[None], scores.shape)
    _, idx = jax.lax.top_k(scores, r)
    return jnp.sort(idx, axis=1).astype(jnp.int32)


def cover_visual(scores: jax.Array, feats: jax.Array, r: int) -> jax.Array:  # [B, R] int32
    """Score-weighted coverage keep-set (select="cover"), sorted ascending.

    Greedily maximises sum_j s_j * max_{i in keep} relu(cos(f_i, f_j)): every visual token j
    counts by its score s_j and is represented by the kept token most like it (a weighted
    facility location; submodular, so the greedy set is within 1 - 1/e of the best one). A second
    patch of an object already kept adds little, so the budget spreads over everything the scores
    see instead of piling onto the few highest-scored patches, which is what top R does to
    descriptions. Exact ties (all gains zero) go to the lowest index.

    scores: [B, N] >= 0 (attention or P-head probabilities); feats: [B, N, D] the visual tokens'
    hidden states (the kept ones are what the pruned layers carry). Static: R steps of O(N^2).
    """
    b, n = scores.shape
    if r == n:
        return jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32)[None], (b, n))
    w = jnp.maximum(scores.astype(jnp.float32), 0.0)
    w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-30)  # [B, N]
    keep = coverage_picks(coverage_similarity(feats), w, r, lambda t, gain: jnp.argmax(gain, axis=-1))  # [B, R]
    return jnp.sort(keep, axis=1)


def pruned_indices(is_image: jax.Array, img_pos: jax.Array, keep: jax.Array, size: int) -> jax.Array:  # [B, size]
    """Sequence positions of text tokens + kept visual tokens, ascending (original order).

    Right padding sits after every valid entry, so row b's first lengths[b] - N + R entries are
    its real tokens. size = S - N + R.
    """
    kept_pos = jnp.take_along_axis(img_pos, keep, axis=1)  # [B, R]
    rows = jnp.arange(is_image.shape[0])[:, None]
    keep_seq = (~is_image).at[rows, kept_pos].set(True)  # [B, S], exactly size True per row
    return jax.vmap(lambda m: jnp.nonzero(m, size=size, fill_value=0)[0])(keep_seq).astype(jnp.int32)


def text_in_pruned(is_image: jax.Array, idx: jax.Array, size: int) -> jax.Array:  # [B, size]
    """Where the text tokens sit in the pruned sequence idx (from pruned_indices), ascending: the
    rows FinalWipe keeps past layer Kf. size = S - N."""
    return jax.vmap(lambda m: jnp.nonzero(m, size=size, fill_value=0)[0])(~jnp.take_along_axis(is_image, idx, axis=1))


# ----------------------------------------------------------------------------------------------
# Keep rules as objects: one method, the kept indices


@dataclasses.dataclass(frozen=True)
class TopR:
    """The R highest scores (the published methods)."""

    def keep(self, scores: jax.Array, feats: jax.Array, r: int, key: jax.Array | None) -> jax.Array:  # [B, R]
        return select_visual(scores, r)


@dataclasses.dataclass(frozen=True)
class Cover:
    """Score-weighted coverage of the visual tokens (cover_visual)."""

    def keep(self, scores: jax.Array, feats: jax.Array, r: int, key: jax.Array | None) -> jax.Array:  # [B, R]
        return cover_visual(scores, feats, r)


@dataclasses.dataclass(frozen=True)
class SampleFromScores:
    """One Plackett-Luce draw of R tokens from the scores, a distribution over the visual tokens
    (the P-head's policy)."""

    def keep(self, scores: jax.Array, feats: jax.Array, r: int, key: jax.Array | None) -> jax.Array:  # [B, R]
        if key is None:
            raise TwigConfigError("select='sample' needs a PRNG key")
        return jnp.sort(gumbel_top_k(key, jnp.log(jnp.maximum(scores, 1e-30)), r, 1)[:, 0], axis=1)


KEEP_RULES = {"top": TopR(), "cover": Cover(), "sample": SampleFromScores()}
