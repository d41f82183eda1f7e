"""LLaVA-1.5: vision tower -> mlp2x_gelu projector -> LLaMA, with a static-shape image merge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from twig_jax.model.cache import KVCache
from twig_jax.model.config import LlavaConfig
from twig_jax.model.layers import ACTIVATIONS
from twig_jax.model.llama import LlamaModel, normal_init, run_layers
from twig_jax.model.vision import VisionTower


class Projector(nnx.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d_in, d = cfg.projector_in_dim, cfg.text.hidden_size
        self.act = cfg.projector_hidden_act
        self.w1 = normal_init(rngs, (d_in, d), dtype)
        self.w2 = normal_init(rngs, (d, d), dtype)
        self.b1 = nnx.Param(jnp.zeros((d,), dtype)) if cfg.projector_bias else None
        self.b2 = nnx.Param(jnp.zeros((d,), dtype)) if cfg.projector_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, N, D]
        x = x @ self.w1[...]
        if self.b1 is not None:
            x = x + self.b1[...]
        x = ACTIVATIONS[self.act](x) @ self.w2[...]
        if self.b2 is not None:
            x = x + self.b2[...]
        return x


class Llava(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        cfg.validate()
        self.cfg = cfg
        self.dtype = dtype
        # Blocks past the deepest selected feature layer never run, so they are not stored.
        self.vision = VisionTower(cfg.vision, max(cfg.feature_layers), rngs=rngs, dtype=dtype)
        self.projector = Projector(cfg, rngs=rngs, dtype=dtype)
        self.text = LlamaModel(cfg.text, rngs=rngs, dtype=dtype)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:  # [B, N, D]
        """Projected visual tokens for pixel_values [B, C, H, W]."""
        hidden = self.vision(pixel_values, self.cfg.feature_layers)  # [B, P+1, Dv]
        if self.cfg.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return self.projector(hidden)

    def embed(self, tokens: jax.Array, image_features: jax.Array | None) -> jax.Array:  # [B, S, D]
        """Token embeddings with the image placeholders replaced, in order, by image_features.

        A fixed-shape gather plus select: placeholder j of row b takes image_features[b, j]. The
        placeholder id is never looked up: it may lie outside the vocabulary (liuhaotian's -200).
        """
        is_image = tokens == self.cfg.image_token_index  # [B, S]
        x = self.text.embed_tokens(jnp.where(is_image, 0, tokens))
        if image_features is None:
            return x
        idx = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
        feats = jnp.take_along_axis(image_features, idx[..., None], axis=1)  # [B, S, D]
        return jnp.where(is_image[..., None], feats.astype(x.dtype), x)

    def __call__(self, tokens: jax.Array, pixel_values: jax.Array | None = None) -> jax.Array:  # [B, S, V]
        """Full causal forward pass without a cache (the reference path)."""
        feats = None if pixel_values is None else self.image_features(pixel_values)
        x = self.embed(tokens, feats)
        b, s = tokens.shape
        tc = self.cfg.text
        positions = jnp.broadcast_to(jnp.arange(s)[None], (b, s))
        cache = KVCache.zeros(tc.num_hidden_layers, b, tc.num_key_value_heads, s, tc.head_dim, x.dtype)
        out = run_layers(tc, self.text.layers.stacked(), x, positions, cache.k, cache.v, jnp.zeros((b,), jnp.int32),
                         fresh=True)
        return self.text.logits(out.hidden)
