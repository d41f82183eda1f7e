"""Sampling SSD (speculative rejection sampling) draws from the pruned target's distribution.

One large batch of identical requests, so a few thousand samples come from one compiled call:
the joint distribution of the first three generated tokens under sampling SSD must match plain
sampling of the same TTP-pruned model (total variation below a threshold), while a wrong
implementation that always accepts the drafts must fail the same check.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import twig_jax.decode.speculative as ssd_mod
from tests.conftest import sharpened_tiny_llava
from twig_jax.decode.sampling import SamplingConfig
from twig_jax.twig.config import TwigConfig
from twig_jax.twig.module import init_twig_from_base
from twig_jax.decode.generator import TwigGenerator

B = 4096
NEW = 3
SAMPLING = SamplingConfig(temperature=0.9, top_k=2, top_p=0.9)
TV_MAX = 0.06  # measured: 0.018 SSD vs plain (two SSD seeds: 0.025); always-accept 0.43; p-resample 0.13


def total_variation(a: np.ndarray, b: np.ndarray) -> float:
    """Total variation between the empirical joint distributions of rows of a and b."""
    ca = collections.Counter(map(tuple, a.tolist()))
    cb = collections.Counter(map(tuple, b.tolist()))
    return 0.5 * sum(abs(ca[k] / len(a) - cb[k] / len(b)) for k in set(ca) | set(cb))


def sampling_world(tc: TwigConfig, batch: int, new: int, sampling: SamplingConfig):
    """One request repeated `batch` times on a tiny sharpened LLaVA, a twig copied from base layers
    1..3 with a noisy head, and the plain (non-speculative) samples of the pruned model to match.

    The target is pruned (tc's R of 16), so draft and target agree often but not always: both
    accept and reject paths run."""
    model = sharpened_tiny_llava(head_scale=8)
    cfg = model.cfg
    n = cfg.num_image_tokens
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 250, size=n + 6)
    prompt[2:2 + n] = cfg.image_token_index
    pixels = np.broadcast_to(rng.normal(size=(1, 3, 28, 28)).astype(np.float32), (batch, 3, 28, 28))
    twig = init_twig_from_base(model, tc)
    head = twig.head[...]
    twig.head[...] = head + 0.3 * jnp.std(head) * jax.random.normal(jax.random.key(3), head.shape)
    buckets = dict(batch_buckets=(batch,), prompt_buckets=(32,), new_token_buckets=(new,))
    plain = TwigGenerator(model, twig, tc, method="twig", ssd=False, **buckets)
    want = np.asarray(plain.generate([prompt.tolist()] * batch, pixels, max_new_tokens=new, sampling=sampling,
                                     seed=1, eos_ids=[]).tokens)
    return model, twig, tc, buckets, prompt, pixels, want


@pytest.fixture(scope="module")
def setup():
    return sampling_world(TwigConfig(K=1, T=3, Kf=4, R=14, draft_len=2, theta=0.0), B, NEW, SAMPLING)


def _ssd_samples(setup, seed=2):
    model, twig, tc, buckets, prompt, pixels, _ = setup
    gen = TwigGenerator(model, twig, tc, method="twig", ssd=True, **buckets)
    out = gen.generate([prompt.tolist()] * B, pixels, max_new_tokens=NEW, sampling=SAMPLING, seed=seed, eos_ids=[])
    return np.asarray(out.tokens), out.stats


def test_sampling_ssd_matches_plain_sampling(setup):
    want = setup[-1]
    got, stats = _ssd_samples(setup)
    assert got.shape == want.shape == (B, NEW)
    # Both the accept and the reject branch must have been exercised.
    assert 0.1 < stats["acceptance_rate"] < 0.9, stats["acceptance_rate"]
    tv = total_variation(got, want)
    assert tv < TV_MAX, f"TV(SSD, plain) = {tv:.3f}"
    # The marginals of later tokens too (they come from draft/verify rounds).
    for j in (1, 2):
        assert total_variation(got[:, j:j + 1], want[:, j:j + 1]) < TV_MAX


def _always_accept(p, q, drafts, n_draft, key):
    """Wrong rule: accept every draft, bonus from p."""
    pa = jnp.take_along_axis(p, n_draft[:, None, None], axis=1)[:, 0]
    return n_draft, jax.random.categorical(key, jnp.log(pa), axis=-1).astype(jnp.int32)


def _resample_from_p(p, q, drafts, n_draft, key):
    """Wrong rule: correct acceptance, but the replacement after a rejection comes from p, not
    from normalise(max(0, p - q))."""
    a, _ = _REJECTION_SAMPLE(p, q, drafts, n_draft, key)
    pa = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
    return a, jax.random.categorical(jax.random.fold_in(key, 7), jnp.log(pa), axis=-1).astype(jnp.int32)


_REJECTION_SAMPLE = ssd_mod.rejection_sample


@pytest.mark.parametrize("wrong_rule,min_tv", [
    (_always_accept, 2 * TV_MAX),
    pytest.param(_resample_from_p, TV_MAX, marks=pytest.mark.slow),
])
def test_wrong_acceptance_rule_is_detected(setup, monkeypatch, wrong_rule, min_tv):
    """Negative controls: the same check must reject wrong speculative-sampling rules."""
    monkeypatch.setattr(ssd_mod, "rejection_sample", wrong_rule)
    got, _ = _ssd_samples(setup)
    tv = total_variation(got, setup[-1])
    assert tv > min_tv, f"{wrong_rule.__name__}: TV = {tv:.3f} not above {min_tv}"
