"""Twig-guided token pruning (twig_jax.decode.prune) against slow obvious references.

(a) no pruning (R = N, Kf = L) through the four cache groups equals the plain full forward;
(b) pruned prefill + plain pruned decode equals a numpy reference that selects tokens with
    boolean masks and recomputes the whole pruned model per generated token, with no caches;
(c) invalid K / T / Kf / R / R_bar raise TwigConfigError;
(d) the coverage keep-set (select="cover") against a brute-force greedy and a hand-built case.
Tiny random models; each compiled function is built once per module.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from twig_jax.model.config import load_preset
from twig_jax.model.llava import Llava
from twig_jax.twig.keep import cover_visual
from twig_jax.decode.prune import kv_bytes, make_plan, ttp_prefill
from twig_jax.twig.module import Twig
from twig_jax.twig.config import TwigConfig, TwigConfigError
from twig_jax.decode.generator import TwigGenerator

NEW = 8
LENGTHS = (16 + 5, 16 + 11, 16 + 3)  # N = 16 visual tokens + text
IMG_AT = (2, 4, 1)


def _sharpen(layers, scale=4.0):
    """Scale q/k projections so attention (and hence pruning scores) is far from uniform."""
    layers.wq[...] = layers.wq[...] * scale
    layers.wk[...] = layers.wk[...] * scale


def sharpened_tiny_and_prompts(seed: int):
    """(cfg, sharpened tiny-preset model, 3 prompts of LENGTHS with the image at IMG_AT, pixels
    [3, 3, 28, 28]); prompts and pixels drawn from `seed`. Shared with test_phead."""
    cfg = load_preset("tiny")
    model = Llava(cfg, rngs=nnx.Rngs(0))
    _sharpen(model.text.layers)
    n = cfg.num_image_tokens
    rng = np.random.default_rng(seed)
    prompts = []
    for length, at in zip(LENGTHS, IMG_AT):
        p = rng.integers(3, 250, size=length)
        p[at:at + n] = cfg.image_token_index
        prompts.append(p.tolist())
    pixels = rng.normal(size=(len(prompts), 3, 28, 28)).astype(np.float32)
    return cfg, model, prompts, pixels


@pytest.fixture(scope="module")
def setup():
    return sharpened_tiny_and_prompts(0)


# ----------------------------------------------------------------------------------------------
# numpy reference: explicit boolean selection, full recompute, float64


def _np_weights(layers):
    return {k: np.asarray(v, np.float64) for k, v in layers.weights().items()}


def _rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x, pos, theta):  # x [H, T, Dh]
    dh = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
    f = pos[:, None] * inv[None]
    emb = np.concatenate([f, f], -1)
    rot = np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], -1)
    return x * np.cos(emb) + rot * np.sin(emb)


def _ref_layers(tc, w, lo, hi, x, pos):
    """Base/twig layers lo..hi-1 on one sequence x [T, D] (causal in sequence order).

    Returns the hidden state and the last layer's attention probabilities [H, T, T]."""
    t = x.shape[0]
    h_, hkv, dh = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
    causal = np.tril(np.ones((t, t), bool))
    probs = None
    for i in range(lo, hi):
        h = _rms(x, w["attn_norm"][i], tc.rms_norm_eps)
        q = (h @ w["wq"][i]).reshape(t, h_, dh).transpose(1, 0, 2)
        k = (h @ w["wk"][i]).reshape(t, hkv, dh).transpose(1, 0, 2)
        v = (h @ w["wv"][i]).reshape(t, hkv, dh).transpose(1, 0, 2)
        q, k = _rope(q, pos, tc.rope_theta), _rope(k, pos, tc.rope_theta)
        k, v = np.repeat(k, h_ // hkv, 0), np.repeat(v, h_ // hkv, 0)
        s = np.where(causal, q @ k.transpose(0, 2, 1) / np.sqrt(dh), -np.inf)
        probs = np.exp(s - s.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + (probs @ v).transpose(1, 0, 2).reshape(t, h_ * dh) @ w["wo"][i]
        h = _rms(x, w["mlp_norm"][i], tc.rms_norm_eps)
        g = h @ w["w_gate"][i]
        x = x + ((g / (1 + np.exp(-g))) * (h @ w["w_up"][i])) @ w["w_down"][i]
    return x, probs


class NumpyPrunedModel:
    def __init__(self, model, twig, plan, feats):
        self.cfg, self.plan = model.cfg, plan
        self.tc = model.cfg.text
        self.base = _np_weights(model.text.layers)
        self.twig = None if twig is None else _np_weights(twig.layers)
        self.embed = np.asarray(model.text.embed[...], np.float64)
        self.norm = np.asarray(model.text.final_norm[...], np.float64)
        self.head = np.asarray(model.text.head_weight(), np.float64)
        self.feats = feats  # [B, N, D]

    def _embed(self, row, seq):
        x = self.embed[np.asarray(seq)]
        img = np.asarray(seq) == self.cfg.image_token_index
        x[img] = self.feats[row]
        return x, img

    def keep(self, row, prompt):
        """Kept visual indices from the prompt's scores (stable top-R, or the coverage rule on the
        visual tokens' layer-K hidden states; ascending)."""
        p = self.plan
        x, img = self._embed(row, prompt)
        pos = np.arange(len(prompt), dtype=np.float64)
        h, probs = _ref_layers(self.tc, self.base, 0, p.K, x, pos)
        if p.method == "twig":
            _, probs = _ref_layers(self.tc, self.twig, 0, p.T, h, pos)
        a = probs.mean(0)  # [T, T]
        score = a[len(prompt) - 1, img] if p.score_rows == "last" else a[~img][:, img].sum(0)
        if p.select == "cover":
            return brute_force_cover(score, h[img], p.R)
        return np.sort(np.argsort(-score, kind="stable")[:p.R])

    def next_logits(self, row, seq, keep):
        p = self.plan
        x, img = self._embed(row, seq)
        pos = np.arange(len(seq), dtype=np.float64)
        h, _ = _ref_layers(self.tc, self.base, 0, p.K, x, pos)
        sel = ~img
        sel[np.flatnonzero(img)[keep]] = True  # text + kept visual, original order
        h, _ = _ref_layers(self.tc, self.base, p.K, p.Kf, h[sel], pos[sel])
        text = ~img[sel]  # FinalWipe: text only
        h, _ = _ref_layers(self.tc, self.base, p.Kf, p.L, h[text], pos[sel][text])
        return _rms(h[-1], self.norm, self.tc.rms_norm_eps) @ self.head

    def greedy(self, row, prompt, keep, n):
        seq = list(prompt)
        for _ in range(n):
            seq.append(int(np.argmax(self.next_logits(row, seq, keep))))
        return seq[len(prompt):]


def brute_force_cover(score, feats, r):  # [r] int, ascending
    """Greedy on the coverage objective itself, F(S) = sum_j s_j max_{i in S} relu(cos(f_i, f_j)),
    re-evaluated from scratch for every candidate set (float64; no incremental gains)."""
    f = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    sim = np.maximum(f @ f.T, 0.0)
    objective = lambda ks: float(np.sum(score * sim[ks].max(axis=0)))
    keep = []
    for _ in range(r):
        rest = [i for i in range(len(score)) if i not in keep]
        keep.append(max(rest, key=lambda i: objective(keep + [i])))
    return np.sort(np.asarray(keep))


# ----------------------------------------------------------------------------------------------
# (a) no pruning == the base model


def test_no_pruning_equals_base_forward(setup):
    cfg, model, prompts, pixels = setup
    tc = TwigConfig(K=1, T=2, Kf=3, R=5)
    plan = make_plan(cfg, tc, "none")
    assert (plan.R, plan.Kf) == (cfg.num_image_tokens, cfg.text.num_hidden_layers)
    twig = Twig(cfg.text, tc, rngs=nnx.Rngs(3))
    s = 32
    tokens = np.zeros((len(prompts), s), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)

    @nnx.jit
    def both(model, twig, tokens, lengths, pixels):
        pre = ttp_prefill(model, twig, plan, tokens, lengths, pixels, extra=4)
        return pre.logits, model(tokens, pixels), pre.caches.mid.lengths, pre.caches.tail.lengths

    logits, full, mid_len, tail_len = both(model, twig, jnp.asarray(tokens), lengths, jnp.asarray(pixels))
    ref = np.stack([np.asarray(full)[i, len(p) - 1] for i, p in enumerate(prompts)])
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(mid_len), np.asarray(lengths))
    np.testing.assert_array_equal(np.asarray(tail_len), np.asarray(lengths) - cfg.num_image_tokens)


def test_no_pruning_decode_equals_plain_generator(setup):
    """The four-group decode with method "none" generates what generate.Generator does."""
    from twig_jax.decode.generator import Generator

    cfg, model, prompts, pixels = setup
    buckets = dict(batch_buckets=(4,), prompt_buckets=(32,), new_token_buckets=(NEW,))
    want = Generator(model, **buckets).generate(prompts, pixels, max_new_tokens=NEW, eos_ids=[])
    got = TwigGenerator(model, None, TwigConfig(K=2, T=1, Kf=3, R=4), method="none", ssd=False,
                        **buckets).generate(prompts, pixels, max_new_tokens=NEW, eos_ids=[])
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.keep, np.tile(np.arange(cfg.num_image_tokens), (len(prompts), 1)))


