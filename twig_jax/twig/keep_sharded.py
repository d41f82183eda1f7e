"""Keep rules across sequence shards: the N visual tokens split into S equal blocks on one mesh axis.

`exact_keep` returns the kept indices of the unsharded `KEEP_RULES` ("top", "sample", "cover");
`local_keep` keeps the top R / S of each block with no communication; `phead_softmax_scores` is
the P-head's head-averaged softmax over the visual tokens with its max and sum taken across
shards; `comm_bytes` says what each one moves (docs/design.md, "Sharding", "Keep rules across
shards"). Scores and features may arrive sharded on `axis` or not (shard_map places them); N not
divisible by S is padded with -inf scores to S * ceil(N / S), and padding is never kept.
`lax.top_k` only ever runs on a shard's own block or on the gathered candidates, never along a
sharded axis (it gave wrong results there on GPU meshes, jax-ml/jax#19271).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from twig_jax.twig.config import TwigConfigError
from twig_jax.twig.keep import KEEP_RULES, coverage_gains


def _pad_tokens(x: jax.Array, s: int, fill: float) -> jax.Array:  # [B, S * ceil(N / S), ...]
    pad = -x.shape[1] % s
    if not pad:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


def _placed(x: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
    """x laid out by spec on an Explicit mesh, where shard_map takes arrays as they are (on an
    Auto mesh it places them itself)."""
    if jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return x
    return jax.reshard(x, NamedSharding(mesh, spec))


def _block_indices(n_loc: int, axis: str) -> jax.Array:  # [n_loc] int32, this shard's global token indices
    return jax.lax.axis_index(axis).astype(jnp.int32) * n_loc + jnp.arange(n_loc, dtype=jnp.int32)


def _gather_tokens(x: jax.Array, axis: str) -> jax.Array:  # [B, S * n_loc, ...] the same on every shard
    return jax.lax.all_gather(x, axis, axis=1, tiled=True, to="invarying")


def _global_top(block: jax.Array, r: int, axis: str) -> jax.Array:  # [B, R] int32 ascending
    """The R largest of the sharded row, lower index first among equals (lax.top_k's rule).

    Every member of the global top R is in its own block's top R under that order, and the
    gathered candidates sit shard-major, each shard's in top_k order, so among equal values a
    lower position is a lower index: the candidates' top_k breaks ties as the unsharded one."""
    n_loc = block.shape[1]
    vals, loc = jax.lax.top_k(block, min(r, n_loc))  # [B, k]
    idx = _block_indices(n_loc, axis)[loc]
    _, pos = jax.lax.top_k(_gather_tokens(vals, axis), r)  # on the [B, S * k] candidates
    return jnp.sort(jnp.take_along_axis(_gather_tokens(idx, axis), pos, axis=1), axis=1)


def _top_body(n: int, r: int, axis: str):
    return lambda scores, feats, key: _global_top(scores, r, axis)


def _sample_body(n: int, r: int, axis: str):
    def body(scores, feats, key):  # scores [B, n_loc]
        b, n_loc = scores.shape
        # The unsharded rule's noise, drawn whole from the same key ([B, 1, N], as gumbel_top_k
        # draws one sample), and this shard's block of it: the perturbed scores are the same numbers.
        g = _pad_tokens(jax.random.gumbel(key, (b, 1, n), jnp.float32)[:, 0], jax.lax.axis_size(axis), 0.0)
        idx = _block_indices(n_loc, axis)
        g = jax.lax.dynamic_slice_in_dim(g, idx[0], n_loc, axis=1)
        perturbed = jnp.where(idx < n, jnp.log(jnp.maximum(scores, 1e-30)) + g, -jnp.inf)
        return _global_top(perturbed, r, axis)

    return body


def _cover_body(n: int, r: int, axis: str):
    def body(scores, feats, key):  # scores [B, n_loc]; feats [B, n_loc, D]
        n_loc = scores.shape[1]
        # Every gain sums over all N tokens, so every shard needs all weights and features (one
        # gather each); the shard keeps only its own candidates' similarity rows, [B, n_loc, N].
        # Weights and normalised features are computed from [B, N] / [B, N, D] exactly as
        # cover_visual computes them, so the sums are over the same N terms.
        w = jnp.maximum(_gather_tokens(scores, axis)[:, :n].astype(jnp.float32), 0.0)
        w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-30)  # [B, N]
        f = _gather_tokens(feats, axis)[:, :n].astype(jnp.float32)
        f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)  # [B, N, D]
        idx = _block_indices(n_loc, axis)
        mine = jax.lax.dynamic_slice_in_dim(_pad_tokens(f, jax.lax.axis_size(axis), 0.0), idx[0], n_loc, axis=1)
        sim = jnp.maximum(jnp.einsum("bid,bjd->bij", mine, f), 0.0)  # [B, n_loc, N] rows of coverage_similarity

        def pick(t, carry):
            order, covered = carry  # [B, R] int32 picks so far, [B, N] best similarity to them (both replicated)
            taken = jnp.any((order[:, :, None] == idx) & (jnp.arange(r) < t)[None, :, None], axis=1)  # [B, n_loc]
            gain = jnp.where(taken, -1.0, coverage_gains(sim, w, covered))
            gain = jnp.where(idx < n, gain, -2.0)  # padding: below every real token, taken ones included
            best = jnp.argmax(gain, axis=1)  # [B], the lowest local index among equal gains
            cand = jnp.stack([jnp.take_along_axis(gain, best[:, None], 1)[:, 0], idx[best].astype(jnp.float32)], -1)
            every = jax.lax.all_gather(cand, axis, to="invarying")  # [S, B, 2] (gain, index), one small gather
            shard = jnp.argmax(every[..., 0], axis=0)  # first maximal shard: the lowest global index
            i = jnp.take_along_axis(every[..., 1], shard[None], 0)[0].astype(jnp.int32)  # [B]
            # The chosen token's similarity row from its owner (the others add exact zeros).
            own = i - idx[0]
            row = jnp.take_along_axis(sim, jnp.clip(own, 0, n_loc - 1)[:, None, None], axis=1)[:, 0]  # [B, N]
            row = jax.lax.psum(jnp.where(((own >= 0) & (own < n_loc))[:, None], row, 0.0), axis)
            return order.at[:, t].set(i), jnp.maximum(covered, row)

        init = (jnp.zeros((scores.shape[0], r), jnp.int32), jnp.zeros((scores.shape[0], n), jnp.float32))
        return jnp.sort(jax.lax.fori_loop(0, r, pick, init)[0], axis=1)

    return body


