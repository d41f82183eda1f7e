"""Twig-guided token pruning (TTP, docs/design.md, "Twig-guided token pruning") with four static-shape KV-cache groups.

The network is split into the trunk (base layers 0..K-1, full prompt), the twig (T layers on the
trunk's output, full prompt: it scores the visual tokens and later drafts), the middle (base
layers K..Kf-1, text + R kept visual tokens) and the tail (base layers Kf..L-1, text only:
FinalWipe). Each group has its own cache with its own capacity and per-row lengths, so pruning
also shrinks KV memory. Every shape is a compile-time constant: prompts are right-padded to S,
each row holds exactly N image placeholders, and pruning is a fixed-size keep-R gather (top-k,
sorted indices, take_along_axis on hidden states and ORIGINAL position ids), never a boolean
mask that changes a shape. Generated tokens continue at RoPE position = unpruned prompt length.

Every function takes optional `weights` (LayerWeights): per-layer copies of the base decoder's
and the twig's layer weights (llama.unstack_layers), made once by the caller outside jit. With
them, layers run unrolled over their own buffers and every cache group is created per layer (a
tuple of [B, Hkv, ., .] arrays written in place), as generate.Generator decodes: XLA on CPU
copies each slice of a stacked [L, ...] array before its matmul. Without them (None), the
modules' stacked weights and stacked caches are used (one compiled layer body in a fori_loop).

Pruning methods share one code path and differ only in where the scores come from:
  "twig"   last twig layer's attention (the paper's TTP),
  "phead"  the TwigVLM++ P-head on the last twig layer (twig_jax/twig/phead.py; the twig must have one),
  "fastv"  attention of base layer K-1, the last trunk layer (FastV-style baseline, same R),
  "random" uniform random scores from a key (random keep-R baseline),
  "none"   no pruning: R = N and Kf = L (the unpruned model, computed through the same groups).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from twig_jax.decode.placement import constrain_cache
from twig_jax.model.cache import KVCache
from twig_jax.model.config import LlavaConfig
from twig_jax.decode.plain import token_loop
from twig_jax.decode.prompt_layout import PromptLayout
from twig_jax.model.layers import gather_rows
from twig_jax.model.llama import LayerCopies, StackedLayers, run_layers, unstack_layers
from twig_jax.model.llava import Llava
from twig_jax.decode.sampling import SamplingConfig
from twig_jax.decode.scorers import SCORERS, Scorer, ScoreInputs
from twig_jax.twig.keep import pruned_indices, score_query, text_in_pruned, visual_positions
from twig_jax.twig.phead import p_head_weights, phead_scores
from twig_jax.twig.module import Twig
from twig_jax.twig.config import METHODS, TwigConfig, TwigConfigError

# ----------------------------------------------------------------------------------------------
# Static plan


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """Resolved, validated pruning hyper-parameters (hashable: a static jit argument)."""

    method: str
    L: int  # base depth
    N: int  # visual tokens per image
    K: int  # trunk = base layers 0..K-1
    T: int  # twig layers
    Kf: int  # FinalWipe: base layers Kf..L-1 see text only
    R: int  # kept visual tokens in base layers K..Kf-1
    score_rows: str = "last"  # "last" or "text"
    select: str = "top"  # keep-set rule: "top", "cover" (score-weighted coverage) or "sample" (P-head only:
    # a Gumbel-top-R draw from its scores; needs the key)
    draft_len: int = 5  # delta (SSD)
    theta: float = 0.6  # SSD early-stop threshold on the draft's top probability
    shard_keep: str = "exact"  # sequence-sharded prefill: "exact" or "local" keep set (prompt_layout.py)

    @property
    def scorer(self) -> Scorer:
        """Where this plan's scores over the visual tokens come from."""
        return SCORERS[self.method]

    @property
    def keep_rule(self) -> str:
        """The keep-set rule this plan runs: "sample" only for the P-head (a draw from its scores),
        "cover" for any scored method, otherwise (and for method none) "top"."""
        if self.select == "sample" and self.scorer.p_head:
            return "sample"
        if self.select == "cover" and self.scorer.scored:
            return "cover"
        return "top"

    def mid_len(self, prompt_len: int) -> int:
        """Entries of the middle group for a prompt of prompt_len tokens (text + R visual)."""
        return prompt_len - self.N + self.R

    def tail_len(self, prompt_len: int) -> int:
        """Entries of the tail group (text only)."""
        return prompt_len - self.N


