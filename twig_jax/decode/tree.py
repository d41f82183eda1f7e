"""Tree self-speculative decoding (TwigVLM++ / EAGLE-2): the twig drafts a tree, the pruned target
verifies every node in one pass (docs/design.md, "Tree drafting").

A round, from the last emitted token x_0 (the root, not yet in any cache, at RoPE position cur):
  * draft level 1: x_0 through the trunk; the twig catches up on the tokens the last round
    accepted (their layer-K states are pending) and runs x_0; its top-E tokens are the level-1
    candidates, scored by their log-probability;
  * levels 2..D: the frontier (the E best nodes of the previous level) runs through trunk + twig in
    one pass with a tree mask (a node sees the committed tokens, the root and its own ancestors);
    each proposes its top-E children, and the next frontier is the global top-E of the E*E;
  * the N best candidates by cumulative log-probability are kept (scores fall along every path
    and ties keep the earlier, shallower node, so a kept node's parent is kept) in pool order,
    which puts parents before children;
  * verification: trunk, middle and tail groups on the root and the N nodes in one pass, a node's
    position being cur + its depth;
  * acceptance: greedy, the deepest node whose every token equals the target's argmax at its
    parent (ties: the earliest), plus the target's argmax after it; sampling, a walk from the root
    that draws the target's token at each node and descends to the child holding it, else emits
    the draw and stops (lossless for deterministic top-E proposals);
  * commit: the accepted path's entries move to the slots after the root in every verified group
    (one gather and scatter of at most D entries); the tree's other entries are dropped. The twig
    recomputes its entries for the committed tokens at the next round's first level (their
    layer-K states come from the verification pass), which costs no extra pass.
Static shapes throughout: E, D, N and the scratch region are compile-time constants; parents,
depths and masks are data. One `lax.while_loop` over rounds, per-row trees, EOS and budgets.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.experimental
import jax.numpy as jnp

from twig_jax.decode.plain import suppress_eos
from twig_jax.decode.prune import (LayerWeights, PrunePlan, TTPPrefill, TwigCaches, base_layers, twig_layers,
                                   ttp_prefill)
from twig_jax.decode.sampling import SamplingConfig, filtered_logits
from twig_jax.decode.speculative import SSDOutput, emitted_tokens, first_token
from twig_jax.model.cache import KVCache
from twig_jax.model.llama import run_layers
from twig_jax.model.llava import Llava
from twig_jax.twig.config import TreeShape, TwigConfigError
from twig_jax.twig.module import Twig


# ----------------------------------------------------------------------------------------------
# Topology (pure, per row; checked against numpy in the tests)


def ancestors(parent: jax.Array, depth: int) -> jax.Array:  # [B, M, M] bool
    """anc[b, i, j]: node j is node i or one of its ancestors. parent: [B, M], the root (index 0)
    its own parent; depth: the tree's depth (the longest chain of parents)."""
    m = parent.shape[1]
    step = jax.nn.one_hot(parent, m, dtype=jnp.bool_)  # [B, M, M]: i -> parent(i)
    anc = jnp.eye(m, dtype=jnp.bool_)[None] | step
    hop = step
    for _ in range(depth - 1):
        hop = jnp.einsum("bij,bjk->bik", hop.astype(jnp.int32), step.astype(jnp.int32)) > 0
        anc = anc | hop
    return anc


def greedy_path(tokens: jax.Array, parent: jax.Array, node_depth: jax.Array, target_argmax: jax.Array,
                depth: int) -> jax.Array:  # [B] the deepest accepted node
    """A node is accepted when its token equals the target's argmax at its parent and its parent is
    accepted (the root always is); the deepest accepted node, ties to the earliest index.

    tokens, parent, node_depth, target_argmax: [B, M] (index 0 the root)."""
    m = tokens.shape[1]
    match = jnp.take_along_axis(target_argmax, parent, axis=1) == tokens  # [B, M]
    match = match.at[:, 0].set(True)
    acc = match
    for _ in range(depth):
        acc = match & jnp.take_along_axis(acc, parent, axis=1)
    rank = jnp.where(acc, node_depth * (m + 1) + (m - jnp.arange(m)[None]), -1)
    return jnp.argmax(rank, axis=1).astype(jnp.int32)


