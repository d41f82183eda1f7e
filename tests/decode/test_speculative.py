"""Greedy self-speculative decoding (twig_jax.decode.speculative) is lossless w.r.t. the pruned target.

SSD output must be token-identical to the plain one-token-per-step greedy decode of the same
TTP-pruned model (twig_jax.decode.prune), for a batch of prompts of different lengths (plus a padding
row), with per-row theta early stops, partial acceptance, rollback of all four cache groups,
EOS and a max_new_tokens that ends mid-round. A perfect twig (copies of the remaining base
layers and head, no pruning, theta = 0) is accepted 100% and fills every round with delta + 1.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from tests.conftest import sharpened_tiny_llava
from twig_jax.twig.module import Twig, init_twig_from_base
from twig_jax.twig.config import TwigConfig, TwigConfigError
from twig_jax.decode.generator import TwigGenerator

EOS = 2
LENGTHS = (16 + 5, 16 + 11, 16 + 3)
IMG_AT = (2, 4, 1)
BUCKETS = dict(batch_buckets=(4,), prompt_buckets=(32,), new_token_buckets=(24,))


def tiny_model():
    """Tiny LLaVA with sharpened attention and a peaky LM head (so theta stops vary by row)."""
    model = sharpened_tiny_llava(head_scale=30)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    prompts = []
    for length, at in zip(LENGTHS, IMG_AT):
        p = rng.integers(3, 250, size=length)
        p[at:at + cfg.num_image_tokens] = cfg.image_token_index
        prompts.append(p.tolist())
    pixels = rng.normal(size=(len(prompts), 3, 28, 28)).astype(np.float32)
    return cfg, model, prompts, pixels


@pytest.fixture(scope="module")
def pruned():
    """SSD and plain generators for one pruned plan (twig scores, R=5, FinalWipe at Kf=3)."""
    cfg, model, prompts, pixels = tiny_model()
    tc = TwigConfig(K=1, T=3, Kf=3, R=5, draft_len=5, theta=0.5)
    random_twig = Twig(cfg.text, tc, rngs=nnx.Rngs(5))
    random_twig.head[...] = random_twig.head[...] * 30
    twigs = {"random": random_twig, "copy": init_twig_from_base(model, tc)}
    ssd = TwigGenerator(model, random_twig, tc, method="twig", ssd=True, **BUCKETS)
    plain = TwigGenerator(model, random_twig, tc, method="twig", ssd=False, **BUCKETS)
    return prompts, pixels, twigs, ssd, plain


def _check_rows(out, max_new):
    for toks, n in zip(out.tokens, out.num_generated):
        assert len(toks) == n and 1 <= n <= max_new
        assert n == max_new or toks[-1] == EOS
        assert EOS not in toks[:-1]


@pytest.mark.parametrize("twig_name", ["random", "copy"])
def test_ssd_greedy_equals_pruned_decode(pruned, twig_name):
    prompts, pixels, twigs, ssd, plain = pruned
    ssd.set_twig(twigs[twig_name])  # same structure: no recompilation
    plain.set_twig(twigs[twig_name])
    with pytest.raises(TwigConfigError, match="same structure"):
        ssd.set_twig(Twig(ssd.cfg.text, TwigConfig(K=1, T=2, Kf=3, R=5), rngs=nnx.Rngs(0)))
    max_new = 21  # not a multiple of delta + 1: the budget cuts a round short
    want = plain.generate(prompts, pixels, max_new_tokens=max_new, eos_ids=[EOS])
    got = ssd.generate(prompts, pixels, max_new_tokens=max_new, eos_ids=[EOS])
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.keep, want.keep)
    _check_rows(got, max_new)
    st = got.stats
    assert st["drafted"] >= st["rounds"] >= 1
    assert st["accepted"] <= st["drafted"]
    per = st["per_row"]
    for i, n in enumerate(got.num_generated):  # each round emits accepted + 1 tokens
        assert n - 1 <= per["rounds"][i] + per["accepted"][i]
    if twig_name == "random":
        assert st["acceptance_rate"] < 0.1
        assert any(n < max_new for n in got.num_generated), "expected an EOS stop in this fixture"
    else:  # partial acceptance, theta stops differing by row
        assert 0 < st["accepted"] < st["drafted"]
        assert st["drafted"] > st["rounds"]


def test_ssd_perfect_twig_accepts_everything():
    cfg, model, prompts, pixels = tiny_model()
    L, delta = cfg.text.num_hidden_layers, 5
    tc = TwigConfig(K=1, T=L - 1, Kf=L, R=cfg.num_image_tokens, draft_len=delta, theta=0.0)
    twig = init_twig_from_base(model, tc)
    ssd = TwigGenerator(model, twig, tc, method="none", ssd=True, **BUCKETS)
    plain = TwigGenerator(model, twig, tc, method="none", ssd=False, **BUCKETS)
    rounds = 3
    max_new = 1 + rounds * (delta + 1)  # the prefill's token + 3 full rounds
    want = plain.generate(prompts, pixels, max_new_tokens=max_new, eos_ids=[])
    got = ssd.generate(prompts, pixels, max_new_tokens=max_new, eos_ids=[])
    assert got.tokens == want.tokens
    assert list(got.num_generated) == [max_new] * len(prompts)
    st = got.stats
    assert st["acceptance_rate"] == 1.0
    assert st["per_row"]["rounds"] == [rounds] * len(prompts)
    assert st["mean_tokens_per_round"] == delta + 1
    # the prefill is a target pass too: max_new tokens over 1 + rounds passes
    assert st["tokens_per_target_pass"] == max_new / (1 + rounds)
    assert st["deepest"] == delta
    assert st["mean_accepted_per_round"] == delta


@pytest.mark.parametrize("twig_name", ["random", "copy"])
def test_min_new_tokens_blocks_eos_and_ssd_stays_lossless(pruned, twig_name):
    """With min_new_tokens, no row ends before it (the free run does, for EOS picked as a token that
    row 1 emits early), and greedy SSD still equals greedy pruned decoding token for token."""
    prompts, pixels, twigs, ssd, plain = pruned
    ssd.set_twig(twigs[twig_name])
    plain.set_twig(twigs[twig_name])
    free = plain.generate(prompts, pixels, max_new_tokens=21, eos_ids=[])
    eos = free.tokens[1][2]  # row 1's third token: with it as EOS that row stops at 3 tokens
    early = plain.generate(prompts, pixels, max_new_tokens=21, eos_ids=[eos])
    assert min(early.num_generated) <= 3
    want = plain.generate(prompts, pixels, max_new_tokens=21, eos_ids=[eos], min_new_tokens=9)
    got = ssd.generate(prompts, pixels, max_new_tokens=21, eos_ids=[eos], min_new_tokens=9)
    assert got.tokens == want.tokens
    for toks in want.tokens:
        assert len(toks) >= 9 and eos not in toks[:8]
    # the rows are the free run's until the first blocked EOS
    assert want.tokens[1][:2] == free.tokens[1][:2] and want.tokens[1][2] != eos


def test_ssd_stats_definitions():
    from twig_jax.decode.generator import ssd_stats

    # row 0: the prefill's token, then 2 rounds emitting 4 accepted drafts + 2 target tokens = 7 tokens
    # in 3 target passes; row 1: EOS from the prefill, no round (1 token, 1 pass)
    st = ssd_stats(np.array([7, 1]), np.array([2, 0]), np.array([8, 0]), np.array([4, 0]))
    assert st["acceptance_rate"] == 0.5 and st["mean_accepted_per_round"] == 2.0
    assert st["mean_tokens_per_round"] == 3.0 and st["tokens_per_target_pass"] == 8 / 4