def make_plan(cfg: LlavaConfig, twig_cfg: TwigConfig, method: str = "twig") -> PrunePlan:
    """Validate twig_cfg against the base model and resolve R / Kf for `method`.

    Raises TwigConfigError for bad K/T/Kf/R/R_bar (and an unknown method name).
    """
    if method not in METHODS:
        raise TwigConfigError(f"pruning method {method!r} unknown; have {METHODS}")
    L, N = cfg.text.num_hidden_layers, cfg.num_image_tokens
    if method == "none":
        # K and T still matter (trunk / twig split for drafting); R and Kf are fixed to "keep all".
        twig_cfg = dataclasses.replace(twig_cfg, R=N, R_bar=None, Kf=L)
    twig_cfg.validate(L, N)
    return PrunePlan(method=method, L=L, N=N, K=twig_cfg.K, T=twig_cfg.T, Kf=twig_cfg.Kf,
                     R=twig_cfg.kept_count(L, N), score_rows=twig_cfg.score_rows, select=twig_cfg.select,
                     draft_len=twig_cfg.draft_len, theta=float(twig_cfg.theta), shard_keep=twig_cfg.shard_keep)


# ----------------------------------------------------------------------------------------------
# Weights


class LayerWeights(NamedTuple):
    """Per-layer decoder weights for the TwigVLM paths (a pytree: pass it into jit as an argument).

    base: the base decoder's llama.LayerCopies (unstack_layers) or None (the stacked arrays);
    twig: the twig layers' LayerCopies or None.
    """

    base: LayerCopies | None = None
    twig: LayerCopies | None = None

    @staticmethod
    def of(model: Llava | None, twig: Twig | None = None) -> "LayerWeights":
        """Per-layer copies of the model's (and the twig's) layer weights; call outside jit."""
        return LayerWeights(None if model is None else unstack_layers(model.text.layers.weights()),
                            None if twig is None else unstack_layers(twig.layers.weights()))


def base_layers(model: Llava, weights: LayerWeights | None) -> StackedLayers | LayerCopies:
    return model.text.layers.stacked() if weights is None or weights.base is None else weights.base


def twig_layers(twig: Twig, weights: LayerWeights | None) -> StackedLayers | LayerCopies:
    return twig.layers.stacked() if weights is None or weights.twig is None else weights.twig


# ----------------------------------------------------------------------------------------------
# Cache groups


@flax.struct.dataclass
class TwigCaches:
    trunk: KVCache  # base layers 0..K-1; slot == RoPE position (full prompt + generated)
    twig: KVCache | None  # twig layers; slot == RoPE position (None when no twig is run)
    mid: KVCache  # base layers K..Kf-1; text + R kept visual + generated
    tail: KVCache  # base layers Kf..L-1; text + generated (zero layers when Kf == L)

    def groups(self) -> dict[str, KVCache]:
        out = {"trunk": self.trunk, "twig": self.twig, "mid": self.mid, "tail": self.tail}
        return {k: v for k, v in out.items() if v is not None}


def group_capacities(plan: PrunePlan, prompt_len: int, extra: int) -> dict[str, int]:
    """Static slot count per group for a padded prompt of prompt_len plus `extra` new slots."""
    return {"trunk": prompt_len + extra, "twig": prompt_len + extra,
            "mid": plan.mid_len(prompt_len) + extra, "tail": plan.tail_len(prompt_len) + extra}


def kv_bytes(cfg: LlavaConfig, plan: PrunePlan, prompt_len: int, new_tokens: int, itemsize: int,
             with_twig: bool = True) -> dict[str, int]:
    """KV-cache bytes per sequence for each group and in total (K and V, all layers).

    with_twig=False is the plain pruned model (the twig cache is only needed for drafting).
    """
    tc = cfg.text
    per_slot_layer = 2 * tc.num_key_value_heads * tc.head_dim * itemsize
    caps = group_capacities(plan, prompt_len, new_tokens)
    layers = {"trunk": plan.K, "twig": plan.T if with_twig else 0, "mid": plan.Kf - plan.K,
              "tail": plan.L - plan.Kf}
    out = {g: layers[g] * caps[g] * per_slot_layer for g in caps}
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------
# Static gathers
















# ----------------------------------------------------------------------------------------------
# Prefill


class TTPPrefill(NamedTuple):
    caches: TwigCaches
    logits: jax.Array  # [B, V] next-token logits of the pruned target
    scores: jax.Array  # [B, N] pruning scores (zeros for "none")
    keep: jax.Array  # [B, R] kept visual indices, ascending
    draft_logits: jax.Array | None  # [B, V] twig logits at the last prompt token (None without twig)


