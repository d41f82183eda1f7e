"""Prefill + one jitted `lax.while_loop` decode, batched with per-row lengths and EOS.

Prompts are right-padded to a bucket; row b's tokens sit in slots [0, lengths[b]) of the KV cache
and its RoPE positions equal its slots, so a padded batch computes exactly what each prompt would
alone. Compiled shapes come from (batch, prompt, new-token) buckets, so calls of similar sizes
reuse one executable.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twig_jax.cache import KVCache
from twig_jax.model.llama import run_layers, unstack_layers
from twig_jax.model.llava import Llava
from twig_jax.sampling import SamplingConfig, sample_logits

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Every 128 tokens from 512 to 2048: a LLaVA prompt (576 visual tokens + text) wastes < 20% on padding.
PROMPT_BUCKETS = (64, 128, 256, 384) + tuple(range(512, 2049, 128)) + (2560, 3072, 3584, 4096)
# Prompts with an image: the N visual tokens are exact, so only the text needs a bucket (length =
# N + a text bucket, or the prompt bucket where that is shorter). A 144-visual-token prompt with 20
# words pads to 176, not to 256; TTP's pruned groups (R visual + text) shrink by the same padding.
TEXT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
NEW_TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class InputError(ValueError):
    """Bad user input to generation (named, never a raw XLA trace)."""


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise InputError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


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
    cache = KVCache.zeros(tc.num_hidden_layers, b, tc.num_key_value_heads, capacity, tc.head_dim, x.dtype,
                          per_layer=layer_weights is not None)
    out = run_layers(tc, layer_weights or model.text.layers.weights(), x, positions, cache.k, cache.v,
                     jnp.zeros((b,), jnp.int32), fresh=True)
    last = jnp.take_along_axis(out.hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    return KVCache(out.k, out.v, lengths.astype(jnp.int32)), model.text.logits(last)[:, 0]


def decode_step(model: Llava, cache: KVCache, tokens: jax.Array, layer_weights=None) -> tuple[KVCache, jax.Array]:
    """Append tokens [B, T] at each row's length; return the cache and logits.  # [B, T, V]"""
    tc = model.cfg.text
    t = tokens.shape[1]
    x = model.text.embed_tokens(tokens)
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B, T]
    out = run_layers(tc, layer_weights or model.text.layers.weights(), x, positions, cache.k, cache.v, cache.lengths)
    return KVCache(out.k, out.v, cache.lengths + t), model.text.logits(out.hidden)