def path_to(anc: jax.Array, node_depth: jax.Array, node: jax.Array, depth: int) -> jax.Array:  # [B, D]
    """Indices of node's ancestors at depths 1..D (entry k-1: depth k; 0 past node's depth)."""
    row = jnp.take_along_axis(anc, node[:, None, None], axis=1)[:, 0]  # [B, M]
    at = row[:, None, :] & (node_depth[:, None, :] == jnp.arange(1, depth + 1)[None, :, None])  # [B, D, M]
    return jnp.argmax(at, axis=2).astype(jnp.int32)


def scratch_mask(capacity: int, committed: jax.Array, base: jax.Array, allowed: jax.Array) -> jax.Array:
    """Attention mask [B, Q, S] over a cache: every committed slot (< committed [B]) and, in the
    scratch region from base [B], the slots allowed [B, Q, W] marks."""
    w = allowed.shape[2]
    slot = jnp.arange(capacity)[None, None, :]  # [1, 1, S]
    rel = slot - base[:, None, None]  # [B, 1, S]
    inside = (rel >= 0) & (rel < w)
    idx = jnp.broadcast_to(jnp.clip(rel, 0, w - 1), allowed.shape[:2] + (capacity,))
    return (slot < committed[:, None, None]) | (inside & jnp.take_along_axis(allowed, idx, axis=2))


def move_entries(cache: KVCache, base: jax.Array, src: jax.Array, n: jax.Array) -> KVCache:
    """Entries at slots base + src[:, k] move to base + 1 + k for k < n (the accepted path after the
    root at base); lengths are left to the caller. src: [B, A] scratch offsets; n: [B]."""
    a = src.shape[1]
    k = jnp.arange(a)[None]
    dst = base[:, None] + 1 + k  # [B, A]
    srcs = jnp.where(k < n[:, None], base[:, None] + src, dst)
    rows = jnp.arange(dst.shape[0])[:, None, None]

    def move_v(x):  # [B, H, S, Dh]
        g = jnp.take_along_axis(x, srcs[:, None, :, None], axis=2)  # [B, H, A, Dh]
        heads = jnp.arange(x.shape[1])[None, :, None]
        return x.at[rows, heads, dst[:, None, :]].set(g)

    def move_k(x):  # [B, H, Dh, S]
        g = jnp.take_along_axis(x, srcs[:, None, None, :], axis=3)  # [B, H, Dh, A]
        heads = jnp.arange(x.shape[1])[None, :, None]
        return x.at[rows, heads, :, dst[:, None, :]].set(g.transpose(0, 1, 3, 2))

    if isinstance(cache.k, tuple):
        return cache.replace(k=tuple(map(move_k, cache.k)), v=tuple(map(move_v, cache.v)))
    return cache.replace(k=jax.vmap(move_k)(cache.k), v=jax.vmap(move_v)(cache.v))


# ----------------------------------------------------------------------------------------------
# The round loop


@flax.struct.dataclass
class TreeState:
    """The carry of the round loop."""

    out: jax.Array  # [B, out_len + D + 1]
    count: jax.Array  # [B] generated tokens per row
    done: jax.Array  # [B] bool
    last_token: jax.Array  # [B] the root of the next tree
    caches: TwigCaches  # the twig cache's length counts only the tokens it has run
    pending: jax.Array  # [B, D + 1, Dm] layer-K states of committed tokens the twig has not run
    n_pending: jax.Array  # [B]
    key: jax.Array
    rounds: jax.Array  # [B]
    verified: jax.Array  # [B] nodes verified
    accepted: jax.Array  # [B] accepted drafts
    deepest: jax.Array  # [B] deepest accepted path


def _run(model_cfg, layers, x, positions, cache: KVCache, write_start, mask, start: int, stop: int,
         cache_offset: int = 0):
    out = run_layers(model_cfg, layers, x, positions, cache.k, cache.v, write_start, start=start, stop=stop,
                     cache_offset=cache_offset, mask=mask)
    return cache.replace(k=out.k, v=out.v), out.hidden


