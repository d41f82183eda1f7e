"""Twig training losses: NTP cross-entropy, TwigVLM++ PredKL, AttnKL hook, the auxiliary-loss slot,
and the twig forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twig_jax.model.config import load_preset
from twig_jax.train.losses import LossConfig, attn_kl, shift_targets, token_ce, token_pred_kl, twig_loss_sums
from twig_jax.model.llava import Llava
from twig_jax.train.trainer import base_forward, training_twig_config, twig_forward
from twig_jax.twig.module import init_twig_from_base


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_pred_kl(teacher, student, tau=5.0, clip=4.0):
    lt, ls = _np_log_softmax(teacher / tau), _np_log_softmax(student / tau)
    kl = (np.exp(lt) * (lt - ls)).sum(-1) * tau ** 2
    return np.minimum(kl, clip) / clip


def test_pred_kl_matches_numpy():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((2, 7, 50)) * 10.0
    s = rng.standard_normal((2, 7, 50)) * 10.0
    s[0, :3] = t[0, :3] + 0.3 * rng.standard_normal((3, 50))  # some tokens below the clip
    got = np.asarray(token_pred_kl(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32)))
    want = _np_pred_kl(t, s)
    assert (want < 1).any() and (want == 1).any()  # both regimes are exercised
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    mask = rng.integers(0, 2, (2, 7)).astype(np.int32)
    tokens = rng.integers(0, 50, (2, 7)).astype(np.int32)
    sums = twig_loss_sums(jnp.asarray(s, jnp.float32), tokens, mask, LossConfig(), jnp.asarray(t, jnp.float32))
    _, w = shift_targets(tokens, mask)
    w = np.asarray(w)
    np.testing.assert_allclose(float(sums.pred_kl), (want * w).sum(), rtol=1e-5)
    # cross-entropy against numpy on the shifted targets
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], 1)
    ce = -np.take_along_axis(_np_log_softmax(s), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(token_ce(jnp.asarray(s, jnp.float32), targets)), ce, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(sums.ce), (ce * w).sum(), rtol=1e-5)
    assert float(sums.count) == w.sum()
    means = sums.means(LossConfig())
    np.testing.assert_allclose(float(means["loss"]), ((ce + 0.1 * want) * w).sum() / w.sum(), rtol=1e-5)


def test_shift_targets():
    tokens = jnp.array([[5, 6, 7, 8]])
    mask = jnp.array([[0, 0, 1, 1]])
    t, w = shift_targets(tokens, mask)
    assert t.tolist() == [[6, 7, 8, 0]] and w.tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_attn_kl_hook():
    rng = np.random.default_rng(1)
    p = rng.random((3, 9)); p /= p.sum(-1, keepdims=True)
    q = rng.random((3, 9)); q /= q.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(attn_kl(jnp.asarray(p), jnp.asarray(q))), (p * np.log(p / q)).sum(-1),
                               rtol=1e-4)
    assert np.abs(np.asarray(attn_kl(jnp.asarray(p), jnp.asarray(p)))).max() < 1e-6
    # wired into the objective: gamma * mean over distributions
    logits = jnp.zeros((3, 4, 8))
    tokens = jnp.zeros((3, 4), jnp.int32)
    mask = jnp.ones((3, 4), jnp.int32)
    sums = twig_loss_sums(logits, tokens, mask, LossConfig(gamma=2.0), attn_pair=(jnp.asarray(p), jnp.asarray(q)))
    np.testing.assert_allclose(float(sums.means(LossConfig(gamma=2.0))["attn_kl"]),
                               (p * np.log(p / q)).sum(-1).mean(), rtol=1e-4)


def test_aux_loss_slot_has_its_own_metric_and_weight():
    """An auxiliary loss's (sum, count) ride in LossSums' aux slot: its mean under its own metric
    name, weight from the loss object; attn_kl stays the AttnKL term (0 here: no attention pair)."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Aux:
        metric: str = "probe_nll"
        weight: float = 0.25

    logits = jnp.zeros((2, 5, 8))
    tokens = jnp.zeros((2, 5), jnp.int32)
    mask = jnp.ones((2, 5), jnp.int32)  # 8 target tokens (the last position has none)
    cfg = LossConfig(alpha=0.1, gamma=2.0)
    sums = twig_loss_sums(logits, tokens, mask, cfg)._replace(aux=jnp.float32(6.0), aux_count=jnp.float32(3.0))
    ce = np.log(8.0)  # uniform logits over 8 classes
    means = sums.means(cfg, Aux())
    assert set(means) == {"ce", "pred_kl", "attn_kl", "probe_nll", "loss"} and float(means["attn_kl"]) == 0.0
    np.testing.assert_allclose(float(means["probe_nll"]), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(means["loss"]), ce + 0.25 * 2.0, rtol=1e-6)
    # the total's gradient / count is the mean loss's: the aux mean is scaled to the token count
    np.testing.assert_allclose(float(sums.total(cfg, Aux())) / 8.0, ce + 0.25 * 2.0, rtol=1e-6)
    assert "probe_nll" not in sums.means(cfg) and float(sums.total(cfg)) / 8.0 == pytest.approx(ce, rel=1e-6)


