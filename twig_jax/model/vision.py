"""CLIP ViT vision tower (pre-LayerNorm blocks, quick_gelu) with stacked block weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from twig_jax.model.config import VisionConfig
from twig_jax.model.layers import ACTIVATIONS, attention, layer_norm
from twig_jax.model.llama import normal_init


class VisionBlocks(nnx.Module):
    """Stacked CLIP encoder blocks; kernels stored [in, out]."""

    def __init__(self, cfg: VisionConfig, num_layers: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        n, d, i = num_layers, cfg.hidden_size, cfg.intermediate_size
        self.ln1_scale = nnx.Param(jnp.ones((n, d), dtype))
        self.ln1_bias = nnx.Param(jnp.zeros((n, d), dtype))
        for name in ("q", "k", "v", "o"):
            setattr(self, f"w{name}", normal_init(rngs, (n, d, d), dtype))
            setattr(self, f"b{name}", nnx.Param(jnp.zeros((n, d), dtype)))
        self.ln2_scale = nnx.Param(jnp.ones((n, d), dtype))
        self.ln2_bias = nnx.Param(jnp.zeros((n, d), dtype))
        self.w_fc1 = normal_init(rngs, (n, d, i), dtype)
        self.b_fc1 = nnx.Param(jnp.zeros((n, i), dtype))
        self.w_fc2 = normal_init(rngs, (n, i, d), dtype)
        self.b_fc2 = nnx.Param(jnp.zeros((n, d), dtype))

    def weights(self) -> dict[str, jax.Array]:
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}


def _block(cfg: VisionConfig, w: dict, x: jax.Array) -> jax.Array:  # [B, P, D]
    b, p, d = x.shape
    heads = cfg.num_attention_heads
    h = layer_norm(x, w["ln1_scale"], w["ln1_bias"], cfg.layer_norm_eps)

    def split(y):  # [B, P, D] -> [B, H, P, Dh]
        return y.reshape(b, p, heads, d // heads).transpose(0, 2, 1, 3)

    q, k, v = (split(h @ w[f"w{n}"] + w[f"b{n}"]) for n in "qkv")
    out, _ = attention(q, k, v, None)
    x = x + out @ w["wo"] + w["bo"]
    h = layer_norm(x, w["ln2_scale"], w["ln2_bias"], cfg.layer_norm_eps)
    h = ACTIVATIONS[cfg.hidden_act](h @ w["w_fc1"] + w["b_fc1"])
    return x + h @ w["w_fc2"] + w["b_fc2"]


class VisionTower(nnx.Module):
    """CLIP vision transformer, built only as deep as the deepest selected feature layer."""

    def __init__(self, cfg: VisionConfig, num_layers: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        self.cfg = cfg
        self.patch_embed = normal_init(rngs, (c * p * p, d), dtype)  # conv kernel as [C*P*P, D]
        self.class_embed = normal_init(rngs, (d,), dtype)
        self.pos_embed = normal_init(rngs, (cfg.num_patches + 1, d), dtype)
        self.pre_ln_scale = nnx.Param(jnp.ones((d,), dtype))
        self.pre_ln_bias = nnx.Param(jnp.zeros((d,), dtype))
        self.blocks = VisionBlocks(cfg, num_layers, rngs=rngs, dtype=dtype)
        self.num_layers = num_layers

    def __call__(self, pixel_values: jax.Array, feature_layers: tuple[int, ...]) -> jax.Array:  # [B, P+1, D*len]
        """Hidden states at HF `hidden_states` indices `feature_layers` (0 = embeddings),
        concatenated on the feature axis. pixel_values: [B, C, H, W] (NCHW, as HF)."""
        cfg = self.cfg
        b, c, hgt, wid = pixel_values.shape
        p, g = cfg.patch_size, cfg.image_size // cfg.patch_size
        x = pixel_values.astype(self.patch_embed[...].dtype)
        # Non-overlapping patches in (C, P, P) order, matching the flattened conv kernel.
        x = x.reshape(b, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
        x = x @ self.patch_embed[...]  # [B, P, D]
        cls = jnp.broadcast_to(self.class_embed[...], (b, 1, cfg.hidden_size)).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...][None]
        x = layer_norm(x, self.pre_ln_scale[...], self.pre_ln_bias[...], cfg.layer_norm_eps)
        weights = self.blocks.weights()
        deepest = max(feature_layers)
        if len(feature_layers) == 1:
            x = jax.lax.fori_loop(0, deepest, lambda i, y: _block(cfg, {k: a[i] for k, a in weights.items()}, y), x)
            return x
        # Several feature layers: scan and keep every block's output.
        def step(y, w):
            y = _block(cfg, w, y)
            return y, y
        w_used = {k: a[:deepest] for k, a in weights.items()}
        _, hs = jax.lax.scan(step, x, w_used)  # [deepest, B, P+1, D]
        hs = jnp.concatenate([x[None], hs], axis=0)
        return jnp.concatenate([hs[i] for i in feature_layers], axis=-1)
