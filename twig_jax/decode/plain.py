"""Prefill + one jitted `lax.while_loop` decode, batched with per-row lengths and EOS.

Prompts are right-padded to a bucket; row b's tokens sit in slots [0, lengths[b]) of the KV cache
and its RoPE positions equal its slots, so a padded batch computes exactly what each prompt would
alone. Compiled shapes come from (batch, prompt, new-token) buckets, so calls of similar sizes
reuse one executable.
"""

from __future__ import annotations


from typing import Any

import flax.struct
import jax
import jax.experimental
import jax.numpy as jnp

from twig_jax.decode.placement import constrain_cache
from twig_jax.model.cache import KVCache
from twig_jax.model.llama import run_layers
from twig_jax.model.llava import Llava
from twig_jax.decode.sampling import SamplingConfig, sample_logits







# ----------------------------------------------------------------------------------------------
# Pure model functions (traced inside jit)


def prefill(model: Llava, tokens: jax.Array, lengths: jax.Array, pixel_values: jax.Array | None,
            capacity: int, layer_weights=None) -> tuple[KVCache, jax.Array]:
    """Run the prompt; return the cache and the next-token logits.  # cache, [B, V]

    tokens: [B, S] right-padded; lengths: [B]; pixel_values: [B, C, H, W] or None.
    layer_weights: per-layer decoder weights (llama.unstack_layers) to use instead of the
    model's stacked ones.
    """
    tc = model.cfg.text
    b, s = tokens.shape
    feats = None if pixel_values is None else model.image_features(pixel_values)
    x = model.embed(tokens, feats)  # [B, S, D]
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
    layers = model.text.layers.stacked() if layer_weights is None else layer_weights
    cache = constrain_cache(KVCache.zeros(tc.num_hidden_layers, b, tc.num_key_value_heads, capacity, tc.head_dim,
                                          x.dtype, per_layer=layers.per_layer_caches))
    out = run_layers(tc, layers, x, positions, cache.k, cache.v,
                     jnp.zeros((b,), jnp.int32), fresh=True)
    last = jnp.take_along_axis(out.hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    return KVCache(out.k, out.v, lengths.astype(jnp.int32)), model.text.logits(last)[:, 0]


def decode_step(model: Llava, cache: KVCache, tokens: jax.Array, layer_weights=None) -> tuple[KVCache, jax.Array]:
    """Append tokens [B, Q] at each row's length; return the cache and logits.  # [B, Q, V]"""
    tc = model.cfg.text
    t = tokens.shape[1]
    x = model.text.embed_tokens(tokens)
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B, Q]
    layers = model.text.layers.stacked() if layer_weights is None else layer_weights
    out = run_layers(tc, layers, x, positions, cache.k, cache.v, cache.lengths)
    return KVCache(out.k, out.v, cache.lengths + t), model.text.logits(out.hidden)


@flax.struct.dataclass
class TokenLoopState:
    """The carry of the one-token-per-step loop."""

    step: jax.Array  # [] tokens emitted so far by the longest row (the next column of out)
    last_token: jax.Array  # [B] the token the next step appends
    cache: Any  # any cache pytree the step function reads and returns
    out: jax.Array  # [B, out_len] generated tokens, pad after a row stops
    done: jax.Array  # [B] bool: the row hit EOS, its budget, or is padding
    count: jax.Array  # [B] tokens generated per row
    key: jax.Array  # PRNG key


def suppress_eos(logits: jax.Array, eos: jax.Array, generated: jax.Array, min_new_tokens) -> jax.Array:
    """EOS logits set to -inf where fewer than min_new_tokens tokens precede the one being chosen (as
    Hugging Face's min_new_tokens does).  # same shape as logits

    logits: [..., V]; eos: [E] ids (-1 matches none); generated: [...] tokens generated before
    this position.
    """
    is_eos = jnp.isin(jnp.arange(logits.shape[-1]), eos)  # [V]
    block = (generated < min_new_tokens)[..., None] & is_eos
    return jnp.where(block, -jnp.inf, logits)


def token_loop(step, cache, logits: jax.Array, active: jax.Array, key: jax.Array, max_new_tokens: jax.Array, *,
               out_len: int, sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int, on_token=None,
               min_new_tokens: jax.Array | int = 0):
    """One-token-per-step generation in one while_loop, for any cache and step function.

    step(cache, tokens [B, 1]) -> (cache, logits [B, 1, V]). logits: [B, V] next-token logits after
    the prompt; active: [B] bool (False = padding row). Returns tokens [B, out_len] (pad after a
    row stops), the generated count per row [B] and the final cache (holding every generated token
    but the last), so a donated cache buffer is reused. on_token (streaming; static, None traces
    no callback): a host function called through an ordered io_callback as
    on_token(tokens [B, 1], n [B] (1 where the row emitted a token), zeros [B]). min_new_tokens
    (traced): EOS cannot be chosen before that many tokens (suppress_eos).
    """
    b = logits.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def pick(logits, key, done, generated):
        logits = suppress_eos(logits, eos, generated, min_new_tokens)
        tok = jnp.where(done, pad_id, sample_logits(logits, key, sampling))
        return tok, done | jnp.isin(tok, eos)

    def emit(tok, n):
        if on_token is not None:
            jax.experimental.io_callback(on_token, None, tok[:, None], n, jnp.zeros_like(n), ordered=True)

    key, sub = jax.random.split(key)
    done0 = ~active
    tok, done = pick(logits, sub, done0, jnp.zeros((b,), jnp.int32))
    out = jnp.full((b, out_len), pad_id, jnp.int32).at[:, 0].set(tok)
    count = (~done0).astype(jnp.int32)
    done = done | (count >= max_new_tokens)  # a row stops at its own budget
    emit(tok, count)

    def cond(st: TokenLoopState):
        return ~jnp.all(st.done)

    def body(st: TokenLoopState) -> TokenLoopState:
        cache, logits = step(st.cache, st.last_token[:, None])
        key, sub = jax.random.split(st.key)
        new, new_done = pick(logits[:, 0], sub, st.done, st.count)
        live = (~st.done).astype(jnp.int32)
        emit(new, live)
        out = jax.lax.dynamic_update_slice(st.out, new[:, None], (0, st.step))
        count = st.count + live
        return TokenLoopState(st.step + 1, new, cache, out, new_done | (count >= max_new_tokens), count, key)

    st = jax.lax.while_loop(cond, body, TokenLoopState(jnp.int32(1), tok, cache, out, done, count, key))
    return st.out, st.count, st.cache


def decode_loop(model: Llava, cache: KVCache, logits: jax.Array, active: jax.Array, key: jax.Array,
                max_new_tokens: jax.Array, *, out_len: int, sampling: SamplingConfig,
                eos_ids: tuple[int, ...], pad_id: int, layer_weights=None,
                min_new_tokens: jax.Array | int = 0) -> tuple[jax.Array, jax.Array, KVCache]:
    """Plain decoding of up to max_new_tokens (<= out_len) per row: token_loop over decode_step.

    Returns tokens [B, out_len], counts [B] and the cache (see token_loop).
    """
    return token_loop(lambda c, t: decode_step(model, c, t, layer_weights), cache, logits, active, key,
                      max_new_tokens, out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id,
                      min_new_tokens=min_new_tokens)


# ----------------------------------------------------------------------------------------------
# Host-side driver: validation, buckets, compiled functions




