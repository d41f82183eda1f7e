"""Pure tensor functions shared by the vision tower, the decoder and the twig."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:  # [B, M, ...]
    """x[b, idx[b, m]] for x [B, S, ...] and per-row indices idx [B, M] (visual / kept / last rows)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:  # [..., D]
    """LLaMA RMSNorm: normalise in float32, cast back, then scale (HF's order)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:  # [..., D]
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin for rotate-half RoPE, computed in float32 as HF does.  # [B, Q, Dh] each"""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [Dh/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, Q, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, Q, Dh]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:  # [B, H, Q, Dh]
    """x: [B, H, Q, Dh]; cos/sin: [B, Q, Dh]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
              keys_transposed: bool = False) -> tuple[jax.Array, jax.Array]:
    """Grouped-query attention.

    q: [B, H, Q, Dh]; k: [B, Hkv, S, Dh] (or [B, Hkv, Dh, S] with keys_transposed, the cache
    layout); v: [B, Hkv, S, Dh]; mask: [B, Q, S] bool (True = attend) or None.
    Returns the output [B, Q, H*Dh] and the probabilities [B, H, Q, S] (float32; XLA drops them
    when unused).
    """
    b, h, t, dh = q.shape
    hkv = v.shape[1]
    qg = q.reshape(b, hkv, h // hkv, t, dh)  # [B, Hkv, G, Q, Dh]
    spec = "bkgtd,bkds->bkgts" if keys_transposed else "bkgtd,bksd->bkgts"
    scores = jnp.einsum(spec, qg, k, preferred_element_type=jnp.float32)
    scores = scores * (dh ** -0.5)
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, Hkv, G, Q, S]
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v)  # [B, Hkv, G, Q, Dh]
    out = out.transpose(0, 3, 1, 2, 4)  # [B, Q, Hkv, G, Dh]
    return out.reshape(b, t, h * dh), probs.reshape(b, h, t, -1)