def _new_cache(tc, layers: int, b: int, capacity: int, dtype, per_layer: bool) -> KVCache:
    return constrain_cache(KVCache.zeros(layers, b, tc.num_key_value_heads, capacity, tc.head_dim, dtype,
                                         per_layer=per_layer))


def ttp_prefill(model: Llava, twig: Twig | None, plan: PrunePlan, tokens: jax.Array, lengths: jax.Array,
                pixel_values: jax.Array, extra: int, key: jax.Array | None = None, *,
                weights: LayerWeights | None = None) -> TTPPrefill:
    """Run the prompt through trunk, twig, pruned middle and text-only tail; fill all four caches.

    tokens: [B, S] right-padded, each row with exactly N image placeholders (none in the
    padding); lengths: [B]; pixel_values: [B, C, H, W]; extra: slots per group beyond the
    prompt (new tokens + drafting headroom); key: only for method "random"; weights: per-layer
    weights (then every cache group is per layer) or None (stacked).

    Traced under a mesh with a "sequence" axis above 1 (`jax.set_mesh`), the trunk and the twig
    run sequence-sharded (decode/prompt_layout.py); the results are those of the unsharded prefill.
    """
    tc = model.cfg.text
    b, s = tokens.shape
    n, r = plan.N, plan.R
    lengths = lengths.astype(jnp.int32)
    base_w = base_layers(model, weights)
    base_pl = base_w.per_layer_caches
    # The prompt's length split over the mesh's "sequence" axis (the trunk and twig run on it padded
    # to a multiple of the shards; nothing reads the padding), or whole.
    layout = PromptLayout.of_mesh()
    tokens = layout.pad_prompt(tokens, model.cfg.image_token_index)  # [B, S_run]
    s_run = tokens.shape[1]
    x = layout.prompt(model.embed(tokens, model.image_features(pixel_values)))  # [B, S_run, D]
    dtype = x.dtype
    positions = jnp.broadcast_to(jnp.arange(s_run, dtype=jnp.int32)[None], (b, s_run))  # original RoPE positions
    zeros = jnp.zeros((b,), jnp.int32)
    caps = group_capacities(plan, s, extra)
    caps["trunk"] = caps["twig"] = max(caps["trunk"], s_run)  # the padded prompt's entries fit
    is_image = tokens == model.cfg.image_token_index  # [B, S_run]
    query = layout.probs_query(score_query(lengths, is_image, plan.score_rows), s_run)  # rows the scores read
    scorer = plan.scorer

    # Trunk: base layers 0..K-1 on the full prompt.
    trunk = _new_cache(tc, plan.K, b, caps["trunk"], dtype, base_pl)
    out = run_layers(tc, base_w, x, positions, trunk.k, trunk.v, zeros, start=0, stop=plan.K, fresh=True,
                     return_last_probs=scorer.trunk_attention, probs_query=query)
    trunk = KVCache(out.k, out.v, lengths)
    h_k = layout.prompt(out.hidden)  # [B, S_run, D] hidden state entering base layer K

    # Twig: T layers on the trunk output (full prompt), for scores and the draft cache.
    twig_cache, draft_logits = None, None
    if scorer.reads_twig and twig is None:
        raise TwigConfigError(f"method {plan.method!r} needs a twig")
    if scorer.p_head and twig.p_head is None:
        raise TwigConfigError("method 'phead' needs a twig with a P-head (train one with twig-jax train-phead)")
    img_pos = visual_positions(is_image, n)  # [B, N]
    phead_s, twig_probs = None, None
    if twig is not None:
        twig_w = twig_layers(twig, weights)
        twig_cache = _new_cache(tc, plan.T, b, caps["twig"], dtype, twig_w.per_layer_caches)
        h_t = h_k
        if scorer.p_head:  # stop before the last twig layer: the P-head reads its input
            tout = run_layers(tc, twig_w, h_k, positions, twig_cache.k, twig_cache.v, zeros, stop=plan.T - 1,
                              fresh=True)
            twig_cache, h_t = KVCache(tout.k, tout.v, lengths), layout.prompt(tout.hidden)
            phead_s = phead_scores(tc, twig_w.layer(plan.T - 1), p_head_weights(twig.p_head), h_t, positions, lengths - 1, img_pos)
        tout = run_layers(tc, twig_w, h_t, positions, twig_cache.k, twig_cache.v, zeros,
                          start=plan.T - 1 if scorer.p_head else 0, stop=plan.T,
                          fresh=True, return_last_probs=scorer.twig_attention, probs_query=query)
        twig_cache = KVCache(tout.k, tout.v, lengths)
        last_t = gather_rows(tout.hidden, (lengths - 1)[:, None])  # [B, 1, D]
        draft_logits = twig.logits(last_t)[:, 0]
        twig_probs = tout.attn_probs

    # Scores and the kept set.
    scores = scorer.scores(ScoreInputs(img_pos, out.attn_probs, twig_probs, phead_s, key))  # [B, N]
    keep_rule = layout.keep_rule(plan.keep_rule, plan.shard_keep)  # sharded: exact across the "sequence" shards
    keep = keep_rule.keep(scores, gather_rows(h_k, img_pos), r, key)  # [B, R] ascending

    # Middle: base layers K..Kf-1 on text + kept visual tokens, original positions.
    m = plan.mid_len(s)
    idx = pruned_indices(is_image, img_pos, keep, m)  # [B, M]
    mid = _new_cache(tc, plan.Kf - plan.K, b, caps["mid"], dtype, base_pl)
    mout = run_layers(tc, base_w, layout.pruned(gather_rows(h_k, idx)), idx, mid.k, mid.v, zeros,
                      start=plan.K, stop=plan.Kf, cache_offset=plan.K, fresh=True)
    mid = KVCache(mout.k, mout.v, lengths - n + r)

    # Tail (FinalWipe): base layers Kf..L-1 on the text entries only.
    tl = plan.tail_len(s)
    tail = _new_cache(tc, plan.L - plan.Kf, b, caps["tail"], dtype, base_pl)
    if plan.Kf < plan.L:
        text_in_mid = text_in_pruned(is_image, idx, tl)  # [B, S-N] indices into the middle sequence
        tout2 = run_layers(tc, base_w, gather_rows(mout.hidden, text_in_mid), gather_rows(idx, text_in_mid),
                           tail.k, tail.v, zeros, start=plan.Kf, stop=plan.L, cache_offset=plan.Kf, fresh=True)
        tail = KVCache(tout2.k, tout2.v, lengths - n)
        last = gather_rows(tout2.hidden, jnp.maximum(lengths - n - 1, 0)[:, None])  # [B, 1, D]
    else:
        tail = KVCache(tail.k, tail.v, lengths - n)
        last = gather_rows(mout.hidden, jnp.maximum(lengths - n + r - 1, 0)[:, None])  # [B, 1, D]
    logits = model.text.logits(last)[:, 0]  # [B, V]
    return TTPPrefill(TwigCaches(trunk, twig_cache, mid, tail), logits, scores, keep, draft_logits)


