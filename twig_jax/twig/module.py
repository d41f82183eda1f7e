"""The twig: T decoder layers + own RMSNorm + own LM head, grown on base layer K (docs/design.md, "The twig")."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from twig_jax.model.config import LlavaConfig, TextConfig
from twig_jax.model.layers import rms_norm
from twig_jax.model.llama import DecoderLayers, normal_init
from twig_jax.twig.config import TwigConfig
from twig_jax.twig.phead import PHead






class Twig(nnx.Module):
    """T stacked decoder layers (same shapes as the base's), a final RMSNorm and an LM head."""

    def __init__(self, text_cfg: TextConfig, twig_cfg: TwigConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.text_cfg = text_cfg
        self.twig_cfg = twig_cfg
        self.layers = DecoderLayers(text_cfg, twig_cfg.T, rngs=rngs, dtype=dtype)
        self.norm = nnx.Param(jnp.ones((text_cfg.hidden_size,), dtype))
        self.head = normal_init(rngs, (text_cfg.hidden_size, text_cfg.vocab_size), dtype)
        self.p_head = PHead(text_cfg, rngs=rngs, dtype=dtype) if twig_cfg.p_head else None

    def logits(self, x: jax.Array) -> jax.Array:  # [B, Q, V] float32
        x = rms_norm(x, self.norm[...], self.text_cfg.rms_norm_eps)
        return jnp.einsum("btd,dv->btv", x, self.head[...], preferred_element_type=jnp.float32)


def init_twig_from_base(base, twig_cfg: TwigConfig) -> Twig:
    """A twig initialised as copies of base layers K..K+T-1, the base final norm and LM head.

    base: a `twig_jax.model.llava.Llava`.
    """
    cfg: LlavaConfig = base.cfg
    twig_cfg.validate(cfg.text.num_hidden_layers, cfg.num_image_tokens)
    k, t = twig_cfg.K, twig_cfg.T
    dtype = base.text.embed[...].dtype
    twig = nnx.eval_shape(lambda: Twig(cfg.text, dataclasses.replace(twig_cfg, p_head=False), rngs=nnx.Rngs(0),
                                       dtype=dtype))
    for name, arr in base.text.layers.weights().items():
        getattr(twig.layers, name).set_value(jnp.array(arr[k:k + t]))  # a copy, not a view
    twig.norm.set_value(jnp.array(base.text.final_norm[...]))
    twig.head.set_value(jnp.array(base.text.head_weight()))
    if twig_cfg.p_head:
        from twig_jax.twig.phead import with_p_head

        twig = with_p_head(twig)
    return twig
