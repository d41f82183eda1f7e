"""Cached decoding vs the full forward pass, buckets, sampling filters and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twig_jax.model.config import load_preset
from twig_jax.decode.buckets import PROMPT_BUCKETS, TEXT_BUCKETS, InputError
from twig_jax.decode.generator import Generator
from twig_jax.decode.plain import decode_step, prefill
from twig_jax.model.llava import Llava
from twig_jax.decode.sampling import SamplingConfig, filtered_logits


@pytest.fixture(scope="module")
def model():
    m = Llava(load_preset("tiny-gqa"), rngs=nnx.Rngs(0))
    # Larger weights than the 0.02 init so logits are far from uniform and comparisons mean something.
    for name, w in m.text.layers.weights().items():
        if w.ndim == 3:
            getattr(m.text.layers, name).set_value(w * 5)
    return m


@pytest.fixture(scope="module")
def generator(model):
    return Generator(model, max_cache_len=256)


def make_prompts(cfg, lengths_before, lengths_after, seed=0):
    rng = np.random.RandomState(seed)
    n, img = cfg.num_image_tokens, cfg.image_token_index
    prompts = []
    for a, b in zip(lengths_before, lengths_after):
        text = lambda k: rng.randint(3, img - 1, size=k).tolist()
        prompts.append([1] + text(a) + [img] * n + text(b))
    pixels = rng.randn(len(prompts), 3, cfg.vision.image_size, cfg.vision.image_size).astype(np.float32)
    return prompts, pixels


def test_incremental_decode_matches_full_forward(model):
    """Prefill a right-padded batch, append 4 tokens one at a time; logits equal a full forward."""
    cfg = model.cfg
    prompts, pixels = make_prompts(cfg, [2, 7, 4], [3, 1, 9])
    s = 64
    tokens = np.zeros((3, s), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = jnp.array([len(p) for p in prompts], jnp.int32)
    cache, logits = jax.jit(prefill, static_argnums=4)(model, tokens, lengths, pixels, s + 8)
    rng = np.random.RandomState(1)
    appended = rng.randint(3, 200, size=(3, 4))
    step = jax.jit(decode_step)
    step_logits = [logits]
    for t in range(4):
        cache, lg = step(model, cache, jnp.asarray(appended[:, t:t + 1], jnp.int32))
        step_logits.append(lg[:, 0])
    for i, p in enumerate(prompts):
        full = model(jnp.array([p + appended[i].tolist()]), jnp.asarray(pixels[i:i + 1]))[0]  # [S, V]
        for t in range(5):
            ref = full[len(p) - 1 + t]
            got = step_logits[t][i]
            scale = float(jnp.max(jnp.abs(ref)))
            assert float(jnp.max(jnp.abs(got - ref))) <= 1e-4 * scale, (i, t)


def test_generate_matches_naive_greedy_and_reuses_compilation(model, generator):
    cfg = model.cfg
    prompts, pixels = make_prompts(cfg, [2, 9, 5], [4, 1, 6], seed=2)
    out = generator.generate(prompts, pixels, max_new_tokens=6, eos_ids=())
    forward = nnx.jit(lambda m, t, px: m(t, px))
    for i, p in enumerate(prompts):
        seq = list(p)
        for _ in range(6):
            # Right-padding to a fixed length cannot change causal logits at earlier positions.
            padded = np.zeros((1, 64), np.int32)
            padded[0, :len(seq)] = seq
            logits = forward(model, jnp.asarray(padded), jnp.asarray(pixels[i:i + 1]))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert out.tokens[i] == seq[len(p):]
    compiled = generator._decode._cache_size(), generator._prefill._cache_size()
    # Same buckets (batch 3 -> 4, prompt <= 64, new tokens <= 8): no recompilation.
    prompts2, pixels2 = make_prompts(cfg, [3, 1, 2], [2, 5, 3], seed=3)
    generator.generate(prompts2, pixels2, max_new_tokens=5, eos_ids=())
    assert (generator._decode._cache_size(), generator._prefill._cache_size()) == compiled


def test_image_prompts_pad_only_their_text(model, generator):
    """An image prompt pads to N visual tokens + a text bucket when that is shorter than its prompt
    bucket, and decodes exactly as one padded to a whole-prompt bucket (the old rule, text_buckets=None)."""
    cfg = model.cfg
    n = cfg.num_image_tokens
    prompts, pixels = make_prompts(cfg, [2, 20, 5], [4, 1, 6], seed=5)  # text lengths 7, 22, 12
    tokens = generator.pad_inputs(prompts, pixels, 8)[0]
    assert tokens.shape == (4, n + next(b for b in TEXT_BUCKETS if b >= 22))
    assert generator.pad_inputs([p[:3] for p in prompts], None, 8)[0].shape == (4, PROMPT_BUCKETS[0])  # text only
    whole = Generator(model, max_cache_len=256, text_buckets=None)
    assert whole.pad_inputs(prompts, pixels, 8)[0].shape == (4, next(b for b in PROMPT_BUCKETS if b >= n + 22))
    assert tokens.shape[1] != whole.pad_inputs(prompts, pixels, 8)[0].shape[1]  # the test compares two paddings
    assert generator.generate(prompts, pixels, max_new_tokens=8, eos_ids=()).tokens == \
        whole.generate(prompts, pixels, max_new_tokens=8, eos_ids=()).tokens
    # Never longer than the whole-prompt bucket: a text past the text buckets falls back to it...
    assert Generator(model, text_buckets=(8,)).pad_inputs(prompts, pixels, 8)[0].shape == \
        whole.pad_inputs(prompts, pixels, 8)[0].shape
    # ... and a prompt past both is refused by name.
    with pytest.raises(InputError, match=r"prompt length 38 exceeds the largest prompt bucket 32 \(and its text, "
                                         r"22 tokens besides the image, the largest text bucket 8\)"):
        Generator(model, text_buckets=(8,), prompt_buckets=(32,)).pad_inputs(prompts, pixels, 8)


def test_per_row_eos_stops_rows(model, generator):
    cfg = model.cfg
    prompts, pixels = make_prompts(cfg, [2, 9], [4, 1], seed=4)
    free = generator.generate(prompts, pixels, max_new_tokens=8, eos_ids=())
    row0 = free.tokens[0]
    stop = next(i for i in range(1, 8) if row0[i] not in row0[:i])  # a token's first appearance
    eos = row0[stop]
    out = generator.generate(prompts, pixels, max_new_tokens=8, eos_ids=(eos,))
    assert out.tokens[0] == row0[:stop + 1]
    cut = free.tokens[1].index(eos) + 1 if eos in free.tokens[1] else 8
    assert out.tokens[1] == free.tokens[1][:cut]


def test_per_row_budgets_equal_each_prompt_alone(model, generator):
    """max_new_tokens per prompt: each row is what that prompt alone with its own budget gives."""
    cfg = model.cfg
    prompts, pixels = make_prompts(cfg, [2, 9, 4], [4, 1, 6], seed=5)
    budgets = [3, 8, 5]
    out = generator.generate(prompts, pixels, max_new_tokens=budgets, eos_ids=())
    for i, m in enumerate(budgets):
        alone = generator.generate([prompts[i]], pixels[i:i + 1], max_new_tokens=m, eos_ids=())
        assert out.tokens[i] == alone.tokens[0] and len(out.tokens[i]) == m
    with pytest.raises(InputError, match="3 budgets for 2 prompts"):
        generator.generate(prompts[:2], pixels[:2], max_new_tokens=budgets)
    with pytest.raises(InputError, match=">= 1"):
        generator.generate(prompts, pixels, max_new_tokens=[3, 0, 2])


def test_sampling_is_seeded_and_respects_top_k(model, generator):
    cfg = model.cfg
    prompts, pixels = make_prompts(cfg, [2, 3], [4, 5], seed=5)
    sc = SamplingConfig(temperature=1.0, top_k=1)
    greedy = generator.generate(prompts, pixels, max_new_tokens=5, eos_ids=())
    assert generator.generate(prompts, pixels, max_new_tokens=5, sampling=sc, eos_ids=()).tokens == greedy.tokens
    sc = SamplingConfig(temperature=1.5, top_p=0.9)
    a = generator.generate(prompts, pixels, max_new_tokens=5, sampling=sc, seed=7, eos_ids=())
    b = generator.generate(prompts, pixels, max_new_tokens=5, sampling=sc, seed=7, eos_ids=())
    assert a.tokens == b.tokens


def test_filtered_logits_matches_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(4, 50).astype(np.float32) * 3
    sc = SamplingConfig(temperature=0.7, top_k=10, top_p=0.8)
    got = np.asarray(filtered_logits(jnp.asarray(logits), sc))
    for row, g in zip(logits, got):
        x = row / 0.7
        x = np.where(x < np.sort(x)[-10], -np.inf, x)
        order = np.argsort(-x)
        p = np.exp(x[order] - x[order][0])
        p /= p.sum()
        keep_n = int(np.searchsorted(np.cumsum(p), 0.8) + 1)
        kept = set(order[:keep_n].tolist())
        assert set(np.nonzero(g > -1e30)[0].tolist()) == kept
        np.testing.assert_allclose(g[list(kept)], x[list(kept)], rtol=1e-6)


@pytest.mark.parametrize("case, match", [
    ("empty", "empty batch"),
    ("too_long", "over the cache capacity"),
    ("no_placeholder", "0 image placeholder tokens"),
    ("two_images", "32 image placeholder tokens"),
    ("pixels_size", r"pixel_values has shape \(1, 3, 20, 20\)"),
    ("pixels_channels", r"pixel_values has shape \(1, 4, 28, 28\)"),
    ("bad_token", "outside the vocabulary"),
])
def test_bad_inputs_raise_named_errors(model, generator, case, match):
    cfg = model.cfg
    prompts, pixels = make_prompts(cfg, [2], [3])
    n = cfg.num_image_tokens
    if case == "empty":
        prompts, pixels = [], pixels[:0]
    elif case == "too_long":
        prompts = [prompts[0] + [5] * 250]
    elif case == "no_placeholder":
        prompts = [[t for t in prompts[0] if t != cfg.image_token_index]]
    elif case == "two_images":
        prompts = [prompts[0] + [cfg.image_token_index] * n]
    elif case == "pixels_size":
        pixels = np.zeros((1, 3, 20, 20), np.float32)
    elif case == "pixels_channels":
        pixels = np.zeros((1, 4, 28, 28), np.float32)
    elif case == "bad_token":
        prompts = [prompts[0] + [cfg.text.vocab_size + 3]]
    with pytest.raises(InputError, match=match):
        generator.generate(prompts, pixels, max_new_tokens=8)


def test_variant_names_round_trip():
    from twig_jax.decode.variants import Variant, parse_variant
    from twig_jax.twig.config import METHODS, TwigConfigError

    names = set()
    for method in METHODS:
        for ssd, spec in ((False, "chain"), (True, "chain"), (True, "tree")):
            for select in (("top",) if method == "none" else ("top", "cover", "sample")):
                v = Variant(method, ssd, select, spec)
                assert parse_variant(v.name) == v
                names.add(v.name)
    assert len(names) == 3 + 4 * 3 * 3  # every variant has its own name
    assert parse_variant("phead-cover+tree") == Variant("phead", True, "cover", "tree")
    assert parse_variant("tree").label == "tree SSD"
    assert parse_variant("twig+ssd") == Variant("twig", True, "top")
    assert parse_variant("phead-cover+ssd").label == "P-head, coverage keep-set + SSD"
    for bad in ("ttp", "twig-top", "none+ssd", "plain-cover", "twig+SSD", "fastv-all", "none+tree", "twig+ssd+tree"):
        with pytest.raises(TwigConfigError):
            parse_variant(bad)
