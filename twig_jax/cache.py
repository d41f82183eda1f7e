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
    k: jax.Array  # [L, B, Hkv, Dh, S]
    v: jax.Array  # [L, B, Hkv, S, Dh]
    lengths: jax.Array  # [B] int32, valid slots per row

    @property
    def capacity(self) -> int:
        return self.v.shape[3]

    @property
    def batch_size(self) -> int:
        return self.v.shape[1]

    @staticmethod
    def zeros(num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype) -> "KVCache":
        k_shape = (num_layers, batch, num_kv_heads, head_dim, capacity)
        v_shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        return KVCache(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype), jnp.zeros((batch,), jnp.int32))

    def nbytes_per_sequence(self) -> int:
        """KV bytes one sequence holds at full capacity."""
        return 2 * self.k[:, 0].size * self.k.dtype.itemsize


def write_kv(cache_kv: jax.Array, layer: jax.Array, new: jax.Array, start: jax.Array,
             keys: bool = False) -> jax.Array:  # [L, B, Hkv, S, Dh] (keys: [L, B, Hkv, Dh, S])
    """Write new [B, Hkv, T, Dh] into layer `layer` at per-row slot offsets start [B].

    One scatter on the whole cache, which XLA performs in place inside the layer loop. (A vmap of
    dynamic_update_slice over the batch axis made XLA re-lay-out and copy the entire cache for
    every layer.)
    """
    b, _, t, _ = new.shape
    rows = jnp.arange(b)[:, None]  # [B, 1]
    slots = start[:, None] + jnp.arange(t)[None]  # [B, T]
    upd = new.transpose(0, 2, 1, 3).astype(cache_kv.dtype)  # [B, T, Hkv, Dh]
    if keys:
        return cache_kv.at[layer, rows, :, :, slots].set(upd)
    return cache_kv.at[layer, rows, :, slots].set(upd)


def write_kv_fresh(cache_kv: jax.Array, layer: jax.Array, new: jax.Array,
                   keys: bool = False) -> jax.Array:  # [L, B, Hkv, S, Dh] (keys: [L, B, Hkv, Dh, S])
    """Write new [B, Hkv, T, Dh] into slots [0, T) of every row (prefill): a plain slice update."""
    if keys:
        new = new.transpose(0, 1, 3, 2)
    return jax.lax.dynamic_update_slice(cache_kv, new[None].astype(cache_kv.dtype), (layer, 0, 0, 0, 0))