def tree_loop(model: Llava, twig: Twig, plan: PrunePlan, tree: TreeShape, caches: TwigCaches, logits: jax.Array,
              active: jax.Array, key: jax.Array, max_new_tokens: jax.Array, *, out_len: int,
              sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int, weights: LayerWeights | None = None,
              on_round=None, min_new_tokens: jax.Array | int = 0) -> SSDOutput:
    """Generate up to max_new_tokens (<= out_len) per row by tree draft / verify rounds.

    caches: from ttp_prefill with the twig, with tree.extra_slots(out_len) headroom; logits [B, V]
    after the prompt. Returns SSDOutput with drafted = nodes verified. on_round as ssd_loop's.
    """
    if caches.twig is None:
        raise TwigConfigError("tree drafting needs the twig cache: run ttp_prefill with a twig")
    tc = model.cfg.text
    b = logits.shape[0]
    E, D, N = tree.width, tree.depth, tree.nodes
    W = tree.draft_scratch
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    base_w, twig_w = base_layers(model, weights), twig_layers(twig, weights)
    dm = tc.hidden_size
    dtype = model.text.embed[...].dtype

    key, sub = jax.random.split(key)
    first = first_token(logits, active, sub, max_new_tokens, out_len=out_len, width=D + 1, sampling=sampling,
                        eos=eos, pad_id=pad_id, min_new_tokens=min_new_tokens, on_round=on_round)
    zeros = jnp.zeros((b,), jnp.int32)

    def log_probs(lg, generated):  # [..., V] -> [..., V] the draft's log-probabilities
        return jax.nn.log_softmax(suppress_eos(lg.astype(jnp.float32), eos, generated, min_new_tokens), axis=-1)

    def body(st: TreeState) -> TreeState:
        key, k_acc = jax.random.split(st.key)
        c = st.caches
        cur = c.trunk.lengths  # [B] committed tokens (== RoPE position of the root)
        live = ~st.done

        # Level 1: the root through the trunk; the twig runs the pending committed tokens and the root.
        trunk, h0 = _run(tc, base_w, model.text.embed_tokens(st.last_token[:, None]), cur[:, None], c.trunk, cur,
                         None, 0, plan.K)
        j = jnp.arange(D + 2)[None]  # [1, D+2]
        pend = jnp.concatenate([st.pending, jnp.zeros((b, 1, dm), dtype)], axis=1)  # [B, D+2, Dm]
        tw_in = jnp.where((j == st.n_pending[:, None])[..., None], h0, pend)
        tw_start = cur - st.n_pending
        tw, tw_h = _run(tc, twig_w, tw_in, tw_start[:, None] + j, c.twig, tw_start, None, 0, twig.twig_cfg.T)
        root_lq = twig.logits(jnp.take_along_axis(tw_h, st.n_pending[:, None, None], axis=1))[:, 0]  # [B, V]
        lp1, tok1 = jax.lax.top_k(log_probs(root_lq, st.count), E)  # [B, E]

        pool_tok = jnp.zeros((b, tree.pool), jnp.int32).at[:, :E].set(tok1)
        pool_par = jnp.full((b, tree.pool), -1, jnp.int32)
        pool_depth = jnp.ones((b, tree.pool), jnp.int32)
        pool_score = jnp.zeros((b, tree.pool), jnp.float32).at[:, :E].set(lp1)
        fr_tok, fr_score = tok1, lp1
        fr_pool = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32)[None], (b, E))
        own = jax.nn.one_hot(1 + jnp.arange(E), W, dtype=jnp.bool_)  # [E, W] each frontier node's slot
        fr_anc = (own | (jnp.arange(W) == 0)[None])[None].repeat(b, axis=0)  # [B, E, W]

        for level in range(2, D + 1):  # expand the frontier of level - 1
            at = cur + 1 + (level - 2) * E  # its scratch slots
            pos = jnp.broadcast_to((cur + level - 1)[:, None], (b, E))
            mask = scratch_mask(trunk.capacity, cur, cur, fr_anc)
            trunk, hf = _run(tc, base_w, model.text.embed_tokens(fr_tok), pos, trunk, at, mask, 0, plan.K)
            tw, tf = _run(tc, twig_w, hf, pos, tw, at, scratch_mask(tw.capacity, cur, cur, fr_anc), 0,
                          twig.twig_cfg.T)
            clp, ctok = jax.lax.top_k(log_probs(twig.logits(tf), (st.count + level - 1)[:, None]), E)  # [B, E, E]
            cscore = (fr_score[:, :, None] + clp).reshape(b, E * E)
            first = E + (level - 2) * E * E
            pool_tok = pool_tok.at[:, first:first + E * E].set(ctok.reshape(b, E * E))
            pool_par = pool_par.at[:, first:first + E * E].set(jnp.repeat(fr_pool, E, axis=1))
            pool_depth = pool_depth.at[:, first:first + E * E].set(level)
            pool_score = pool_score.at[:, first:first + E * E].set(cscore)
            if level < D:
                best_score, best = jax.lax.top_k(cscore, E)  # [B, E], ties to the earlier candidate
                parent_slot = best // E
                own = jax.nn.one_hot(1 + (level - 1) * E + jnp.arange(E), W, dtype=jnp.bool_)
                fr_anc = jnp.take_along_axis(fr_anc, parent_slot[..., None], axis=1) | own[None]
                fr_tok = jnp.take_along_axis(ctok.reshape(b, E * E), best, axis=1)
                fr_score, fr_pool = best_score, first + best

        # Keep the N best candidates in pool order (parents first); index 0 of the verified tree is the root.
        _, kept = jax.lax.top_k(pool_score, N)
        kept = jnp.sort(kept, axis=1)  # [B, N]
        inv = jnp.zeros((b, tree.pool), jnp.int32).at[jnp.arange(b)[:, None], kept].set(1 + jnp.arange(N)[None])
        par = jnp.take_along_axis(pool_par, kept, axis=1)
        par = jnp.where(par < 0, 0, jnp.take_along_axis(inv, jnp.maximum(par, 0), axis=1))
        tokens_v = jnp.concatenate([st.last_token[:, None], jnp.take_along_axis(pool_tok, kept, axis=1)], axis=1)
        parent_v = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), par], axis=1)  # [B, N+1]
        depth_v = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.take_along_axis(pool_depth, kept, axis=1)],
                                  axis=1)
        anc = ancestors(parent_v, D)  # [B, N+1, N+1]

        # Verification: the root and the N nodes through trunk, middle and tail in one pass.
        pos = cur[:, None] + depth_v
        trunk, hv = _run(tc, base_w, model.text.embed_tokens(tokens_v), pos, trunk, cur,
                         scratch_mask(trunk.capacity, cur, cur, anc), 0, plan.K)
        mid, h = _run(tc, base_w, hv, pos, c.mid, c.mid.lengths,
                      scratch_mask(c.mid.capacity, c.mid.lengths, c.mid.lengths, anc), plan.K, plan.Kf, plan.K)
        tail = c.tail
        if plan.Kf < plan.L:
            tail, h = _run(tc, base_w, h, pos, c.tail, c.tail.lengths,
                           scratch_mask(c.tail.capacity, c.tail.lengths, c.tail.lengths, anc), plan.Kf, plan.L,
                           plan.Kf)
        target_logits = suppress_eos(model.text.logits(h), eos, st.count[:, None] + depth_v, min_new_tokens)

        if sampling.greedy:
            y = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, N+1]
            node = greedy_path(tokens_v, parent_v, depth_v, y, D)
            bonus = jnp.take_along_axis(y, node[:, None], axis=1)[:, 0]
        else:
            node, bonus = sample_walk(tokens_v, parent_v, target_logits, sampling, k_acc, D)
        a = jnp.take_along_axis(depth_v, node[:, None], axis=1)[:, 0]  # [B] accepted drafts
        path = path_to(anc, depth_v, node, D)  # [B, D] verify indices of the path
        path_tok = jnp.concatenate([jnp.take_along_axis(tokens_v, path, axis=1), jnp.zeros((b, 1), jnp.int32)], 1)
        vals, n_emit, hit_eos = emitted_tokens(path_tok, a, bonus, max_new_tokens - st.count, st.done, eos, pad_id)
        out = jax.vmap(lambda o, x, s: jax.lax.dynamic_update_slice(o, x, (s,)))(st.out, vals, st.count)
        if on_round is not None:
            jax.experimental.io_callback(on_round, None, vals, n_emit, jnp.where(st.done, 0, a), ordered=True)
        count = st.count + n_emit

        # Commit: the path's entries follow the root in every verified group; the twig gets them next round.
        adv = jnp.where(live, a + 1, 0)
        n_move = jnp.where(live, a, 0)
        trunk = move_entries(trunk, cur, path, n_move).replace(lengths=cur + adv)
        mid = move_entries(mid, c.mid.lengths, path, n_move).replace(lengths=c.mid.lengths + adv)
        tail = move_entries(tail, c.tail.lengths, path, n_move).replace(lengths=c.tail.lengths + adv)
        committed = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), path], axis=1)  # [B, D+1]: root + path
        pending = jnp.where(live[:, None, None], jnp.take_along_axis(hv, committed[..., None], axis=1), st.pending)
        tw = tw.replace(lengths=jnp.where(live, cur, c.twig.lengths))
        return TreeState(out, count, st.done | hit_eos | (count >= max_new_tokens),
                         jnp.where(live, bonus, st.last_token), TwigCaches(trunk, tw, mid, tail), pending,
                         jnp.where(live, a + 1, st.n_pending), key, st.rounds + live.astype(jnp.int32),
                         st.verified + jnp.where(live, N, 0), st.accepted + jnp.where(live, a, 0),
                         jnp.maximum(st.deepest, jnp.where(live, a, 0)))

    init = TreeState(first.out, first.count, first.done, first.token, caches, jnp.zeros((b, D + 1, dm), dtype), zeros,
                     key, zeros, zeros, zeros, zeros)
    st = jax.lax.while_loop(lambda st: ~jnp.all(st.done), body, init)
    return SSDOutput(st.out[:, :out_len], st.count, st.rounds, st.verified, st.accepted, st.deepest)


