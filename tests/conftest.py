"""Shared test fixtures: tiny random HF LLaVA checkpoints built locally (nothing is downloaded).

Fixtures (session-scoped, built once per test session):
  hf_llava_mha, hf_llava_gqa -> TinyLlava(dir, model, cfg): a saved llava-hf checkpoint dir
      (safetensors, transformers' default key style), the float32 eager torch model in eval mode,
      and our LlavaConfig read back from the dir with `load_hf_config`.
  tiny_llava -> factory(**make_tiny_hf_llava kwargs) -> TinyLlava, cached per kwargs.
  llava_inputs -> make_llava_inputs (function fixture).
Helpers (also importable: `from conftest import make_llava_inputs, hf_logits, jax_logits`):
  make_llava_inputs(cfg, batch=2, ...) -> (input_ids int64 [B, S], pixel_values float32 [B, C, H, W]),
      each row with exactly cfg.num_image_tokens image placeholders (one image per row).
  hf_logits(torch_model, input_ids, pixel_values) -> np.ndarray [B, S, V] float32
  jax_logits(llava, input_ids, pixel_values) -> np.ndarray [B, S, V] float32 (jitted forward)
  sharpened_tiny_llava(head_scale) -> twig_jax Llava of the "tiny" preset with 4x query / key
      weights and a head_scale x LM head (peaky attention and next-token distributions)
  (pixel_values may be None for text-only input in both)
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 200
IMAGE_TOKEN = 199
IMAGE_SIZE = 28
PATCH = 7


class TinyLlava(NamedTuple):
    dir: str
    model: Any  # transformers.LlavaForConditionalGeneration (eval, float32, eager attention)
    cfg: Any  # twig_jax.model.config.LlavaConfig


def tiny_hf_configs(*, gqa: bool, vision_feature_layer=-2, select_strategy="default", tie=False):
    """(CLIPVisionConfig, LlamaConfig, LlavaConfig) of the tiny test model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=16, hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=256,
                     rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    n_img = (IMAGE_SIZE // PATCH) ** 2 + (1 if select_strategy == "full" else 0)
    if isinstance(vision_feature_layer, tuple):
        vision_feature_layer = list(vision_feature_layer)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, image_seq_length=n_img,
                      vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=select_strategy,
                      tie_word_embeddings=tie, pad_token_id=0)
    return vc, tc, cfg


def randomize_(model, seed: int) -> None:
    """Re-initialise every parameter with O(1)-scale values so logits are far from 0."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or "layrnorm" in name:  # LayerNorm / RMSNorm
                p.copy_(1.0 + 0.2 * noise if leaf == "weight" else 0.2 * noise)
            elif leaf == "bias":
                p.copy_(0.2 * noise)
            elif "embed" in name or p.ndim == 1:  # token / position / class embeddings
                p.copy_(noise)
            else:  # Linear / conv weights: unit-variance outputs
                p.copy_(noise / math.sqrt(p[0].numel()))


def make_tiny_hf_llava(tmpdir, *, gqa: bool, vision_feature_layer=-2, select_strategy="default", seed=0,
                       tie=False, save: bool = True, **save_kwargs) -> TinyLlava:
    """Build a tiny random `LlavaForConditionalGeneration`, save_pretrained it into `tmpdir`.

    CLIP vision: hidden 32, 3 layers, 4 heads, image 28, patch 7 (16 patches). LLaMA: vocab 200,
    hidden 64, 2 layers, 4 heads, 4 (MHA) or 2 (GQA) kv heads, intermediate 128.
    image_token_index 199. Extra kwargs go to save_pretrained (e.g. max_shard_size).
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    from twig_jax.model.config import load_hf_config

    *_, cfg = tiny_hf_configs(gqa=gqa, vision_feature_layer=vision_feature_layer,
                              select_strategy=select_strategy, tie=tie)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    if tie:
        model.tie_weights()
    model = model.float().eval()
    tmpdir = str(tmpdir)
    if save:
        model.save_pretrained(tmpdir, **save_kwargs)
    return TinyLlava(tmpdir, model, load_hf_config(tmpdir) if save else None)


def make_llava_inputs(cfg, *, batch: int = 2, prefix: int = 3, suffix: int = 5, seed: int = 0):
    """input_ids [B, S] (int64) with exactly cfg.num_image_tokens image tokens per row, at a
    different offset in each row, and pixel_values [B, C, H, W] (float32, CLIP-normalised scale)."""
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    s = prefix + n + suffix + batch
    vocab = cfg.text.vocab_size
    ids = rng.integers(0, vocab - 1, size=(batch, s))
    ids[ids >= cfg.image_token_index] += 1  # never the image token by chance
    for b in range(batch):
        start = prefix + b
        ids[b, start:start + n] = cfg.image_token_index
    v = cfg.vision
    pixels = rng.standard_normal((batch, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return ids.astype(np.int64), pixels


def hf_logits(model, input_ids, pixel_values) -> np.ndarray:
    import torch

    pix = None if pixel_values is None else torch.as_tensor(np.asarray(pixel_values, np.float32))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long), pixel_values=pix)
    return out.logits.float().numpy()


_JIT_FORWARD = None


def jax_logits(llava, input_ids, pixel_values) -> np.ndarray:
    global _JIT_FORWARD
    import jax.numpy as jnp
    from flax import nnx

    if _JIT_FORWARD is None:
        _JIT_FORWARD = nnx.jit(lambda m, t, p: m(t, p))
    pix = None if pixel_values is None else jnp.asarray(np.asarray(pixel_values, np.float32))
    out = _JIT_FORWARD(llava, jnp.asarray(np.asarray(input_ids), jnp.int32), pix)
    return np.asarray(out, np.float32)


def sharpened_tiny_llava(head_scale: float):
    """The "tiny" preset LLaVA (twig_jax, seed 0) with sharpened attention (4x W_q, W_k) and a
    head_scale x LM head, so that greedy choices are decided and draft confidences vary."""
    from flax import nnx

    from twig_jax.model.config import load_preset
    from twig_jax.model.llava import Llava

    model = Llava(load_preset("tiny"), rngs=nnx.Rngs(0))
    model.text.layers.wq[...] = model.text.layers.wq[...] * 4
    model.text.layers.wk[...] = model.text.layers.wk[...] * 4
    model.text.lm_head[...] = model.text.lm_head[...] * head_scale
    return model


def rel_err(a, b) -> float:
    """max|a - b| / max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """Factory: tiny_llava(gqa=..., vision_feature_layer=..., select_strategy=..., seed=..., tie=...)
    -> TinyLlava, built once per distinct kwargs for the whole session. Do not mutate the result."""
    cache: dict = {}

    def make(**kwargs) -> TinyLlava:
        kwargs.setdefault("gqa", False)
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
        if key not in cache:
            name = "hf_" + "_".join(f"{k}{v}" for k, v in key).replace(" ", "").replace(",", "_")
            name = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:80]
            cache[key] = make_tiny_hf_llava(tmp_path_factory.mktemp(name), **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def hf_llava_mha(tiny_llava) -> TinyLlava:
    return tiny_llava(gqa=False)


@pytest.fixture(scope="session")
def hf_llava_gqa(tiny_llava) -> TinyLlava:
    return tiny_llava(gqa=True)


@pytest.fixture(scope="session")
def llava_inputs():
    return make_llava_inputs
