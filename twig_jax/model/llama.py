"""LLaMA / Vicuna decoder with stacked layer weights.

Layer weights live in arrays with a leading layer axis ([L, ...]) and layers run inside a
`lax.fori_loop` that indexes them: one compiled layer body, weights streamed from memory once per
step (unrolled Python loops over slices of a stacked array were measured several times slower).
Any contiguous layer range [start, stop) can run on its own, which is what the twig's split of the
network into trunk / pruned middle / text-only tail needs.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from twig_jax.model.cache import write_kv, write_kv_fresh, write_kv_layer
from twig_jax.model.config import TextConfig
from twig_jax.model.layers import ACTIVATIONS, apply_rope, attention, rms_norm, rope_cos_sin


def normal_init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


class DecoderLayers(nnx.Module):
    """`num_layers` LLaMA decoder layers with stacked weights (kernels stored [in, out])."""

    def __init__(self, cfg: TextConfig, num_layers: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        n, d, i = num_layers, cfg.hidden_size, cfg.intermediate_size
        hq, hkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.cfg = cfg
        self.num_layers = num_layers
        self.attn_norm = nnx.Param(jnp.ones((n, d), dtype))
        self.wq = normal_init(rngs, (n, d, hq), dtype)
        self.wk = normal_init(rngs, (n, d, hkv), dtype)
        self.wv = normal_init(rngs, (n, d, hkv), dtype)
        self.wo = normal_init(rngs, (n, hq, d), dtype)
        self.mlp_norm = nnx.Param(jnp.ones((n, d), dtype))
        self.w_gate = normal_init(rngs, (n, d, i), dtype)
        self.w_up = normal_init(rngs, (n, d, i), dtype)
        self.w_down = normal_init(rngs, (n, i, d), dtype)
        if cfg.attention_bias:
            self.bq = nnx.Param(jnp.zeros((n, hq), dtype))
            self.bk = nnx.Param(jnp.zeros((n, hkv), dtype))
            self.bv = nnx.Param(jnp.zeros((n, hkv), dtype))
            self.bo = nnx.Param(jnp.zeros((n, d), dtype))
        if cfg.mlp_bias:
            self.b_gate = nnx.Param(jnp.zeros((n, i), dtype))
            self.b_up = nnx.Param(jnp.zeros((n, i), dtype))
            self.b_down = nnx.Param(jnp.zeros((n, d), dtype))

    def stacked(self) -> StackedLayers:
        return StackedLayers(self.weights())

    def weights(self) -> dict[str, jax.Array]:
        """The stacked weight arrays by name."""
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}


class LayerOut(NamedTuple):
    hidden: jax.Array  # [B, Q, D]
    k: jax.Array  # [L, B, Hkv, Dh, S] updated cache keys
    v: jax.Array  # [L, B, Hkv, S, Dh]
    # Attention probabilities of the last layer run, if asked for: [B, H, Q, S_att], or [B, H, S_att]
    # when run_layers got probs_query (one query row per batch row, or a weighted sum of rows).
    attn_probs: jax.Array | None


def reduce_query_rows(probs: jax.Array, query: jax.Array) -> jax.Array:  # [B, H, S] float32
    """Probabilities [B, H, Q, S] down to [B, H, S]: query [B] int picks row query[b] of batch row b;
    query [B, Q] float sums the query rows with those weights."""
    if jnp.issubdtype(query.dtype, jnp.integer):
        return jnp.take_along_axis(probs, query[:, None, None, None], axis=2)[:, :, 0].astype(jnp.float32)
    return jnp.einsum("bhts,bt->bhs", probs.astype(jnp.float32), query.astype(jnp.float32))


def decoder_layer(cfg: TextConfig, w: dict, x, cos, sin, kv_read, mask, want_probs, keys_transposed=False,
           probs_query=None):
    """One decoder layer on x [B, Q, D]. `kv_read(k_new, v_new)` stores the new keys/values and
    returns the keys/values to attend over ([B, Hkv, S, Dh]; keys [B, Hkv, Dh, S] when
    keys_transposed, as the cache holds them). probs_query: see run_layers."""
    b, t, _ = x.shape
    dh = cfg.head_dim
    h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
    q, k, v = h @ w["wq"], h @ w["wk"], h @ w["wv"]
    if "bq" in w:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    q = q.reshape(b, t, cfg.num_attention_heads, dh).transpose(0, 2, 1, 3)  # [B, H, Q, Dh]
    k = k.reshape(b, t, cfg.num_key_value_heads, dh).transpose(0, 2, 1, 3)  # [B, Hkv, Q, Dh]
    v = v.reshape(b, t, cfg.num_key_value_heads, dh).transpose(0, 2, 1, 3)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_all, v_all = kv_read(k, v)
    out, probs = attention(q, k_all, v_all, mask, keys_transposed)
    out = out @ w["wo"]
    if "bo" in w:
        out = out + w["bo"]
    x = x + out
    h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
    gate, up = h @ w["w_gate"], h @ w["w_up"]
    if "b_gate" in w:
        gate, up = gate + w["b_gate"], up + w["b_up"]
    h = ACTIVATIONS[cfg.hidden_act](gate) * up
    h = h @ w["w_down"]
    if "b_down" in w:
        h = h + w["b_down"]
    if not want_probs:
        return x + h, None
    return x + h, (probs if probs_query is None else reduce_query_rows(probs, probs_query))


@flax.struct.dataclass
class StackedLayers:
    """Decoder weights as one stacked {name: [L, ...]} dict, with stacked KV caches ([L, B, ...]):
    one compiled layer body in a fori_loop. The default layout (training, accelerators)."""

    weights: dict[str, jax.Array]
    per_layer_caches = False  # KVCache.zeros(per_layer=...) for caches this stack writes

    def __len__(self) -> int:
        return self.weights["wq"].shape[0]

    def layer(self, i) -> dict[str, jax.Array]:
        return {name: a[i] for name, a in self.weights.items()}

    def write(self, ck, cv, layer, k_new, v_new, write_start, fresh: bool):
        """Store layer `layer`'s new keys / values; returns the caches and what attention reads."""
        if fresh:
            return write_kv_fresh(ck, layer, k_new, keys=True), write_kv_fresh(cv, layer, v_new), k_new, v_new
        ck, cv = write_kv(ck, layer, k_new, write_start, keys=True), write_kv(cv, layer, v_new, write_start)
        return ck, cv, ck[layer], cv[layer]

    def loop(self, body, start: int, stop: int, carry, want_last_probs: bool):
        last = stop - 1 if want_last_probs else stop
        if last > start:
            carry = jax.lax.fori_loop(start, last, lambda i, c: body(i, c), carry)
        if want_last_probs:
            carry = body(jnp.asarray(stop - 1), carry, want_probs=True)
        return carry