def sample_walk(tokens: jax.Array, parent: jax.Array, target_logits: jax.Array, sampling: SamplingConfig,
                key: jax.Array, depth: int) -> tuple[jax.Array, jax.Array]:  # node [B], bonus [B]
    """Sampling acceptance: from the root, draw the target's token at the current node; descend to
    the child that holds it if there is one, else stop and emit the draw. Every emitted token is a
    draw from the target's distribution, so the output is distributed as plain sampling."""
    b, m = tokens.shape
    logp = jax.nn.log_softmax(filtered_logits(target_logits.reshape(b * m, -1), sampling), axis=-1)
    logp = logp.reshape(b, m, -1)
    idx = jnp.arange(m)[None]

    def step(k, carry):
        node, stopped, bonus = carry
        lp = jnp.take_along_axis(logp, node[:, None, None], axis=1)[:, 0]  # [B, V]
        draw = jax.random.categorical(jax.random.fold_in(key, k), lp, axis=-1).astype(jnp.int32)
        child = (parent == node[:, None]) & (tokens == draw[:, None]) & (idx > 0)  # [B, M]
        has = jnp.any(child, axis=1) & ~stopped
        bonus = jnp.where(stopped, bonus, draw)
        node = jnp.where(has, jnp.argmax(child, axis=1).astype(jnp.int32), node)
        return node, stopped | ~has, bonus

    zeros = jnp.zeros((b,), jnp.int32)
    node, _, bonus = jax.lax.fori_loop(0, depth + 1, step, (zeros, jnp.zeros((b,), bool), zeros))
    return node, bonus


