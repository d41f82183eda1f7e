"""Self-speculative decoding (SSD, docs/design.md, "Self-speculative decoding"): the twig drafts, the pruned base verifies.

Draft model = trunk (base layers 0..K-1) + twig layers + twig norm/head; target = the full base
model with TTP pruning and FinalWipe (twig_jax.decode.prune). One jitted `lax.while_loop` over rounds, no
host sync inside; batch > 1 with per-row acceptance, EOS and budgets.

A round, from the last emitted token x_0 = t0 (not yet in any cache, at RoPE position cur =
trunk length):
  * drafting: step j = 0..delta runs x_j through trunk + twig (writing both caches), keeps the
    layer-K hidden state h_j and drafts x_{j+1} = d_{j+1}. A row proposes d_1..d_m, m <= delta,
    stopping after the first draft whose top probability is below theta (that draft is still
    proposed). Step m is still run for the row, so that h_m (for verification) and the twig
    entry of d_m exist; the inner loop exits once every row has run its step m.
  * verification: base layers K..L-1 (middle and tail groups) on h_0..h_delta in one pass,
    causal by slot; the target's prediction after x_0..x_k is y_{k+1}.
  * greedy acceptance: the longest prefix with d_k == y_k (k <= m), plus the target's own next
    token y_{a+1}; sampling: standard speculative rejection sampling (lossless).
  * rollback: every group's per-row length becomes (length at round start) + a + 1; the stale
    slots past it are masked and overwritten by later rounds.
Entries beyond a row's m are computed (static shapes) but never accepted. Caches need
`delta + 1` slots of headroom past the last emitted token (ssd_extra_slots).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.experimental
import jax.numpy as jnp

from twig_jax.model.llava import Llava
from twig_jax.decode.sampling import SamplingConfig, filtered_logits, sample_logits
from twig_jax.decode.prune import (
    LayerWeights, PrunePlan, TTPPrefill, TwigCaches, target_step, trunk_step, ttp_prefill, twig_step,
)
from twig_jax.twig.module import Twig
from twig_jax.twig.config import TwigConfigError


class SSDOutput(NamedTuple):
    tokens: jax.Array  # [B, out_len] generated tokens, pad after each row's count
    count: jax.Array  # [B] generated tokens per row
    rounds: jax.Array  # [B] draft/verify rounds each row took part in
    drafted: jax.Array  # [B] draft tokens proposed
    accepted: jax.Array  # [B] draft tokens the verifier accepted (EOS / the budget may cut the last round)


def ssd_extra_slots(plan: PrunePlan, out_len: int) -> int:
    """Cache slots each group needs beyond the prompt: new tokens + a full round of drafts."""
    return out_len + plan.draft_len + 1


def _probs(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:  # [..., V] float32
    """The distribution a token is drawn from (greedy: plain softmax, used only for theta)."""
    if sampling.greedy:
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    shape = logits.shape
    flat = filtered_logits(logits.reshape(-1, shape[-1]), sampling)
    return jax.nn.softmax(flat, axis=-1).reshape(shape)


def _leading_true(x: jax.Array) -> jax.Array:  # [B] int32
    """Length of the all-True prefix of each row of x [B, T]."""
    return jnp.sum(jnp.cumprod(x.astype(jnp.int32), axis=1), axis=1)


def rejection_sample(p: jax.Array, q: jax.Array, drafts: jax.Array, n_draft: jax.Array,
                     key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative rejection sampling for one round.  # a [B], final token [B]

    p: [B, delta+1, V] target distributions after x_0..x_k; q: [B, delta+1, V] the draft
    distributions d_{k+1} was drawn from; drafts: [B, delta+1] (d_1..d_{delta+1}); n_draft: [B]
    drafts proposed. Draft k+1 is accepted with probability min(1, p_k(d)/q_k(d)); on the
    first rejection the replacement is drawn from normalise(max(0, p_k - q_k)); when all m
    drafts are accepted the bonus token is drawn from p_m.
    """
    delta = drafts.shape[1] - 1
    k_u, k_s = jax.random.split(key)
    d = drafts[:, :delta, None]
    pd = jnp.take_along_axis(p[:, :delta], d, axis=2)[..., 0]  # [B, delta]
    qd = jnp.take_along_axis(q[:, :delta], d, axis=2)[..., 0]
    u = jax.random.uniform(k_u, pd.shape, jnp.float32)
    acc = (u * qd < pd) & (jnp.arange(delta)[None] < n_draft[:, None])
    a = _leading_true(acc)  # [B]
    pa = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]  # [B, V]
    qa = jnp.take_along_axis(q, a[:, None, None], axis=1)[:, 0]
    res = jnp.maximum(pa - qa, 0.0)
    mass = jnp.sum(res, axis=-1, keepdims=True)
    use_p = (a >= n_draft)[:, None] | (mass <= 1e-12)
    dist = jnp.where(use_p, pa, res / jnp.where(mass > 0, mass, 1.0))
    final = jax.random.categorical(k_s, jnp.log(dist), axis=-1).astype(jnp.int32)
    return a, final