_EXACT_BODIES = {"top": _top_body, "sample": _sample_body, "cover": _cover_body}
assert _EXACT_BODIES.keys() == KEEP_RULES.keys()


def exact_keep(rule_name: str, scores: jax.Array, feats: jax.Array | None, r: int, key: jax.Array | None, *,
               mesh: Mesh, axis: str) -> jax.Array:  # [B, R] int32, ascending, replicated over `axis`
    """KEEP_RULES[rule_name].keep(scores, feats, r, key) with the visual tokens split on `axis`.

    scores: [B, N]; feats: [B, N, D] (the "cover" rule only, else may be None); key: the PRNG key
    ("sample" only). Equal kept indices for the same inputs, ties included: "top" and "sample" by
    the same top_k tie rule (lower index first); "cover" by the same greedy, each pick the largest
    gain with the lowest index among equal gains. Traceable: call it inside jit.
    """
    if rule_name not in _EXACT_BODIES:
        raise TwigConfigError(f"keep rule {rule_name!r} is not one of {sorted(_EXACT_BODIES)}")
    b, n = scores.shape
    if not 0 < r <= n:
        raise TwigConfigError(f"cannot keep R={r} of N={n} visual tokens")
    if rule_name == "cover" and feats is None:
        raise TwigConfigError("keep rule 'cover' needs the visual tokens' features")
    if rule_name == "sample" and key is None:
        raise TwigConfigError("select='sample' needs a PRNG key")
    if r == n:  # what every unsharded rule returns then: everything, in order
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (b, n))
    s = mesh.shape[axis]
    feats = jnp.zeros((b, n, 1), jnp.float32) if feats is None else feats
    key = jax.random.key(0) if key is None else key  # unread by "top" and "cover"
    body = _EXACT_BODIES[rule_name](n, r, axis)
    specs = (P(None, axis), P(None, axis, None), P())
    args = (_pad_tokens(scores, s, -jnp.inf), _pad_tokens(feats, s, 0.0), key)
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P())(
        *(_placed(x, mesh, spec) for x, spec in zip(args, specs)))


