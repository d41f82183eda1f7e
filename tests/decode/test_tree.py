"""Tree self-speculative decoding (twig_jax.decode.tree) against independent oracles.

- The topology (ancestor masks, the accepted node, its path) against a plain numpy reference on
  random trees.
- Greedy tree decoding equals the pruned target's plain greedy decoding token for token, for a
  batch of prompts of different lengths with EOS, a budget that ends mid-round and a padding row,
  with a random and a copied twig, and for several pruning methods.
- A width-1 tree of N = D nodes is chain SSD with draft_len D and theta 0: same tokens, same rounds.
- A perfect twig (copies of the remaining base layers, no pruning) fills every round with D + 1.
- Sampling: the first tokens are distributed as plain sampling; a wrong acceptance rule fails.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import twig_jax.decode.tree as tree_mod
from tests.decode.test_speculative_sampling import sampling_world, total_variation
from tests.decode.test_speculative import BUCKETS, EOS, tiny_model
from twig_jax.decode.generator import TwigGenerator
from twig_jax.decode.sampling import SamplingConfig
from twig_jax.twig.config import TreeShape, TwigConfig, TwigConfigError
from twig_jax.twig.module import Twig, init_twig_from_base

TREE = dict(spec="tree", tree_width=3, tree_depth=3, tree_nodes=8)


# ---------------------------------------------------------------------------------- topology


def random_tree(rng, m, depth):
    """parent [M] (root 0 its own parent), node depths, nodes in an order where parents come first."""
    parent, d = [0], [0]
    for i in range(1, m):
        choices = [j for j in range(i) if d[j] < depth]
        p = int(rng.choice(choices))
        parent.append(p)
        d.append(d[p] + 1)
    return np.array(parent), np.array(d)


def np_ancestors(parent):
    m = len(parent)
    anc = np.zeros((m, m), bool)
    for i in range(m):
        j = i
        anc[i, j] = True
        while j != 0:
            j = parent[j]
            anc[i, j] = True
    return anc


def test_topology_matches_numpy_on_random_trees():
    rng = np.random.default_rng(0)
    depth, m, b = 4, 12, 16
    parents, depths, tokens, argmax = [], [], [], []
    for _ in range(b):
        p, d = random_tree(rng, m, depth)
        parents.append(p)
        depths.append(d)
        tokens.append(rng.integers(0, 3, size=m))  # a small alphabet: many matches and ties
        argmax.append(rng.integers(0, 3, size=m))
    parent, dep, tok, y = map(np.array, (parents, depths, tokens, argmax))
    anc = np.asarray(tree_mod.ancestors(jnp.asarray(parent), depth))
    node = np.asarray(tree_mod.greedy_path(jnp.asarray(tok), jnp.asarray(parent), jnp.asarray(dep),
                                           jnp.asarray(y), depth))
    path = np.asarray(tree_mod.path_to(jnp.asarray(anc), jnp.asarray(dep), jnp.asarray(node), depth))
    for r in range(b):
        want_anc = np_ancestors(parent[r])
        np.testing.assert_array_equal(anc[r], want_anc)
        accepted = [i for i in range(m) if all(i2 == 0 or tok[r][i2] == y[r][parent[r][i2]]
                                                  for i2 in np.flatnonzero(want_anc[i]))]
        best = max(accepted, key=lambda i: (dep[r][i], -i))
        assert node[r] == best
        chain = [i for i in range(m) if want_anc[best, i] and i != 0]
        assert sorted(chain, key=lambda i: dep[r][i]) == list(path[r][:dep[r][best]])


def test_tree_shape_errors():
    for bad in (dict(tree_width=0), dict(tree_depth=0), dict(tree_nodes=2, tree_depth=3),
                dict(tree_width=2, tree_depth=3, tree_nodes=11)):
        with pytest.raises(TwigConfigError):
            TwigConfig(K=1, T=1, Kf=2, R=4, **dict(TREE, **bad)).validate(4, 16)
    assert TreeShape(2, 3, 10).pool == 10 and TreeShape(10, 4, 60).pool == 310
    with pytest.raises(TwigConfigError, match="spec"):
        TwigConfig(K=1, T=1, Kf=2, R=4, spec="beam").validate(4, 16)


# ---------------------------------------------------------------------------------- greedy


@pytest.fixture(scope="module")
def world():
    cfg, model, prompts, pixels = tiny_model()
    tc = TwigConfig(K=1, T=3, Kf=3, R=5, draft_len=5, theta=0.5, **TREE)
    random_twig = Twig(cfg.text, tc, rngs=nnx.Rngs(5))
    random_twig.head[...] = random_twig.head[...] * 30
    from twig_jax.twig.phead import with_p_head

    phead_twig = with_p_head(init_twig_from_base(model, tc), seed=1)
    return cfg, model, prompts, pixels, tc, {"random": random_twig, "copy": init_twig_from_base(model, tc),
                                             "phead": phead_twig}


@pytest.mark.parametrize("twig_name,method", [("random", "twig"), ("copy", "twig"), ("copy", "fastv"),
                                              ("copy", "none"), ("phead", "phead"), ("copy", "random")])
def test_greedy_tree_equals_pruned_greedy(world, twig_name, method):
    cfg, model, prompts, pixels, tc, twigs = world
    twig = twigs[twig_name]
    plain = TwigGenerator(model, twig, tc, method=method, ssd=False, **BUCKETS)
    tree = TwigGenerator(model, twig, tc, method=method, ssd=True, **BUCKETS)
    budgets = 21  # not a multiple of D + 1: the budget cuts a round short
    want = plain.generate(prompts, pixels, max_new_tokens=budgets, eos_ids=[EOS])
    got = tree.generate(prompts, pixels, max_new_tokens=budgets, eos_ids=[EOS])
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.keep, want.keep)
    st = got.stats
    assert st["drafted"] == st["rounds"] * 8  # every round verifies N nodes
    if twig_name == "random" and method == "twig":
        assert any(n < budgets for n in got.num_generated), "expected an EOS stop in this fixture"
    if twig_name in ("copy", "phead"):
        assert st["accepted"] > 0


def test_per_row_budgets_tree_and_chain_equal_pruned_greedy(world):
    """Different budgets per prompt (one ends mid-round, one before its first round ends): chain and
    tree SSD give the pruned greedy tokens, each row cut at its own budget or EOS."""
    cfg, model, prompts, pixels, tc, twigs = world
    budgets = [2, 17, 9]
    plain = TwigGenerator(model, twigs["copy"], tc, method="twig", ssd=False, **BUCKETS)
    want = plain.generate(prompts, pixels, max_new_tokens=budgets, eos_ids=[EOS])
    free = plain.generate(prompts, pixels, max_new_tokens=21, eos_ids=[EOS])
    for row, full, m in zip(want.tokens, free.tokens, budgets):
        assert row == full[:m]
    for spec in ("chain", "tree"):
        gen = TwigGenerator(model, twigs["copy"], dataclasses.replace(tc, spec=spec), method="twig", ssd=True,
                            **BUCKETS)
        assert gen.generate(prompts, pixels, max_new_tokens=budgets, eos_ids=[EOS]).tokens == want.tokens


def test_width_one_tree_is_chain_ssd(world):
    cfg, model, prompts, pixels, tc, twigs = world
    depth = 3
    chain_cfg = dataclasses.replace(tc, spec="chain", draft_len=depth, theta=0.0)
    tree_cfg = dataclasses.replace(tc, spec="tree", tree_width=1, tree_depth=depth, tree_nodes=depth)
    for twig in twigs.values():
        chain = TwigGenerator(model, twig, chain_cfg, method="twig", ssd=True, **BUCKETS)
        tree = TwigGenerator(model, twig, tree_cfg, method="twig", ssd=True, **BUCKETS)
        a = chain.generate(prompts, pixels, max_new_tokens=21, eos_ids=[EOS])
        b = tree.generate(prompts, pixels, max_new_tokens=21, eos_ids=[EOS])
        assert a.tokens == b.tokens
        assert a.stats["per_row"]["rounds"] == b.stats["per_row"]["rounds"]
        assert a.stats["per_row"]["accepted"] == b.stats["per_row"]["accepted"]


def test_perfect_twig_fills_every_round():
    """With a perfect twig the accepted path is the greedy one; a very peaky head keeps that path the
    best by cumulative score at every level, so every full round verifies it to depth D."""
    from tests.conftest import sharpened_tiny_llava

    cfg, _, prompts, pixels = tiny_model()
    model = sharpened_tiny_llava(head_scale=300)
    L, depth = cfg.text.num_hidden_layers, 3
    tc = TwigConfig(K=1, T=L - 1, Kf=L, R=cfg.num_image_tokens, spec="tree", tree_width=2, tree_depth=depth,
                    tree_nodes=6)
    twig = init_twig_from_base(model, tc)
    tree = TwigGenerator(model, twig, tc, method="none", ssd=True, **BUCKETS)
    plain = TwigGenerator(model, twig, tc, method="none", ssd=False, **BUCKETS)
    rounds = 3
    max_new = 1 + rounds * (depth + 1)
    want = plain.generate(prompts, pixels, max_new_tokens=max_new, eos_ids=[])
    got = tree.generate(prompts, pixels, max_new_tokens=max_new, eos_ids=[])
    assert got.tokens == want.tokens
    assert got.stats["per_row"]["rounds"] == [rounds] * len(prompts)
    assert got.stats["mean_tokens_per_round"] == depth + 1
    assert got.stats["tokens_per_target_pass"] == max_new / (1 + rounds)
    assert got.stats["deepest"] == depth and got.stats["per_row"]["deepest"] == [depth] * len(prompts)


def test_min_new_tokens_tree_equals_pruned_greedy(world):
    cfg, model, prompts, pixels, tc, twigs = world
    plain = TwigGenerator(model, twigs["copy"], tc, method="twig", ssd=False, **BUCKETS)
    tree = TwigGenerator(model, twigs["copy"], tc, method="twig", ssd=True, **BUCKETS)
    free = plain.generate(prompts, pixels, max_new_tokens=21, eos_ids=[])
    eos = free.tokens[0][1]
    want = plain.generate(prompts, pixels, max_new_tokens=21, eos_ids=[eos], min_new_tokens=7)
    got = tree.generate(prompts, pixels, max_new_tokens=21, eos_ids=[eos], min_new_tokens=7)
    assert got.tokens == want.tokens and all(len(t) >= 7 for t in want.tokens)


# ---------------------------------------------------------------------------------- sampling

B = 2048
NEW = 3
SAMPLING = SamplingConfig(temperature=0.9, top_k=3, top_p=0.95)
TV_MAX = 0.06


@pytest.fixture(scope="module")
def tree_sampling_world():
    tc = TwigConfig(K=1, T=3, Kf=4, R=14, spec="tree", tree_width=2, tree_depth=2, tree_nodes=4)
    return sampling_world(tc, B, NEW, SAMPLING)


def _tree_samples(world, seed=2):
    model, twig, tc, buckets, prompt, pixels, _ = world
    gen = TwigGenerator(model, twig, tc, method="twig", ssd=True, **buckets)
    out = gen.generate([prompt.tolist()] * B, pixels, max_new_tokens=NEW, sampling=SAMPLING, seed=seed, eos_ids=[])
    return np.asarray(out.tokens), out.stats


def test_sampling_tree_matches_plain_sampling(tree_sampling_world):
    want = tree_sampling_world[-1]
    got, stats = _tree_samples(tree_sampling_world)
    assert 0.1 < stats["accepted"] / (stats["rounds"] * 2) < 0.95  # both descending and stopping occur
    assert total_variation(got, want) < TV_MAX
    for j in (1, 2):
        assert total_variation(got[:, j:j + 1], want[:, j:j + 1]) < TV_MAX


def _descend_to_first_child(tokens, parent, target_logits, sampling, key, depth):
    """Wrong rule: follow the tree's first child at every level (the drafts as if always accepted)."""
    b, m = tokens.shape
    idx = jnp.arange(m)[None]

    def step(k, node):
        child = (parent == node[:, None]) & (idx > 0)
        return jnp.where(jnp.any(child, axis=1), jnp.argmax(child, axis=1).astype(jnp.int32), node)

    node = jax.lax.fori_loop(0, depth, step, jnp.zeros((b,), jnp.int32))
    lp = jnp.take_along_axis(target_logits, node[:, None, None], axis=1)[:, 0]
    return node, jax.random.categorical(key, lp, axis=-1).astype(jnp.int32)