def ssd_loop(model: Llava, twig: Twig, plan: PrunePlan, caches: TwigCaches, logits: jax.Array, active: jax.Array,
             key: jax.Array, max_new_tokens: jax.Array, *, out_len: int, sampling: SamplingConfig,
             eos_ids: tuple[int, ...], pad_id: int, on_round=None, weights: LayerWeights | None = None) -> SSDOutput:
    """Generate up to max_new_tokens (<= out_len) per row by draft/verify rounds.

    caches: from ttp_prefill with the twig (its capacities need ssd_extra_slots headroom);
    logits: [B, V] target next-token logits after the prompt; active: [B] (False = padding row).
    on_round: optional host function (streaming, twig_jax.decode.stream), called through an ordered
    `io_callback` as on_round(tokens [B, delta+1], n_emit [B], n_accepted [B]) with the first
    token and then every round's emitted tokens (the first min(n_accepted, n_emit) are accepted
    drafts). Static: None (the default) traces no callback at all. weights: per-layer base / twig
    weights matching the caches' layout (ttp.LayerWeights; None: the stacked arrays).
    """
    if caches.twig is None:
        raise TwigConfigError("SSD needs the twig cache: run ttp_prefill with a twig")
    b, v = logits.shape
    delta = plan.draft_len
    d_model = model.cfg.text.hidden_size
    greedy = sampling.greedy
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    slots = jnp.arange(delta + 1, dtype=jnp.int32)

    key, sub = jax.random.split(key)
    done = ~active
    t0 = jnp.where(done, pad_id, sample_logits(logits, sub, sampling))
    count = (~done).astype(jnp.int32)
    done = done | jnp.isin(t0, eos) | (count >= max_new_tokens)
    out = jnp.full((b, out_len + delta + 1), pad_id, jnp.int32).at[:, 0].set(t0)
    zeros = jnp.zeros((b,), jnp.int32)
    if on_round is not None:
        jax.experimental.io_callback(on_round, None, out[:, :delta + 1], count, zeros, ordered=True)

    def draft(trunk, twig_cache, t0, live, key):
        """Steps j = 0..max m through trunk + twig.  # hs [B, delta+1, D], drafts [B, delta+1], q, n_draft [B]"""
        cur = trunk.lengths
        hs = jnp.zeros((b, delta + 1, d_model), model.text.embed[...].dtype)
        drafts = jnp.zeros((b, delta + 1), jnp.int32)
        qs = jnp.zeros((b, delta + 1, v), jnp.float32) if not greedy else jnp.zeros((b, 0, v), jnp.float32)

        def cond(st):
            j, _, _, _, _, _, _, n_draft, stopped = st
            need = jnp.where(stopped, j <= n_draft, True) & live  # finished rows never extend the loop
            return (j <= delta) & jnp.any(need)

        def body(st):
            j, x, trunk, tw, hs, drafts, qs, n_draft, stopped = st
            trunk, h = trunk_step(model, plan, trunk, x[:, None], weights)  # h: [B, 1, D]
            tw, lq = twig_step(twig, tw, h, (cur + j)[:, None], weights)
            q = _probs(lq[:, 0], sampling)  # [B, V]
            if greedy:
                d = jnp.argmax(lq[:, 0], axis=-1).astype(jnp.int32)
            else:
                d = jax.random.categorical(jax.random.fold_in(key, j), jnp.log(q), axis=-1).astype(jnp.int32)
                qs = jax.lax.dynamic_update_slice(qs, q[:, None], (0, j, 0))
            pmax = jnp.max(q, axis=-1)
            hs = jax.lax.dynamic_update_slice(hs, h, (0, j, 0))
            drafts = jax.lax.dynamic_update_slice(drafts, d[:, None], (0, j))
            n_draft = jnp.where(stopped, n_draft, j + 1)
            stopped = stopped | (pmax < plan.theta) | (j + 1 >= delta)
            return j + 1, d, trunk, tw, hs, drafts, qs, n_draft, stopped

        st = (jnp.int32(0), t0, trunk, twig_cache, hs, drafts, qs, zeros, jnp.zeros((b,), bool))
        _, _, trunk, twig_cache, hs, drafts, qs, n_draft, _ = jax.lax.while_loop(cond, body, st)
        return trunk, twig_cache, hs, drafts, qs, n_draft

    def cond(state):
        return ~jnp.all(state[2])

    def body(state):
        out, count, done, t0, caches, key, rounds, drafted, accepted = state
        key, k_draft, k_acc = jax.random.split(key, 3)
        cur, mid0, tail0 = caches.trunk.lengths, caches.mid.lengths, caches.tail.lengths
        trunk, tw, hs, drafts, qs, n_draft = draft(caches.trunk, caches.twig, t0, ~done, k_draft)

        positions = cur[:, None] + slots[None]  # [B, delta+1]
        mid, tail, lp = target_step(model, plan, caches.mid, caches.tail, hs, positions, weights)  # [B, delta+1, V]
        if greedy:
            y = jnp.argmax(lp, axis=-1).astype(jnp.int32)  # [B, delta+1]
            match = (drafts[:, :delta] == y[:, :delta]) & (slots[None, :delta] < n_draft[:, None])
            a = _leading_true(match)
            final = jnp.take_along_axis(y, a[:, None], axis=1)[:, 0]
        else:
            a, final = rejection_sample(_probs(lp, sampling), qs, drafts, n_draft, k_acc)

        # Emit d_1..d_a and the target's token, cut at EOS and at the budget.
        emit = jnp.where(slots[None] < a[:, None], drafts, final[:, None])  # [B, delta+1]
        n_emit = a + 1
        is_eos = jnp.isin(emit, eos) & (slots[None] < n_emit[:, None])
        first_eos = jnp.argmax(is_eos, axis=1)
        n_emit = jnp.where(jnp.any(is_eos, axis=1), first_eos + 1, n_emit)
        n_emit = jnp.minimum(n_emit, max_new_tokens - count)
        n_emit = jnp.where(done, 0, n_emit)
        vals = jnp.where(slots[None] < n_emit[:, None], emit, pad_id)
        out = jax.vmap(lambda o, x, s: jax.lax.dynamic_update_slice(o, x, (s,)))(out, vals, count)
        hit_eos = jnp.any(is_eos & (slots[None] < n_emit[:, None]), axis=1)
        if on_round is not None:
            jax.experimental.io_callback(on_round, None, vals, n_emit, jnp.where(done, 0, a), ordered=True)
        live = ~done
        count = count + n_emit
        new_done = done | hit_eos | (count >= max_new_tokens)

        # Roll every group back to the accepted prefix (x_0..x_a are now cached).
        adv = jnp.where(live, a + 1, 0)
        caches = TwigCaches(trunk.replace(lengths=cur + adv), tw.replace(lengths=cur + adv),
                            mid.replace(lengths=mid0 + adv), tail.replace(lengths=tail0 + adv))
        rounds = rounds + live.astype(jnp.int32)
        drafted = drafted + jnp.where(live, n_draft, 0)
        accepted = accepted + jnp.where(live, a, 0)
        t0 = jnp.where(live, final, t0)
        return out, count, new_done, t0, caches, key, rounds, drafted, accepted

    state = (out, count, done, t0, caches, key, zeros, zeros, zeros)
    out, count, _, _, _, _, rounds, drafted, accepted = jax.lax.while_loop(cond, body, state)
    return SSDOutput(out[:, :out_len], count, rounds, drafted, accepted)


def ssd_generate(model: Llava, twig: Twig, plan: PrunePlan, tokens: jax.Array, lengths: jax.Array,
                 pixel_values: jax.Array, active: jax.Array, key: jax.Array, max_new_tokens: jax.Array, *,
                 out_len: int, sampling: SamplingConfig = SamplingConfig(), eos_ids: tuple[int, ...] = (),
                 pad_id: int = 0, weights: LayerWeights | None = None) -> tuple[SSDOutput, TTPPrefill]:
    """TTP prefill (with the twig cache) + SSD rounds; the prefill result carries scores / keep."""
    key_prune, key_dec = jax.random.split(key)
    pre = ttp_prefill(model, twig, plan, tokens, lengths, pixel_values, extra=ssd_extra_slots(plan, out_len),
                      key=key_prune, weights=weights)
    out = ssd_loop(model, twig, plan, pre.caches, pre.logits, active, key_dec, max_new_tokens, out_len=out_len,
                   sampling=sampling, eos_ids=eos_ids, pad_id=pad_id, weights=weights)
    return out, pre