def token_loop(step, cache, logits: jax.Array, active: jax.Array, key: jax.Array, max_new_tokens: jax.Array, *,
               out_len: int, sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int, on_token=None):
    """One-token-per-step generation in one while_loop, for any cache and step function.

    step(cache, tokens [B, 1]) -> (cache, logits [B, 1, V]). logits: [B, V] next-token logits after
    the prompt; active: [B] bool (False = padding row). Returns tokens [B, out_len] (pad after a
    row stops), the generated count per row [B] and the final cache (holding every generated token
    but the last), so a donated cache buffer is reused. on_token (streaming; static, None traces
    no callback): a host function called through an ordered io_callback as
    on_token(tokens [B, 1], n [B] (1 where the row emitted a token), zeros [B]).
    """
    b = logits.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def pick(logits, key, done):
        tok = jnp.where(done, pad_id, sample_logits(logits, key, sampling))
        return tok, done | jnp.isin(tok, eos)

    def emit(tok, n):
        if on_token is not None:
            jax.experimental.io_callback(on_token, None, tok[:, None], n, jnp.zeros_like(n), ordered=True)

    key, sub = jax.random.split(key)
    done0 = ~active
    tok, done = pick(logits, sub, done0)
    out = jnp.full((b, out_len), pad_id, jnp.int32).at[:, 0].set(tok)
    count = (~done0).astype(jnp.int32)
    emit(tok, count)

    def cond(state):
        i, _, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, out, done, count, key = state
        cache, logits = step(cache, tok[:, None])
        key, sub = jax.random.split(key)
        new, new_done = pick(logits[:, 0], sub, done)
        emit(new, (~done).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
        return i + 1, new, cache, out, new_done, count + (~done).astype(jnp.int32), key

    state = (jnp.int32(1), tok, cache, out, done, count, key)
    _, _, cache, out, _, count, _ = jax.lax.while_loop(cond, body, state)
    return out, count, cache


def decode_loop(model: Llava, cache: KVCache, logits: jax.Array, active: jax.Array, key: jax.Array,
                max_new_tokens: jax.Array, *, out_len: int, sampling: SamplingConfig,
                eos_ids: tuple[int, ...], pad_id: int, layer_weights=None) -> tuple[jax.Array, jax.Array, KVCache]:
    """Plain decoding of up to max_new_tokens (<= out_len) per row: token_loop over decode_step.

    Returns tokens [B, out_len], counts [B] and the cache (see token_loop).
    """
    return token_loop(lambda c, t: decode_step(model, c, t, layer_weights), cache, logits, active, key,
                      max_new_tokens, out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id)


# ----------------------------------------------------------------------------------------------
# Host-side driver: validation, buckets, compiled functions


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated tokens per row, up to and including EOS
    num_generated: np.ndarray  # [B]


class Generator:
    """Batched generation with compiled prefill and decode loop, cached per shape bucket."""

    per_layer_decode = True  # decode from per-layer weight copies (faster on XLA CPU, 2x decoder memory)

    def __init__(self, model: Llava, *, max_cache_len: int | None = None,
                 batch_buckets: Sequence[int] = BATCH_BUCKETS, prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
                 new_token_buckets: Sequence[int] = NEW_TOKEN_BUCKETS,
                 text_buckets: Sequence[int] | None = TEXT_BUCKETS, layer_weights=None):
        """text_buckets: prompts with an image pad to N visual tokens + a text bucket (None: every
        prompt pads to a prompt bucket)."""
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        # Decoder weights as separate per-layer buffers (see llama.unstack_layers). They are a
        # second copy of the decoder weights while the caller also keeps the stacked model;
        # generators on the same model can share one copy (pass another's .layer_weights).
        if not self.per_layer_decode:
            layer_weights = None
        elif layer_weights is None:
            layer_weights = unstack_layers(model.text.layers.weights())
        elif len(layer_weights) != self.cfg.text.num_hidden_layers:
            raise ValueError(f"layer_weights has {len(layer_weights)} layers; the model has "
                             f"{self.cfg.text.num_hidden_layers}")
        self.layer_weights = layer_weights
        self.max_cache_len = max_cache_len or self.cfg.text.max_position_embeddings
        self.batch_buckets = tuple(batch_buckets)
        self.prompt_buckets = tuple(prompt_buckets)
        self.new_token_buckets = tuple(new_token_buckets)
        self.text_buckets = None if text_buckets is None else tuple(text_buckets)
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("capacity",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("out_len", "sampling", "eos_ids", "pad_id"),
                               donate_argnames=("cache",))

    # jitted bodies: the model is rebuilt from (static graphdef, traced state) inside the trace
    def _prefill_impl(self, state, layer_weights, tokens, lengths, pixel_values, *, capacity):
        return prefill(nnx.merge(self.graphdef, state), tokens, lengths, pixel_values, capacity, layer_weights)

    def _decode_impl(self, state, layer_weights, cache, logits, active, key, max_new_tokens, *, out_len, sampling,
                     eos_ids, pad_id):
        return decode_loop(nnx.merge(self.graphdef, state), cache, logits, active, key, max_new_tokens,
                           out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id,
                           layer_weights=layer_weights)

    # --- input checks -------------------------------------------------------------------------
    def check_inputs(self, prompts: Sequence[Sequence[int]], pixel_values, max_new_tokens: int) -> None:
        cfg = self.cfg
        if len(prompts) == 0:
            raise InputError("empty batch: no prompts given")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        n_img = cfg.num_image_tokens
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise InputError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < cfg.text.vocab_size]
            if bad:
                raise InputError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.text.vocab_size}): {bad[:5]}")
            if len(p) + max_new_tokens > self.max_cache_len:
                raise InputError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that needs "
                    f"{len(p) + max_new_tokens} cache slots, over the cache capacity {self.max_cache_len}")
            count = sum(1 for t in p if t == cfg.image_token_index)
            want = 0 if pixel_values is None else n_img
            if count != want:
                what = "no image given" if pixel_values is None else "one image per prompt"
                raise InputError(
                    f"prompt {i} has {count} image placeholder tokens (id {cfg.image_token_index}); "
                    f"expected {want} ({what}, {n_img} visual tokens per image)")
        if pixel_values is not None:
            v = cfg.vision
            want_shape = (len(prompts), v.num_channels, v.image_size, v.image_size)
            if tuple(pixel_values.shape) != want_shape:
                raise InputError(
                    f"pixel_values has shape {tuple(pixel_values.shape)}; expected {want_shape} "
                    f"([batch, channels, image_size, image_size])")

    def prompt_bucket(self, longest: int, with_image: bool) -> int:
        """Padded prompt length for a batch whose longest prompt has `longest` tokens: the smaller of
        its prompt bucket and (with an image and text_buckets) N + its text's bucket."""
        fits = []
        if longest <= self.prompt_buckets[-1]:
            fits.append(bucket(longest, self.prompt_buckets, "prompt length"))
        n_img = self.cfg.num_image_tokens
        if with_image and self.text_buckets is not None and longest - n_img <= self.text_buckets[-1]:
            fits.append(n_img + bucket(longest - n_img, self.text_buckets, "prompt text length"))
        if not fits:
            raise InputError(f"prompt length {longest} exceeds the largest prompt bucket {self.prompt_buckets[-1]}"
                             + (f" (and its text, {longest - n_img} tokens besides the image, the largest text "
                                f"bucket {self.text_buckets[-1]})" if with_image and self.text_buckets else ""))
        return min(fits)

    def pad_inputs(self, prompts, pixel_values, max_new_tokens: int):
        """Right-pad prompts into (batch, prompt) buckets; returns arrays plus the bucket sizes."""
        n = len(prompts)
        b = bucket(n, self.batch_buckets, "batch size")
        s = self.prompt_bucket(max(len(p) for p in prompts), pixel_values is not None)
        new = bucket(max_new_tokens, self.new_token_buckets, "max_new_tokens")
        capacity = min(s + new, max(s, self.max_cache_len))
        pad = self.cfg.text.pad_token_id or 0
        tokens = np.full((b, s), pad, np.int32)
        lengths = np.ones((b,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        active = np.arange(b) < n
        pv = None
        if pixel_values is not None:
            pv = np.zeros((b,) + tuple(pixel_values.shape[1:]), np.float32)
            pv[:n] = np.asarray(pixel_values, np.float32)
        return tokens, lengths, active, pv, new, capacity

    # --- entry points ---------------------------------------------------------------------------
    def run_prefill(self, tokens, lengths, pixel_values, capacity: int) -> tuple[KVCache, jax.Array]:
        """The compiled prefill on already padded arrays (benchmarks time it on its own)."""
        return self._prefill(self.state, self.layer_weights, tokens, lengths, pixel_values, capacity=capacity)

    def run_decode(self, cache: KVCache, logits, active, key, max_new_tokens, *, out_len: int,
                   sampling: SamplingConfig = SamplingConfig(), eos_ids: tuple[int, ...] = (), pad_id: int = 0):
        """The compiled decode loop (donates `cache`); returns tokens [B, out_len], counts [B], cache."""
        return self._decode(self.state, self.layer_weights, cache, logits, active, key, max_new_tokens,
                            out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id)

    def generate(self, prompts: Sequence[Sequence[int]], pixel_values=None, *, max_new_tokens: int = 128,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                 eos_ids: Sequence[int] | None = None) -> GenerationOutput:
        """prompts: token id lists (image placeholders already expanded); pixel_values [B, C, H, W]."""
        self.check_inputs(prompts, pixel_values, max_new_tokens)
        tokens, lengths, active, pv, out_len, capacity = self.pad_inputs(prompts, pixel_values, max_new_tokens)
        if eos_ids is None:
            eos_ids = () if self.cfg.text.eos_token_id is None else (self.cfg.text.eos_token_id,)
        pad_id = self.cfg.text.pad_token_id if self.cfg.text.pad_token_id is not None else 0
        cache, logits = self.run_prefill(tokens, lengths, pv, capacity)
        out, count, _ = self.run_decode(cache, logits, active, jax.random.key(seed), jnp.int32(max_new_tokens),
                                        out_len=out_len, sampling=sampling,
                                        eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id))
        out, count = np.asarray(out), np.asarray(count)
        n = len(prompts)
        return GenerationOutput([out[i, :count[i]].tolist() for i in range(n)], count[:n])