# ----------------------------------------------------------------------------------------------
# (b) pruned prefill + decode == numpy reference


@pytest.mark.parametrize("method,score_rows,select", [("twig", "last", "top"), ("fastv", "text", "top"),
                                                     ("twig", "last", "cover"), ("fastv", "last", "cover")])
def test_pruned_decode_matches_reference(setup, method, score_rows, select):
    cfg, model, prompts, pixels = setup
    tc = TwigConfig(K=1, T=2, Kf=3, R=5, score_rows=score_rows, select=select)
    twig = Twig(cfg.text, tc, rngs=nnx.Rngs(7))
    _sharpen(twig.layers)
    gen = TwigGenerator(model, twig, tc, method=method, ssd=False, batch_buckets=(4,), prompt_buckets=(32,),
                        new_token_buckets=(NEW,))
    out = gen.generate(prompts, pixels, max_new_tokens=NEW, eos_ids=[])
    feats = np.asarray(model.image_features(jnp.asarray(pixels)), np.float64)
    ref = NumpyPrunedModel(model, twig, gen.plan, feats)
    for i, p in enumerate(prompts):
        keep = ref.keep(i, p)
        np.testing.assert_array_equal(out.keep[i], keep, err_msg=f"row {i} kept set")
        assert out.tokens[i] == ref.greedy(i, p, keep, NEW), f"row {i}"
    assert list(out.num_generated) == [NEW] * len(prompts)