def tree_generate(model: Llava, twig: Twig, plan: PrunePlan, tree: TreeShape, tokens: jax.Array, lengths: jax.Array,
                  pixel_values: jax.Array, active: jax.Array, key: jax.Array, max_new_tokens: jax.Array, *,
                  out_len: int, sampling: SamplingConfig = SamplingConfig(), eos_ids: tuple[int, ...] = (),
                  pad_id: int = 0, weights: LayerWeights | None = None, on_step=None,
                  min_new_tokens: jax.Array | int = 0) -> tuple[SSDOutput, TTPPrefill]:
    """TTP prefill (with the twig cache and the tree's headroom) + tree rounds."""
    key_prune, key_dec = jax.random.split(key)
    pre = ttp_prefill(model, twig, plan, tokens, lengths, pixel_values, extra=tree.extra_slots(out_len),
                      key=key_prune, weights=weights)
    out = tree_loop(model, twig, plan, tree, pre.caches, pre.logits, active, key_dec, max_new_tokens,
                    out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id, weights=weights,
                    on_round=on_step, min_new_tokens=min_new_tokens)
    return out, pre


@dataclasses.dataclass(frozen=True)
class TreeDrafter:
    """Tree self-speculative decoding as a generator's decoding (TwigGenerator(spec=...))."""

    tree: TreeShape
    uses_twig = True

    def extra_slots(self, plan: PrunePlan, out_len: int) -> int:
        return self.tree.extra_slots(out_len)

    def generate(self, model: Llava, twig: Twig, plan: PrunePlan, tokens, lengths, pixel_values, active, key,
                 max_new_tokens, **kw) -> tuple[SSDOutput, TTPPrefill]:
        return tree_generate(model, twig, plan, self.tree, tokens, lengths, pixel_values, active, key,
                             max_new_tokens, **kw)