@flax.struct.dataclass
class LayerCopies:
    """The XLA-CPU adapter: each layer's weights in buffers of their own, run unrolled, with one KV
    cache array per layer written in place.

    XLA on CPU copies a slice of a stacked array (dynamic or static) before every matmul, which
    roughly tripled the weight traffic of a memory-bound decode step; separate buffers are read in
    place. Opt in with unstack_layers (the generators' layer_copies); it holds a second copy of
    the decoder weights while the stacked model is kept.
    """

    layers: tuple[dict[str, jax.Array], ...]
    per_layer_caches = True

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, i: int) -> dict[str, jax.Array]:
        return self.layers[i]

    def write(self, ck, cv, layer: int, k_new, v_new, write_start, fresh: bool):
        """Store layer `layer`'s new keys / values; returns the caches and what attention reads."""
        if fresh:
            k_l = write_kv_fresh(ck[layer][None], 0, k_new, keys=True)[0]
            v_l = write_kv_fresh(cv[layer][None], 0, v_new)[0]
            read = (k_new, v_new)
        else:
            k_l = write_kv_layer(ck[layer], k_new, write_start, keys=True)
            v_l = write_kv_layer(cv[layer], v_new, write_start)
            read = (k_l, v_l)
        return ck[:layer] + (k_l,) + ck[layer + 1:], cv[:layer] + (v_l,) + cv[layer + 1:], *read

    def loop(self, body, start: int, stop: int, carry, want_last_probs: bool):
        for i in range(start, stop):
            carry = body(i, carry, want_probs=want_last_probs and i == stop - 1)
        return carry


def unstack_layers(weights: dict[str, jax.Array]) -> LayerCopies:
    """Per-layer copies of stacked weights ({name: [L, ...]} -> L dicts of separate arrays); call
    outside jit, so each layer's weights become buffers of their own (see LayerCopies)."""
    n = next(iter(weights.values())).shape[0]
    return LayerCopies(tuple({name: jnp.array(a[i]) for name, a in weights.items()} for i in range(n)))