def local_keep(scores: jax.Array, r: int, *, mesh: Mesh, axis: str) -> jax.Array:  # [B, R] int32 on `axis`
    """Each shard keeps the top R / S of its own block (lower index first among equals), no
    communication: an approximation of the global top R that spreads the budget evenly over
    the blocks. Ascending; the result is itself sharded on `axis`, block s's picks in columns
    s R / S .. (s + 1) R / S - 1. scores: [B, N]."""
    n = scores.shape[1]
    s = mesh.shape[axis]
    if r % s:
        raise TwigConfigError(f"local keep needs R divisible by the shard count S: R={r}, S={s}")
    n_loc = -(-n // s)
    fewest = max(0, n - (s - 1) * n_loc)  # real tokens in the last block
    if r // s > fewest:
        raise TwigConfigError(f"local keep of R={r} over S={s} shards needs {r // s} tokens from every block; "
                              f"N={n} leaves the last block {fewest}")

    def body(block):  # [B, n_loc]
        _, loc = jax.lax.top_k(block, r // s)
        return _block_indices(n_loc, axis)[jnp.sort(loc, axis=1)]

    return jax.shard_map(body, mesh=mesh, in_specs=P(None, axis), out_specs=P(None, axis))(
        _placed(_pad_tokens(scores, s, -jnp.inf), mesh, P(None, axis)))


def phead_softmax_scores(logits: jax.Array, *, mesh: Mesh, axis: str) -> jax.Array:  # [B, N] float32
    """mean_h softmax_N(logits), the P-head's scores (phead.phead_scores), with the visual tokens
    split on `axis`: one max and one sum per head across shards. logits: [B, H, N] (phead_logits).
    Sharded on `axis` when S divides N; otherwise the padded scores are gathered and cut to N."""
    n = logits.shape[2]
    padded = jnp.pad(logits.astype(jnp.float32), [(0, 0), (0, 0), (0, -n % mesh.shape[axis])],
                     constant_values=-jnp.inf)

    def body(block):  # [B, H, n_loc]
        top = jax.lax.stop_gradient(jax.lax.pmax(jnp.max(block, axis=2, keepdims=True), axis))  # [B, H, 1]
        e = jnp.exp(block - top)
        return jnp.mean(e / jax.lax.psum(jnp.sum(e, axis=2, keepdims=True), axis), axis=1)

    spec = P(None, None, axis)
    out = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=P(None, axis))(_placed(padded, mesh, spec))
    return _placed(out, mesh, P())[:, :n] if n % mesh.shape[axis] else out  # padded: gathered, then cut


def comm_bytes(b: int, n: int, r: int, s: int, dtype, *, feature_dim: int, heads: int) -> dict[str, int]:
    """Bytes each device receives per call, by rule, with ring collectives: an all-gather of M
    bytes per shard receives (S - 1) M, an all-reduce of M bytes 2 (S - 1) / S M. Scores and
    features in `dtype`, indices int32, the sampled rule's perturbed scores and the cover
    rule's gains and similarity rows float32; "phead_softmax" is phead_softmax_scores (with
    the gather of its padded result when S does not divide N)."""
    item = np.dtype(dtype).itemsize
    n_loc = -(-n // s)
    k = min(r, n_loc)
    gather = lambda per_shard: (s - 1) * per_shard
    reduce = lambda m: 2 * (s - 1) * m / s
    everything = r == n  # the exact rules return every token without communicating
    cover_step = gather(b * 2 * 4) + reduce(b * n * 4)
    per_rule = {
        "top": 0 if everything else gather(b * k * (item + 4)),
        "sample": 0 if everything else gather(b * k * (4 + 4)),
        "cover": 0 if everything else gather(b * n_loc * item * (1 + feature_dim)) + r * cover_step,
        "local": 0,
        "phead_softmax": 2 * reduce(b * heads * 4) + (gather(b * n_loc * 4) if n % s else 0),
    }
    return {rule: round(v) for rule, v in per_rule.items()}