# ----------------------------------------------------------------------------------------------
# Incremental steps (tokens appended at each group's per-row length)


def trunk_step(model: Llava, plan: PrunePlan, cache: KVCache, tokens: jax.Array,
               weights: LayerWeights | None = None) -> tuple[KVCache, jax.Array]:
    """Append tokens [B, Q] to the trunk; return it and the layer-K hidden states.  # [B, Q, D]

    The trunk's slot equals the RoPE position, so positions = lengths + arange(T).
    """
    t = tokens.shape[1]
    x = model.text.embed_tokens(tokens)
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B, Q]
    out = run_layers(model.cfg.text, base_layers(model, weights), x, positions, cache.k, cache.v, cache.lengths,
                     start=0, stop=plan.K)
    return KVCache(out.k, out.v, cache.lengths + t), out.hidden


def twig_step(twig: Twig, cache: KVCache, h_k: jax.Array, positions: jax.Array,
              weights: LayerWeights | None = None) -> tuple[KVCache, jax.Array]:
    """Append layer-K hidden states [B, Q, D] to the twig; return it and draft logits.  # [B, Q, V]"""
    t = h_k.shape[1]
    out = run_layers(twig.text_cfg, twig_layers(twig, weights), h_k, positions, cache.k, cache.v, cache.lengths)
    return KVCache(out.k, out.v, cache.lengths + t), twig.logits(out.hidden)


def target_step(model: Llava, plan: PrunePlan, mid: KVCache, tail: KVCache, h_k: jax.Array,
                positions: jax.Array, weights: LayerWeights | None = None) -> tuple[KVCache, KVCache, jax.Array]:
    """Run base layers K..L-1 on new layer-K hidden states [B, Q, D] (all text entries).

    Returns the middle and tail caches and target logits [B, Q, V]; causal by slot, so Q > 1 is
    the verification pass of speculative decoding.
    """
    tc = model.cfg.text
    t = h_k.shape[1]
    w = base_layers(model, weights)
    out = run_layers(tc, w, h_k, positions, mid.k, mid.v, mid.lengths, start=plan.K, stop=plan.Kf,
                     cache_offset=plan.K)
    mid = KVCache(out.k, out.v, mid.lengths + t)
    h = out.hidden
    if plan.Kf < plan.L:
        out = run_layers(tc, w, h, positions, tail.k, tail.v, tail.lengths, start=plan.Kf, stop=plan.L,
                         cache_offset=plan.Kf)
        h = out.hidden
        tail = KVCache(out.k, out.v, tail.lengths + t)
    else:
        tail = KVCache(tail.k, tail.v, tail.lengths + t)
    return mid, tail, model.text.logits(h)