def run_layers(
    cfg: TextConfig,
    layers: StackedLayers | LayerCopies,
    x: jax.Array,  # [B, Q, D]
    positions: jax.Array,  # [B, Q] RoPE positions
    cache_k: jax.Array | tuple,  # [L, B, Hkv, Dh, S], or per layer for LayerCopies
    cache_v: jax.Array | tuple,  # [L, B, Hkv, S, Dh]
    write_start: jax.Array,  # [B] slot where the Q new entries go, per row
    *,
    start: int = 0,
    stop: int | None = None,
    cache_offset: int = 0,
    mask: jax.Array | None = None,  # [B, Q, S] override (tree attention); default causal by slot
    fresh: bool = False,
    return_last_probs: bool = False,
    probs_query: jax.Array | None = None,  # [B] int or [B, Q] float: see below
) -> LayerOut:
    """Run layers [start, stop) over x, writing K/V into cache layers start-cache_offset...

    layers: StackedLayers (one compiled layer body in a fori_loop) or LayerCopies (unrolled over
    per-layer buffers and caches); the stack owns the weight reads, the cache writes and the loop.
    fresh=True means every row starts at slot 0 with nothing cached (prefill): attention then runs
    over the Q new entries only, not the whole cache capacity.
    return_last_probs: also return the last layer's attention probabilities, [B, H, Q, S_att];
    with probs_query only the rows asked for, [B, H, S_att] (query [B] int: that query row of
    each batch row; [B, Q] float: the rows summed with those weights), so a prompt-long prefill
    does not hand a [B, H, S, S] array to its caller.
    """
    if stop is None:
        stop = len(layers)
    b, t, _ = x.shape
    s_cap = cache_v[0].shape[2]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    if mask is None:
        if fresh:
            mask = jnp.tril(jnp.ones((t, t), bool))[None]  # [1, Q, Q]
        else:
            slot = jnp.arange(s_cap)[None, None, :]  # [1, 1, S]
            q_slot = write_start[:, None, None] + jnp.arange(t)[None, :, None]  # [B, Q, 1]
            mask = slot <= q_slot  # [B, Q, S]
        mask = jnp.broadcast_to(mask, (b,) + mask.shape[1:])

    def body(i, carry, want_probs=False):
        x, ck, cv, _ = carry
        kv = {}

        def kv_read(k_new, v_new):
            kv["k"], kv["v"], k_read, v_read = layers.write(ck, cv, i - cache_offset, k_new, v_new, write_start,
                                                            fresh)
            return k_read, v_read

        x, probs = decoder_layer(cfg, layers.layer(i), x, cos, sin, kv_read, mask, want_probs,
                                 keys_transposed=not fresh, probs_query=probs_query)
        return x, kv["k"], kv["v"], probs

    if stop - start <= 0:
        return LayerOut(x, cache_k, cache_v, None)
    return LayerOut(*layers.loop(body, start, stop, (x, cache_k, cache_v, None), return_last_probs))


class LlamaModel(nnx.Module):
    """Token embedding, stacked decoder layers, final RMSNorm and LM head."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.embed = normal_init(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        self.layers = DecoderLayers(cfg, cfg.num_hidden_layers, rngs=rngs, dtype=dtype)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), dtype))
        self.lm_head = None if cfg.tie_word_embeddings else normal_init(rngs, (cfg.hidden_size, cfg.vocab_size), dtype)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:  # [B, Q, D]
        return jnp.take(self.embed[...], tokens, axis=0)

    def head_weight(self) -> jax.Array:  # [D, V]
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def logits(self, x: jax.Array) -> jax.Array:  # [B, Q, V] float32
        x = rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
        return jnp.einsum("btd,dv->btv", x, self.head_weight(), preferred_element_type=jnp.float32)


def scan_layers(cfg, weights: dict[str, jax.Array], x: jax.Array, positions: jax.Array, start: int, stop: int,
                *, remat: bool = False) -> jax.Array:  # [B, S, D]
    """Stacked decoder layers [start, stop) over a full causal sequence, without a KV cache.

    Same layer body (`llama.decoder_layer`) as inference; a scan over weight slices so the backward pass
    stores only one hidden state per layer (or none inside a layer with remat).
    """
    if stop <= start:
        return x
    w = {k: v[start:stop] for k, v in weights.items()}  # [n, ...] each
    b, s, _ = x.shape
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)  # [B, S, Dh]
    # Right padding only: causal attention keeps real tokens from seeing pads.
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool))[None], (b, s, s))  # [B, S, S]

    def body(h, wl):
        h, _ = decoder_layer(cfg, wl, h, cos, sin, lambda k, v: (k, v), mask, False)
        return h, None

    if remat:
        body = jax.checkpoint(body)
    x, _ = jax.lax.scan(body, x, w)
    return x
