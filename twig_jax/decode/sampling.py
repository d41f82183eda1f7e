"""Next-token selection: greedy, temperature, top-k, top-p (applied in that order, as HF does)."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp


class SamplingConfigError(ValueError):
    """Sampling settings no sampler can use (NaN or infinite temperature, top_k < 0, top_p outside (0, 1])."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables

    def __post_init__(self):
        # NaN passes every ordered comparison's negation, so each check states what is allowed.
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (isinstance(t, numbers.Real) and math.isfinite(t) and t >= 0):
            raise SamplingConfigError(f"temperature must be a finite number >= 0 (0 is greedy), got {t!r}")
        if not (isinstance(k, numbers.Integral) and k >= 0):
            raise SamplingConfigError(f"top_k must be an integer >= 0 (0 keeps every token), got {k!r}")
        if not (isinstance(p, numbers.Real) and 0.0 < p <= 1.0):
            raise SamplingConfigError(f"top_p must be in (0, 1] (1 keeps every token), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filtered_logits(logits: jax.Array, sc: SamplingConfig) -> jax.Array:  # [B, V] float32
    """Logits after temperature / top-k / top-p; removed entries are -inf."""
    logits = logits.astype(jnp.float32) / sc.temperature
    neg = jnp.finfo(jnp.float32).min
    if sc.top_k > 0 and sc.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sc.top_k)[0][..., -1:]  # [B, 1]
        logits = jnp.where(logits < kth, neg, logits)
    if sc.top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = mass_before < sc.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def sample_logits(logits: jax.Array, key: jax.Array, sc: SamplingConfig) -> jax.Array:  # [B] int32
    if sc.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, sc), axis=-1).astype(jnp.int32)
