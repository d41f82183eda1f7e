"""Explicit KV-cache pytree with per-row lengths.

Slots are written left to right per row; `lengths[b]` counts the valid slots of row b. Stale
slots past a row's length are masked and overwritten later, so rolling back (speculative decoding)
is only a matter of moving `lengths` back.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    # Keys are stored transposed so both attention matmuls read the cache in the layout XLA's dot
    # wants; otherwise XLA transposes a copy of each layer's keys and values on every step.
    # Either one stacked array (k: [L, B, Hkv, Dh, S]) or, per_layer, a tuple of L arrays
    # ([B, Hkv, Dh, S] each): the unrolled decode reads and writes those in place, where slicing a
    # stacked cache costs a copy of the layer's K/V per step.
    k: jax.Array | tuple[jax.Array, ...]  # [L, B, Hkv, Dh, S]
    v: jax.Array | tuple[jax.Array, ...]  # [L, B, Hkv, S, Dh]
    lengths: jax.Array  # [B] int32, valid slots per row

    @property
    def capacity(self) -> int:
        return self.layer_v_shape()[-2]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def layer_v_shape(self) -> tuple[int, ...]:
        """Shape of one layer's value cache [B, Hkv, S, Dh]."""
        return (self.v[0] if isinstance(self.v, tuple) else self.v[0]).shape

    @staticmethod
    def zeros(num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype,
              per_layer: bool = False) -> "KVCache":
        k_shape = (batch, num_kv_heads, head_dim, capacity)
        v_shape = (batch, num_kv_heads, capacity, head_dim)
        lengths = jnp.zeros((batch,), jnp.int32)
        if per_layer:
            return KVCache(tuple(jnp.zeros(k_shape, dtype) for _ in range(num_layers)),
                           tuple(jnp.zeros(v_shape, dtype) for _ in range(num_layers)), lengths)
        return KVCache(jnp.zeros((num_layers,) + k_shape, dtype), jnp.zeros((num_layers,) + v_shape, dtype), lengths)

    def nbytes_per_sequence(self) -> int:
        """KV bytes one sequence holds at full capacity."""
        arrays = list(self.k) + list(self.v) if isinstance(self.k, tuple) else [self.k, self.v]
        return sum(a.size * a.dtype.itemsize for a in arrays) // self.batch_size


def write_kv(cache_kv: jax.Array, layer: jax.Array, new: jax.Array, start: jax.Array,
             keys: bool = False) -> jax.Array:  # [L, B, Hkv, S, Dh] (keys: [L, B, Hkv, Dh, S])
    """Write new [B, Hkv, Q, Dh] into layer `layer` at per-row slot offsets start [B].

    One scatter on the whole cache, which XLA performs in place inside the layer loop. (A vmap of
    dynamic_update_slice over the batch axis made XLA re-lay-out and copy the entire cache for
    every layer.)
    """
    b, _, t, _ = new.shape
    rows = jnp.arange(b)[:, None]  # [B, 1]
    slots = start[:, None] + jnp.arange(t)[None]  # [B, Q]
    upd = new.transpose(0, 2, 1, 3).astype(cache_kv.dtype)  # [B, Q, Hkv, Dh]
    if keys:
        return cache_kv.at[layer, rows, :, :, slots].set(upd)
    return cache_kv.at[layer, rows, :, slots].set(upd)


def write_kv_fresh(cache_kv: jax.Array, layer: jax.Array, new: jax.Array,
                   keys: bool = False) -> jax.Array:  # [L, B, Hkv, S, Dh] (keys: [L, B, Hkv, Dh, S])
    """Write new [B, Hkv, Q, Dh] into slots [0, T) of every row (prefill): a plain slice update."""
    if keys:
        new = new.transpose(0, 1, 3, 2)
    return jax.lax.dynamic_update_slice(cache_kv, new[None].astype(cache_kv.dtype), (layer, 0, 0, 0, 0))


def write_kv_layer(cache_l: jax.Array, new: jax.Array, start: jax.Array,
                   keys: bool = False) -> jax.Array:  # [B, Hkv, S, Dh] (keys: [B, Hkv, Dh, S])
    """Write new [B, Hkv, Q, Dh] into one layer's own cache buffer at per-row slot offsets start [B].

    The scatter indexes (row, head, slot) triples. Indexed by (row, slot) only, a batch-1 write
    became a dynamic-update-slice that XLA CPU fused twice (into the attention read and into the
    carried cache) and so copied the layer's whole cache several times per decode step; this form
    stays one in-place scatter at every batch size.
    """
    b, h, t, _ = new.shape
    rows = jnp.arange(b)[:, None, None]  # [B, 1, 1]
    heads = jnp.arange(h)[None, :, None]  # [1, Hkv, 1]
    slots = (start[:, None] + jnp.arange(t)[None])[:, None, :]  # [B, 1, Q]
    new = new.astype(cache_l.dtype)  # [B, Hkv, Q, Dh]
    if keys:
        return cache_l.at[rows, heads, :, slots].set(new)
    return cache_l.at[rows, heads, slots].set(new)