def pruned_decode_step(model: Llava, plan: PrunePlan, caches: TwigCaches, tokens: jax.Array,
                       weights: LayerWeights | None = None) -> tuple[TwigCaches, jax.Array]:
    """Target-only step for tokens [B, Q] through trunk, middle and tail.  # caches, [B, Q, V]"""
    positions = caches.trunk.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    trunk, h_k = trunk_step(model, plan, caches.trunk, tokens, weights)
    mid, tail, logits = target_step(model, plan, caches.mid, caches.tail, h_k, positions, weights)
    return caches.replace(trunk=trunk, mid=mid, tail=tail), logits


def pruned_decode_loop(model: Llava, plan: PrunePlan, caches: TwigCaches, logits: jax.Array, active: jax.Array,
                       key: jax.Array, max_new_tokens: jax.Array, *, out_len: int, sampling: SamplingConfig,
                       eos_ids: tuple[int, ...], pad_id: int, on_token=None, min_new_tokens: jax.Array | int = 0,
                       weights: LayerWeights | None = None) -> tuple[jax.Array, jax.Array, TwigCaches]:
    """Plain one-token-per-step decode of the pruned target in one while_loop (the SSD oracle).

    Same contract as generate.decode_loop: returns tokens [B, out_len], counts [B], caches.
    The twig cache is left untouched (only drafting needs it). on_token: optional host function
    (streaming), called through an ordered io_callback as on_token(tokens [B, 1], n [B] (0/1),
    zeros [B]) for every token; static, None (the default) traces no callback.
    """
    return token_loop(lambda c, t: pruned_decode_step(model, plan, c, t, weights), caches, logits, active, key,
                      max_new_tokens, out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id,
                      on_token=on_token, min_new_tokens=min_new_tokens)


def pruned_generate(model: Llava, twig: Twig | None, plan: PrunePlan, tokens: jax.Array, lengths: jax.Array,
                    pixel_values: jax.Array, active: jax.Array, key: jax.Array, max_new_tokens: jax.Array, *,
                    out_len: int, sampling: SamplingConfig = SamplingConfig(), eos_ids: tuple[int, ...] = (),
                    pad_id: int = 0, weights: LayerWeights | None = None,
                    on_step=None, min_new_tokens: jax.Array | int = 0) -> tuple[jax.Array, jax.Array, TTPPrefill]:
    """TTP prefill + plain pruned decode: tokens [B, out_len], counts [B], and the prefill result."""
    key_prune, key_dec = jax.random.split(key)
    pre = ttp_prefill(model, twig if plan.scorer.reads_twig else None, plan, tokens, lengths, pixel_values,
                      extra=out_len + 1, key=key_prune, weights=weights)  # key: random / select="sample"
    out, count, _ = pruned_decode_loop(model, plan, pre.caches, pre.logits, active, key_dec, max_new_tokens,
                                       out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id,
                                       weights=weights, on_token=on_step, min_new_tokens=min_new_tokens)
    return out, count, pre


@dataclasses.dataclass(frozen=True)
class OneTokenDecoding:
    """No drafter: the pruned target decodes one token per step."""

    uses_twig = False

    def extra_slots(self, plan: PrunePlan, out_len: int) -> int:
        return out_len + 1

    def generate(self, model: Llava, twig: Twig | None, plan: PrunePlan, tokens, lengths, pixel_values, active,
                 key, max_new_tokens, **kw) -> tuple[NamedTuple, TTPPrefill]:
        out, count, pre = pruned_generate(model, twig, plan, tokens, lengths, pixel_values, active, key,
                                          max_new_tokens, **kw)
        zeros = jnp.zeros_like(count)
        return PrunedOutput(out, count, zeros, zeros, zeros, zeros), pre


class PrunedOutput(NamedTuple):
    """The decode's result in SSDOutput's shape (no rounds, drafts or acceptances)."""

    tokens: jax.Array  # [B, out_len]
    count: jax.Array  # [B]
    rounds: jax.Array  # [B] zeros
    drafted: jax.Array  # [B] zeros
    accepted: jax.Array  # [B] zeros
    deepest: jax.Array  # [B] zeros
