"""research/grow.py: the grown model computes the shallow LM's function exactly (its logits against the
shallow model's own forward pass), keeps the target's vision tower and projector, trains its new
layers, and refuses an incompatible pair."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.grow import GrowError, grow
from twig_jax.model.config import LlavaConfig, TextConfig, VisionConfig
from twig_jax.model.llava import Llava


def _cfg(layers: int, hidden: int = 64) -> LlavaConfig:
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=8, hidden_act="quick_gelu")
    text = TextConfig(vocab_size=50, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=hidden // 4, max_position_embeddings=64)
    return LlavaConfig(vision=vision, text=text, image_token_index=49, vision_feature_layer=-1)


def _randomize(model, seed):
    """Non-trivial norms and weights so that a mis-copied array shows in the logits."""
    key = jax.random.key(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            key, sub = jax.random.split(key)
            var[...] = var[...] + 0.05 * jax.random.normal(sub, var[...].shape, var[...].dtype)


@pytest.fixture(scope="module")
def pair():
    small = Llava(_cfg(2), rngs=nnx.Rngs(0))
    big = Llava(_cfg(5), rngs=nnx.Rngs(1))
    _randomize(small, 2)
    _randomize(big, 3)
    vision_before = jax.tree.map(np.asarray, nnx.state(big.vision))
    projector_before = np.asarray(big.projector.w1[...])
    grow(small, big)
    return small, big, vision_before, projector_before


def test_grown_logits_equal_the_shallow_model(pair):
    small, big, _, _ = pair
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, 49)
    np.testing.assert_allclose(np.asarray(big(tokens)), np.asarray(small(tokens)), rtol=1e-5, atol=1e-5)


def test_vision_and_projector_are_kept_and_new_layers_can_learn(pair):
    small, big, vision_before, projector_before = pair
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(big.vision)), vision_before)
    np.testing.assert_array_equal(np.asarray(big.projector.w1[...]), projector_before)
    # New layers start as identities but not dead: their q/k/v and gate/up stay random, so the
    # gradient reaches their output weights.
    w = big.text.layers
    assert float(jnp.abs(w.wo[...][2:]).max()) == 0.0 and float(jnp.abs(w.w_down[...][2:]).max()) == 0.0
    assert float(jnp.std(w.wq[...][2:])) > 0.01
    tokens = jax.random.randint(jax.random.key(5), (1, 8), 0, 49)
    grads = nnx.grad(lambda m: jnp.sum(m(tokens) ** 2))(big)
    for name in ("wo", "w_down"):
        assert float(jnp.abs(grads["text"]["layers"][name][...][2:]).max()) > 0.0, name


def test_incompatible_pairs_are_refused():
    small = Llava(_cfg(2, hidden=64), rngs=nnx.Rngs(0))
    with pytest.raises(GrowError, match="hidden_size"):
        grow(small, Llava(_cfg(4, hidden=32), rngs=nnx.Rngs(0)))
    with pytest.raises(GrowError, match="more than the target"):
        grow(Llava(_cfg(3), rngs=nnx.Rngs(0)), Llava(_cfg(2), rngs=nnx.Rngs(0)))


def test_image_side_grow_keeps_the_shallow_llava_function_on_images():
    small = Llava(_cfg(2), rngs=nnx.Rngs(0))
    big = Llava(_cfg(4), rngs=nnx.Rngs(1))
    _randomize(small, 6)
    _randomize(big, 7)
    n = small.cfg.num_image_tokens
    tokens = jnp.concatenate([jnp.array([[1, 5]]), jnp.full((1, n), 49), jnp.array([[7, 8, 9]])], axis=1)
    pixels = jax.random.normal(jax.random.key(8), (1, 3, 16, 16))
    want = np.asarray(small(tokens, pixels))
    # Without the image side the grown model keeps its own tower and projector: different logits.
    plain = grow(small, Llava(_cfg(4), rngs=nnx.Rngs(1)))
    assert np.abs(np.asarray(plain(tokens, pixels)) - want).max() > 1e-3
    grow(small, big, image_side=True)
    np.testing.assert_allclose(np.asarray(big(tokens, pixels)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(GrowError, match="vision"):
        other = dataclasses.replace(_cfg(4), vision=dataclasses.replace(_cfg(4).vision, num_hidden_layers=1))
        grow(small, Llava(other, rngs=nnx.Rngs(0)), image_side=True)


def test_placed_layers_with_next_fill_keep_the_function_and_copy_read_weights():
    # Shallow layers at 0 and 3 of 5; new layers 1, 2 (before trained layer 1) and 4 (after it).
    small = Llava(_cfg(2), rngs=nnx.Rngs(0))
    big = Llava(_cfg(5), rngs=nnx.Rngs(1))
    _randomize(small, 9)
    _randomize(big, 10)
    grow(small, big, at=[0, 3], fill="next")
    tokens = jax.random.randint(jax.random.key(11), (2, 12), 0, 49)
    np.testing.assert_allclose(np.asarray(big(tokens)), np.asarray(small(tokens)), rtol=1e-5, atol=1e-5)
    sw, bw = small.text.layers, big.text.layers
    for name in ("wq", "wk", "wv", "w_gate", "w_up", "attn_norm", "mlp_norm"):
        b, s = np.asarray(getattr(bw, name)[...]), np.asarray(getattr(sw, name)[...])
        np.testing.assert_array_equal(b[0], s[0], err_msg=name)
        for pos in (1, 2, 3, 4):  # new layers read like the next trained layer (or the last one)
            np.testing.assert_array_equal(b[pos], s[1], err_msg=f"{name}[{pos}]")
    for name in ("wo", "w_down"):
        b = np.asarray(getattr(bw, name)[...])
        np.testing.assert_array_equal(b[3], np.asarray(getattr(sw, name)[...])[1])
        assert np.abs(b[[1, 2, 4]]).max() == 0.0, name


@pytest.mark.parametrize("at, fill, match", [([0], "next", "names 1 positions"), ([3, 1], "next", "increasing"),
                                             ([0, 5], "next", "within 0..4"), ([0, 2], "copy", "fill"),
                                             (["0", "x"], "next", "integers")])
def test_bad_placements_are_refused(at, fill, match):
    with pytest.raises(GrowError, match=match):
        grow(Llava(_cfg(2), rngs=nnx.Rngs(0)), Llava(_cfg(5), rngs=nnx.Rngs(1)), at=at, fill=fill)
