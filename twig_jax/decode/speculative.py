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

import dataclasses
import flax.struct
import jax
import jax.experimental
import jax.numpy as jnp

from twig_jax.model.cache import KVCache
from twig_jax.model.llava import Llava
from twig_jax.decode.plain import suppress_eos
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
    drafted: jax.Array  # [B] draft tokens proposed (a tree: nodes verified)
    accepted: jax.Array  # [B] draft tokens the verifier accepted (EOS / the budget may cut the last round)
    deepest: jax.Array  # [B] the most drafts accepted in one round (a tree: the deepest accepted path)


def ssd_extra_slots(plan: PrunePlan, out_len: int) -> int:
    """Cache slots each group needs beyond the prompt: new tokens + a full round of drafts."""
    return out_len + plan.draft_len + 1


def sampling_probs(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:  # [..., V] float32
    """The distribution a token is drawn from (greedy: plain softmax, used only for theta)."""
    if sampling.greedy:
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    shape = logits.shape
    flat = filtered_logits(logits.reshape(-1, shape[-1]), sampling)
    return jax.nn.softmax(flat, axis=-1).reshape(shape)


def _leading_true(x: jax.Array) -> jax.Array:  # [B] int32
    """Length of the all-True prefix of each row of x [B, Q]."""
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


@flax.struct.dataclass
class ChainDraft:
    """One round's chain of drafts, from the last emitted token x_0 = d_0."""

    trunk: KVCache  # trunk cache with x_0..x_m appended (the row's length is not yet moved on)
    twig: KVCache  # twig cache, likewise
    hidden: jax.Array  # [B, delta+1, D] layer-K hidden states of x_0..x_delta (the verifier's input)
    tokens: jax.Array  # [B, delta+1] drafts d_1..d_{delta+1}
    probs: jax.Array  # [B, delta+1, V] the distributions the drafts were drawn from ([B, 0, V] when greedy)
    n_draft: jax.Array  # [B] drafts proposed (m)


@flax.struct.dataclass
class DraftStep:
    """The carry of the drafting loop: step j runs x_j through trunk + twig."""

    j: jax.Array  # []
    token: jax.Array  # [B] x_j
    draft: ChainDraft
    stopped: jax.Array  # [B] bool: the row has proposed its last draft


def draft_chain(model: Llava, twig: Twig, plan: PrunePlan, trunk: KVCache, twig_cache: KVCache, last_token: jax.Array,
                live: jax.Array, key: jax.Array, sampling: SamplingConfig, weights: LayerWeights | None = None,
                eos_block=lambda logits, j: logits) -> ChainDraft:
    """Steps j = 0..max m through trunk + twig: row b proposes d_1..d_m, m <= delta, stopping after
    the first draft whose top probability is below theta. Step m still runs (h_m and the twig
    entry of d_m are needed); the loop exits once every live row has run its step m. eos_block(logits
    [B, V], j) applies min_new_tokens to the draft of step j (decode.plain.suppress_eos)."""
    b, delta, v = last_token.shape[0], plan.draft_len, model.cfg.text.vocab_size
    cur = trunk.lengths
    greedy = sampling.greedy
    init = ChainDraft(trunk, twig_cache,
                      jnp.zeros((b, delta + 1, model.cfg.text.hidden_size), model.text.embed[...].dtype),
                      jnp.zeros((b, delta + 1), jnp.int32),
                      jnp.zeros((b, 0 if greedy else delta + 1, v), jnp.float32), jnp.zeros((b,), jnp.int32))

    def cond(st: DraftStep):
        need = jnp.where(st.stopped, st.j <= st.draft.n_draft, True) & live  # finished rows never extend the loop
        return (st.j <= delta) & jnp.any(need)

    def body(st: DraftStep) -> DraftStep:
        d0, j = st.draft, st.j
        trunk, h = trunk_step(model, plan, d0.trunk, st.token[:, None], weights)  # h: [B, 1, D]
        tw, lq = twig_step(twig, d0.twig, h, (cur + j)[:, None], weights)
        lq = eos_block(lq[:, 0], j)[:, None]
        q = sampling_probs(lq[:, 0], sampling)  # [B, V]
        probs = d0.probs
        if greedy:
            d = jnp.argmax(lq[:, 0], axis=-1).astype(jnp.int32)
        else:
            d = jax.random.categorical(jax.random.fold_in(key, j), jnp.log(q), axis=-1).astype(jnp.int32)
            probs = jax.lax.dynamic_update_slice(probs, q[:, None], (0, j, 0))
        hidden = jax.lax.dynamic_update_slice(d0.hidden, h, (0, j, 0))
        tokens = jax.lax.dynamic_update_slice(d0.tokens, d[:, None], (0, j))
        n_draft = jnp.where(st.stopped, d0.n_draft, j + 1)
        stopped = st.stopped | (jnp.max(q, axis=-1) < plan.theta) | (j + 1 >= delta)
        return DraftStep(j + 1, d, ChainDraft(trunk, tw, hidden, tokens, probs, n_draft), stopped)

    st = jax.lax.while_loop(cond, body, DraftStep(jnp.int32(0), last_token, init, jnp.zeros((b,), bool)))
    return st.draft


def accept_greedy(drafts: jax.Array, target_logits: jax.Array, n_draft: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy acceptance: the longest prefix with d_k == y_k (k <= m) and the target's own next token
    y_{a+1}.  # a [B], final token [B]

    drafts: [B, delta+1]; target_logits: [B, delta+1, V], the target's prediction after x_0..x_k.
    """
    delta = drafts.shape[1] - 1
    y = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, delta+1]
    match = (drafts[:, :delta] == y[:, :delta]) & (jnp.arange(delta)[None] < n_draft[:, None])
    a = _leading_true(match)
    return a, jnp.take_along_axis(y, a[:, None], axis=1)[:, 0]


def emitted_tokens(drafts: jax.Array, a: jax.Array, final: jax.Array, budget: jax.Array, done: jax.Array,
                   eos: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """d_1..d_a and the target's token, cut after the first EOS and at the row's budget.

    Returns the tokens [B, delta+1] (pad past n_emit), n_emit [B] (0 for finished rows) and whether
    the row emitted an EOS [B]."""
    slots = jnp.arange(drafts.shape[1], dtype=jnp.int32)[None]
    emit = jnp.where(slots < a[:, None], drafts, final[:, None])
    n_emit = a + 1
    is_eos = jnp.isin(emit, eos) & (slots < n_emit[:, None])
    n_emit = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, n_emit)
    n_emit = jnp.where(done, 0, jnp.minimum(n_emit, budget))
    hit_eos = jnp.any(is_eos & (slots < n_emit[:, None]), axis=1)
    return jnp.where(slots < n_emit[:, None], emit, pad_id), n_emit, hit_eos


def commit(start: TwigCaches, draft: ChainDraft, mid: KVCache, tail: KVCache, advance: jax.Array) -> TwigCaches:
    """Every group's per-row length becomes its length at the round's start + advance (x_0..x_a
    are now cached); the stale slots past it are masked and overwritten by later rounds."""
    cur = start.trunk.lengths
    return TwigCaches(draft.trunk.replace(lengths=cur + advance), draft.twig.replace(lengths=cur + advance),
                      mid.replace(lengths=start.mid.lengths + advance),
                      tail.replace(lengths=start.tail.lengths + advance))


@flax.struct.dataclass
class FirstToken:
    """The prefill's token, sampled before any round: what a speculative loop starts from."""

    token: jax.Array  # [B] x_0 (pad for padding rows)
    count: jax.Array  # [B] 1 for real rows, 0 for padding
    done: jax.Array  # [B] padding, EOS, or a budget of one token
    out: jax.Array  # [B, out_len + width] with x_0 in column 0


def first_token(logits: jax.Array, active: jax.Array, key: jax.Array, max_new_tokens, *, out_len: int, width: int,
                sampling: SamplingConfig, eos: jax.Array, pad_id: int, min_new_tokens, on_round=None) -> FirstToken:
    """x_0 from the prefill's logits [B, V] (min_new_tokens applied), the output buffer with room for
    one more round of `width` tokens, and the streaming hook's first call."""
    b = logits.shape[0]
    done = ~active
    t0 = jnp.where(done, pad_id, sample_logits(suppress_eos(logits, eos, jnp.zeros((b,), jnp.int32), min_new_tokens),
                                               key, sampling))
    count = (~done).astype(jnp.int32)
    done = done | jnp.isin(t0, eos) | (count >= max_new_tokens)
    out = jnp.full((b, out_len + width), pad_id, jnp.int32).at[:, 0].set(t0)
    if on_round is not None:
        jax.experimental.io_callback(on_round, None, out[:, :width], count, jnp.zeros((b,), jnp.int32), ordered=True)
    return FirstToken(t0, count, done, out)


@flax.struct.dataclass
class SSDState:
    """The carry of the round loop."""

    out: jax.Array  # [B, out_len + delta + 1] generated tokens, pad after each row's count
    count: jax.Array  # [B] generated tokens per row
    done: jax.Array  # [B] bool
    last_token: jax.Array  # [B] the last emitted token, not yet in any cache
    caches: TwigCaches
    key: jax.Array
    rounds: jax.Array  # [B]
    drafted: jax.Array  # [B]
    accepted: jax.Array  # [B]
    deepest: jax.Array  # [B]


def ssd_loop(model: Llava, twig: Twig, plan: PrunePlan, caches: TwigCaches, logits: jax.Array, active: jax.Array,
             key: jax.Array, max_new_tokens: jax.Array, *, out_len: int, sampling: SamplingConfig,
             eos_ids: tuple[int, ...], pad_id: int, on_round=None, weights: LayerWeights | None = None,
             min_new_tokens: jax.Array | int = 0) -> SSDOutput:
    """Generate up to max_new_tokens (<= out_len) per row by draft / verify / accept / commit rounds.

    caches: from ttp_prefill with the twig (its capacities need ssd_extra_slots headroom);
    logits: [B, V] target next-token logits after the prompt; active: [B] (False = padding row).
    on_round: optional host function (streaming, decode/sink.py), called through an ordered
    `io_callback` as on_round(tokens [B, delta+1], n_emit [B], n_accepted [B]) with the first
    token and then every round's emitted tokens (the first min(n_accepted, n_emit) are accepted
    drafts). Static: None (the default) traces no callback at all. weights: per-layer base / twig
    weights matching the caches' layout (prune.LayerWeights; None: the stacked arrays).
    min_new_tokens (traced): EOS is blocked, in the drafts and in the target's distributions alike,
    at every position with fewer generated tokens before it (so greedy SSD still equals greedy
    decoding with the same rule, and sampling stays lossless).
    """
    if caches.twig is None:
        raise TwigConfigError("SSD needs the twig cache: run ttp_prefill with a twig")
    b = logits.shape[0]
    delta = plan.draft_len
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    slots = jnp.arange(delta + 1, dtype=jnp.int32)

    key, sub = jax.random.split(key)
    first = first_token(logits, active, sub, max_new_tokens, out_len=out_len, width=delta + 1, sampling=sampling,
                        eos=eos, pad_id=pad_id, min_new_tokens=min_new_tokens, on_round=on_round)
    zeros = jnp.zeros((b,), jnp.int32)

    def body(st: SSDState) -> SSDState:
        key, k_draft, k_acc = jax.random.split(st.key, 3)
        live = ~st.done
        draft = draft_chain(model, twig, plan, st.caches.trunk, st.caches.twig, st.last_token, live, k_draft,
                            sampling, weights,
                            eos_block=lambda lq, j: suppress_eos(lq, eos, st.count + j, min_new_tokens))
        positions = st.caches.trunk.lengths[:, None] + slots[None]  # [B, delta+1]
        mid, tail, target_logits = target_step(model, plan, st.caches.mid, st.caches.tail, draft.hidden, positions,
                                               weights)  # verification: [B, delta+1, V]
        target_logits = suppress_eos(target_logits, eos, st.count[:, None] + slots[None], min_new_tokens)
        if sampling.greedy:
            a, final = accept_greedy(draft.tokens, target_logits, draft.n_draft)
        else:
            a, final = rejection_sample(sampling_probs(target_logits, sampling), draft.probs, draft.tokens,
                                        draft.n_draft, k_acc)
        vals, n_emit, hit_eos = emitted_tokens(draft.tokens, a, final, max_new_tokens - st.count, st.done, eos,
                                               pad_id)
        out = jax.vmap(lambda o, x, c: jax.lax.dynamic_update_slice(o, x, (c,)))(st.out, vals, st.count)
        if on_round is not None:
            jax.experimental.io_callback(on_round, None, vals, n_emit, jnp.where(st.done, 0, a), ordered=True)
        count = st.count + n_emit
        caches = commit(st.caches, draft, mid, tail, jnp.where(live, a + 1, 0))
        return SSDState(out, count, st.done | hit_eos | (count >= max_new_tokens), jnp.where(live, final, st.last_token),
                        caches, key, st.rounds + live.astype(jnp.int32),
                        st.drafted + jnp.where(live, draft.n_draft, 0), st.accepted + jnp.where(live, a, 0),
                        jnp.maximum(st.deepest, jnp.where(live, a, 0)))

    st = jax.lax.while_loop(lambda st: ~jnp.all(st.done), body,
                            SSDState(first.out, first.count, first.done, first.token, caches, key, zeros, zeros, zeros,
                                     zeros))
    return SSDOutput(st.out[:, :out_len], st.count, st.rounds, st.drafted, st.accepted, st.deepest)


def ssd_generate(model: Llava, twig: Twig, plan: PrunePlan, tokens: jax.Array, lengths: jax.Array,
                 pixel_values: jax.Array, active: jax.Array, key: jax.Array, max_new_tokens: jax.Array, *,
                 out_len: int, sampling: SamplingConfig = SamplingConfig(), eos_ids: tuple[int, ...] = (),
                 pad_id: int = 0, weights: LayerWeights | None = None,
                 on_step=None, min_new_tokens: jax.Array | int = 0) -> tuple[SSDOutput, TTPPrefill]:
    """TTP prefill (with the twig cache) + SSD rounds; the prefill result carries scores / keep."""
    key_prune, key_dec = jax.random.split(key)
    pre = ttp_prefill(model, twig, plan, tokens, lengths, pixel_values, extra=ssd_extra_slots(plan, out_len),
                      key=key_prune, weights=weights)
    out = ssd_loop(model, twig, plan, pre.caches, pre.logits, active, key_dec, max_new_tokens, out_len=out_len,
                   sampling=sampling, eos_ids=eos_ids, pad_id=pad_id, weights=weights, on_round=on_step,
                   min_new_tokens=min_new_tokens)
    return out, pre


@dataclasses.dataclass(frozen=True)
class ChainDrafter:
    """Self-speculative decoding with a chain of drafts: the twig proposes up to draft_len tokens a
    round (plan.draft_len, plan.theta) and the pruned target verifies them in one pass."""

    uses_twig = True  # the decode needs the twig (its cache and head)

    def extra_slots(self, plan: PrunePlan, out_len: int) -> int:
        return ssd_extra_slots(plan, out_len)

    def generate(self, model: Llava, twig: Twig, plan: PrunePlan, tokens, lengths, pixel_values, active, key,
                 max_new_tokens, **kw) -> tuple[SSDOutput, TTPPrefill]:
        return ssd_generate(model, twig, plan, tokens, lengths, pixel_values, active, key, max_new_tokens, **kw)