def test_wrong_tree_acceptance_rule_is_detected(tree_sampling_world, monkeypatch):
    monkeypatch.setattr(tree_mod, "sample_walk", _descend_to_first_child)
    got, _ = _tree_samples(tree_sampling_world)
    assert total_variation(got, tree_sampling_world[-1]) > 2 * TV_MAX


def test_commit_moves_the_path_after_the_root():
    """move_entries against numpy: the path's scratch entries land at base + 1.., nothing else moves;
    for stacked and per-layer caches alike."""
    from twig_jax.model.cache import KVCache

    rng = np.random.default_rng(0)
    L, B, H, S, Dh = 2, 3, 2, 16, 4
    k = rng.normal(size=(L, B, H, Dh, S)).astype(np.float32)
    v = rng.normal(size=(L, B, H, S, Dh)).astype(np.float32)
    base = np.array([2, 5, 0])
    src = np.array([[3, 5, 0], [1, 2, 4], [6, 0, 0]])  # verify indices of the path (depth 1, 2, 3)
    n = np.array([2, 3, 1])
    want_k, want_v = k.copy(), v.copy()
    for b in range(B):
        for j in range(n[b]):
            want_k[:, b, :, :, base[b] + 1 + j] = k[:, b, :, :, base[b] + src[b, j]]
            want_v[:, b, :, base[b] + 1 + j] = v[:, b, :, base[b] + src[b, j]]
    args = (jnp.asarray(base), jnp.asarray(src), jnp.asarray(n))
    stacked = tree_mod.move_entries(KVCache(jnp.asarray(k), jnp.asarray(v), jnp.zeros(B, jnp.int32)), *args)
    np.testing.assert_array_equal(np.asarray(stacked.k), want_k)
    np.testing.assert_array_equal(np.asarray(stacked.v), want_v)
    per_layer = KVCache(tuple(jnp.asarray(x) for x in k), tuple(jnp.asarray(x) for x in v), jnp.zeros(B, jnp.int32))
    moved = tree_mod.move_entries(per_layer, *args)
    np.testing.assert_array_equal(np.stack([np.asarray(x) for x in moved.k]), want_k)
    np.testing.assert_array_equal(np.stack([np.asarray(x) for x in moved.v]), want_v)