@pytest.fixture(scope="module")
def tiny_base():
    return Llava(load_preset("tiny"), rngs=nnx.Rngs(0))


def _inputs(cfg, b=2, s=28, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 200, (b, s)).astype(np.int32)
    tokens[:, 2:2 + cfg.num_image_tokens] = cfg.image_token_index
    pix = rng.standard_normal((b, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    mask = np.zeros((b, s), np.int32)
    mask[:, 20:] = 1
    return jnp.asarray(tokens), jnp.asarray(pix), jnp.asarray(mask)


def test_kl_zero_when_twig_is_base_tail(tiny_base):
    cfg = tiny_base.cfg
    K = 1
    twig = init_twig_from_base(tiny_base, training_twig_config(tiny_base, K, cfg.text.num_hidden_layers - K))
    tokens, pix, mask = _inputs(cfg)

    @jax.jit
    def run(t, p):
        student, teacher = twig_forward(tiny_base, twig, t, p)
        return student, teacher, tiny_base(t, p), base_forward(tiny_base, t, p)

    student, teacher, ref, full = run(tokens, pix)
    ref = np.asarray(ref)  # the inference forward (run_layers with its KV cache)
    np.testing.assert_allclose(np.asarray(teacher), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(student), ref, atol=1e-5)
    sums = twig_loss_sums(student, tokens, mask, LossConfig(), teacher)
    assert float(sums.pred_kl) < 1e-6 * float(sums.count)
    # the full-model training path gives the same logits
    np.testing.assert_allclose(np.asarray(full), ref, atol=1e-5)


def test_kl_positive_for_shorter_twig(tiny_base):
    twig = init_twig_from_base(tiny_base, training_twig_config(tiny_base, 1, 1))
    tokens, pix, mask = _inputs(tiny_base.cfg)
    student, teacher = jax.jit(lambda t, p: twig_forward(tiny_base, twig, t, p))(tokens, pix)
    sums = twig_loss_sums(student, tokens, mask, LossConfig(), teacher)
    assert float(sums.pred_kl) > 0


def test_placeholder_outside_the_vocabulary_is_never_a_target():
    """liuhaotian checkpoints mark the image with id -200 (never embedded, outside the vocabulary):
    as a masked target it must not turn the loss into NaN. The loss equals the one with any valid
    id in its place (the numpy oracle: masked mean of -log softmax at the labelled positions)."""
    from twig_jax.train.losses import masked_mean, shift_targets, token_ce

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    tokens = np.array([[1, -200, -200, 4, 5, 6], [1, 2, -200, 3, 7, 8]])
    label_mask = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0]])
    targets, weights = shift_targets(jnp.asarray(tokens), jnp.asarray(label_mask))
    loss = float(masked_mean(token_ce(jnp.asarray(logits), targets), weights))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [-logp[b, t, tokens[b, t + 1]] for b in range(2) for t in range(5) if label_mask[b, t + 1]]
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, np.mean(want), rtol=1e-5)