def prefill_both_layouts(model, twig, plan, prompts, pixels, width: int = 32):
    """ttp_prefill with the stacked weights and with per-layer weights (ttp.LayerWeights): (stacked, per)."""
    from twig_jax.decode.prune import LayerWeights

    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)

    @nnx.jit
    def run(model, twig, weights, tokens, lengths, pixels):
        return ttp_prefill(model, twig, plan, tokens, lengths, pixels, extra=4, weights=weights)

    args = (jnp.asarray(tokens), lengths, jnp.asarray(pixels))
    return run(model, twig, None, *args), run(model, twig, LayerWeights.of(model, twig), *args)


@pytest.mark.parametrize("method,score_rows", [("twig", "last"), ("twig", "text"), ("fastv", "last")])
def test_per_layer_prefill_equals_stacked(setup, method, score_rows):
    """ttp_prefill with per-layer weights (per-layer caches, what TwigGenerator runs) computes what
    the stacked-weight path does: same scores, kept set, logits and cached keys/values."""
    cfg, model, prompts, pixels = setup
    tc = TwigConfig(K=1, T=2, Kf=3, R=5, score_rows=score_rows)
    twig = Twig(cfg.text, tc, rngs=nnx.Rngs(7))
    _sharpen(twig.layers)
    plan = make_plan(cfg, tc, method)
    stacked, per = prefill_both_layouts(model, twig, plan, prompts, pixels)
    np.testing.assert_allclose(np.asarray(per.scores), np.asarray(stacked.scores), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(per.keep), np.asarray(stacked.keep))
    np.testing.assert_allclose(np.asarray(per.logits), np.asarray(stacked.logits), rtol=1e-4, atol=1e-5)
    for name, g in stacked.caches.groups().items():
        pg = per.caches.groups()[name]
        assert isinstance(pg.k, tuple) and len(pg.k) == g.k.shape[0], name
        np.testing.assert_allclose(np.stack(pg.k), np.asarray(g.k), rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.stack(pg.v), np.asarray(g.v), rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(np.asarray(pg.lengths), np.asarray(g.lengths))


def test_probs_query_rows(setup):
    """run_layers(probs_query=...) returns [B, H, S] rows of the full [B, H, S, S] probabilities:
    one picked query row per batch row, or the rows summed with weights."""
    from twig_jax.model.cache import KVCache
    from twig_jax.model.llama import run_layers

    cfg, model, _, _ = setup
    tc = cfg.text
    b, s = 2, 12
    x = jax.random.normal(jax.random.key(0), (b, s, tc.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(s)[None], (b, s))
    cache = KVCache.zeros(tc.num_hidden_layers, b, tc.num_key_value_heads, s, tc.head_dim, jnp.float32)
    w = model.text.layers.stacked()

    def probs(query):
        return np.asarray(run_layers(tc, w, x, pos, cache.k, cache.v, jnp.zeros((b,), jnp.int32), stop=2, fresh=True,
                                     return_last_probs=True, probs_query=query).attn_probs)

    full = probs(None)
    assert full.shape == (b, tc.num_attention_heads, s, s)
    rows = jnp.asarray([5, 11], jnp.int32)
    np.testing.assert_allclose(probs(rows), full[np.arange(b), :, np.asarray(rows)], rtol=1e-6)
    wts = np.random.default_rng(0).random((b, s)).astype(np.float32)
    np.testing.assert_allclose(probs(jnp.asarray(wts)), np.einsum("bhts,bt->bhs", full, wts), rtol=1e-5, atol=1e-7)


def test_prune_scores_and_random_method(setup):
    """Random keep-R: sorted, distinct, in range, reproducible per seed; prune_scores shapes."""
    cfg, model, prompts, pixels = setup
    tc = TwigConfig(K=1, T=2, Kf=3, R=5)
    gen = TwigGenerator(model, None, tc, method="random", ssd=False, batch_buckets=(4,), prompt_buckets=(32,))
    scores, keep = gen.prune_scores(prompts, pixels, seed=1)
    assert scores.shape == (3, cfg.num_image_tokens) and keep.shape == (3, 5)
    for row_scores, row in zip(scores, keep):
        assert np.all(np.diff(row) > 0) and row[0] >= 0 and row[-1] < cfg.num_image_tokens
        np.testing.assert_array_equal(row, np.sort(np.argsort(-row_scores)[:5]))
    np.testing.assert_array_equal(gen.prune_scores(prompts, pixels, seed=1)[1], keep)


def test_kv_bytes_shrink_with_pruning(setup):
    cfg = setup[0]
    tc = TwigConfig(K=1, T=2, Kf=3, R=5)
    s, new, item = 40, 8, 4
    per = 2 * cfg.text.num_key_value_heads * cfg.text.head_dim * item
    none = kv_bytes(cfg, make_plan(cfg, tc, "none"), s, new, item, with_twig=False)
    assert none["total"] == cfg.text.num_hidden_layers * (s + new) * per  # = the plain model's cache
    pruned = kv_bytes(cfg, make_plan(cfg, tc, "twig"), s, new, item, with_twig=False)
    n = cfg.num_image_tokens
    assert pruned["total"] == (1 * (s + new) + 2 * (s - n + 5 + new) + 1 * (s - n + new)) * per
    assert kv_bytes(cfg, make_plan(cfg, tc, "twig"), s, new, item)["twig"] == 2 * (s + new) * per


# ----------------------------------------------------------------------------------------------
# (c) config validation


@pytest.mark.parametrize("kw,match", [
    (dict(K=0, T=1, Kf=2, R=4), "K=0"),
    (dict(K=2, T=3, Kf=3, R=4), "exceeds"),
    (dict(K=2, T=1, Kf=2, R=4), "Kf=2"),
    (dict(K=1, T=1, Kf=5, R=4), "Kf=5"),
    (dict(K=1, T=1, Kf=3, R=17), "R=17"),
    (dict(K=2, T=1, Kf=3, R_bar=1.0), "R_bar"),
    (dict(K=1, T=1, Kf=3), "exactly one"),
    (dict(K=1, T=1, Kf=3, R=4, select="best"), "select='best' must be one of"),
])
def test_invalid_twig_config(setup, kw, match):
    cfg = setup[0]
    with pytest.raises(TwigConfigError, match=match):
        make_plan(cfg, TwigConfig(**kw), "twig")


def test_invalid_method_and_inputs(setup):
    from twig_jax.decode.buckets import InputError

    cfg, model, prompts, pixels = setup
    with pytest.raises(TwigConfigError, match="unknown"):
        make_plan(cfg, TwigConfig(K=1, T=1, Kf=3, R=4), "visionzip")
    with pytest.raises(TwigConfigError, match="needs a twig"):
        TwigGenerator(model, None, TwigConfig(K=1, T=1, Kf=3, R=4), method="twig", ssd=False)
    gen = TwigGenerator(model, None, TwigConfig(K=1, T=1, Kf=3, R=4), method="fastv", ssd=False)
    with pytest.raises(InputError, match="needs an image"):
        gen.generate(prompts, None, max_new_tokens=2)
    with pytest.raises(InputError, match="image placeholder"):
        gen.generate([prompts[0][:-3]] + prompts[1:], pixels, max_new_tokens=2)
    with pytest.raises(InputError, match="image placeholder"):
        gen.generate([prompts[0][:2]], pixels[:1], max_new_tokens=2)


# ----------------------------------------------------------------------------------------------
# (d) the coverage keep-set


def test_cover_spreads_over_clusters_where_top_r_piles_up():
    """Three groups of near-identical tokens (think: patches of three objects); the scores favour
    group A. Top 3 takes three A patches; coverage takes one patch of each group (which one of a group
    is the coverage's call: near-identical patches cover each other equally)."""
    rng = np.random.default_rng(0)
    centres = np.eye(3, 16)  # orthogonal directions: one per group
    group = np.repeat(np.arange(3), 4)  # tokens 0-3: A, 4-7: B, 8-11: C
    feats = centres[group] + 0.01 * rng.normal(size=(12, 16))
    scores = np.array([0.30, 0.25, 0.20, 0.15, 0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.02])
    got = np.asarray(cover_visual(jnp.asarray(scores[None], jnp.float32), jnp.asarray(feats[None], jnp.float32), 3))
    np.testing.assert_array_equal(got[0], brute_force_cover(scores, feats, 3))
    assert sorted(group[got[0]]) == [0, 1, 2], got  # one per group
    np.testing.assert_array_equal(np.sort(np.argsort(-scores)[:3]), [0, 1, 2])  # top R: all from A
    all_kept = cover_visual(jnp.asarray(scores[None]), jnp.asarray(feats[None]), 12)
    np.testing.assert_array_equal(np.asarray(all_kept)[0], np.arange(12))


def test_cover_matches_brute_force_on_random_inputs():
    """Batched, with scores of every scale and features pointing every way (negative cosines)."""
    rng = np.random.default_rng(1)
    b, n, d, r = 4, 20, 8, 7
    scores = rng.dirichlet(np.full(n, 0.3), size=b) * np.array([1.0, 1e-3, 50.0, 1.0])[:, None]
    feats = rng.normal(size=(b, n, d))
    got = np.asarray(cover_visual(jnp.asarray(scores, jnp.float32), jnp.asarray(feats, jnp.float32), r))
    for i in range(b):
        np.testing.assert_array_equal(got[i], brute_force_cover(scores[i], feats[i], r), err_msg=f"row {i}")
        assert len(set(got[i].tolist())) == r
