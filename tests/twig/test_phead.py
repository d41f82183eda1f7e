"""TwigVLM++ P-head (twig_jax/twig/phead.py) and its RL stage (twig_jax/train/prune_rl.py).

(a) P-head scores equal a float64 numpy computation of the formula (gates, own q/k, RoPE);
    pruning with method "phead" keeps their top R and decodes like the numpy pruned model;
    SSD on top of it stays lossless;
(b) the keep-set sampler: Plackett-Luce log-probabilities sum to one, Gumbel-top-k draws match
    them, and REINFORCE with group-normalised advantages on them learns a toy reward;
(c) the reward's teacher-forced pruned forward equals the pruned prefill (and the plain full
    forward when nothing is pruned);
(d) save/load round trip, clear errors, the RL command end to end on a tiny model.
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from tests.decode.test_prune import (NumpyPrunedModel, _np_weights, _ref_layers, _rms, _rope, _sharpen, prefill_both_layouts,
                      sharpened_tiny_and_prompts)
from twig_jax.twig.keep import cover_logprob, coverage_similarity, gumbel_top_k, plackett_luce_logprob, sample_cover
from twig_jax.train.phead_objectives import group_advantage, pruned_logits
from twig_jax.twig.phead import p_head_weights, with_p_head
from twig_jax.decode.prune import make_plan, ttp_prefill
from twig_jax.twig.module import Twig
from twig_jax.twig.config import TwigConfig, TwigConfigError
from twig_jax.decode.generator import TwigGenerator

NEW = 8
BUCKETS = dict(batch_buckets=(4,), prompt_buckets=(32,), new_token_buckets=(NEW,))


@pytest.fixture(scope="module")
def setup():
    cfg, model, prompts, pixels = sharpened_tiny_and_prompts(1)
    tc = TwigConfig(K=1, T=2, Kf=3, R=5, p_head=True)
    twig = Twig(cfg.text, tc, rngs=nnx.Rngs(7))
    _sharpen(twig.layers)
    twig.p_head.gate_q[...] = twig.p_head.gate_q[...] * 3  # far from uniform scores
    twig.p_head.gate_k[...] = twig.p_head.gate_k[...] * 3
    return cfg, model, twig, prompts, pixels


def _np_phead_scores(tc, twig, h, pos, img):
    """s for one sequence: h [T, D] enters the last twig layer; img [T] bool. float64."""
    w = _np_weights(twig.layers)
    last = twig.twig_cfg.T - 1
    gq = np.asarray(twig.p_head.gate_q[...], np.float64)
    gk = np.asarray(twig.p_head.gate_k[...], np.float64)
    hh, hkv, dh = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
    x = _rms(h, w["attn_norm"][last], tc.rms_norm_eps)
    q = _rope((x @ w["wq"][last]).reshape(-1, hh, dh).transpose(1, 0, 2), pos, tc.rope_theta)  # [H, T, Dh]
    k = _rope((x @ w["wk"][last]).reshape(-1, hkv, dh).transpose(1, 0, 2), pos, tc.rope_theta)
    gate = lambda z: np.maximum(z, 0) / (1 + np.exp(-z))
    g_q = gate(x[-1] @ gq).reshape(hh, dh)  # the last prompt token
    g_k = gate(x[img] @ gk).reshape(-1, hkv, dh).transpose(1, 0, 2)  # [Hkv, N, Dh]
    k_img = np.repeat(g_k * k[:, img], hh // hkv, 0)  # [H, N, Dh]
    logits = np.einsum("hd,hnd->hn", g_q * q[:, -1], k_img) / np.sqrt(dh)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).mean(0)


class NumpyPHeadModel(NumpyPrunedModel):
    def __init__(self, model, twig, plan, feats):
        super().__init__(model, twig, plan, feats)
        self.twig_mod = twig

    def _embed(self, row, seq):
        """Only the prompt's image block is the image: a generated token that happens to be the
        image token id is text (decoding embeds it as a word)."""
        x = self.embed[np.asarray(seq)]
        img = np.zeros(len(seq), bool)
        img[np.flatnonzero(np.asarray(seq) == self.cfg.image_token_index)[:self.cfg.num_image_tokens]] = True
        x[img] = self.feats[row]
        return x, img

    def scores(self, row, prompt):
        x, img = self._embed(row, prompt)
        pos = np.arange(len(prompt), dtype=np.float64)
        h, _ = _ref_layers(self.tc, self.base, 0, self.plan.K, x, pos)
        h, _ = _ref_layers(self.tc, self.twig, 0, self.plan.T - 1, h, pos)
        return _np_phead_scores(self.tc, self.twig_mod, h, pos, img)

    def keep(self, row, prompt):
        return np.sort(np.argsort(-self.scores(row, prompt), kind="stable")[:self.plan.R])


def test_phead_pruned_decode_matches_reference(setup):
    cfg, model, twig, prompts, pixels = setup
    gen = TwigGenerator(model, twig, twig.twig_cfg, method="phead", ssd=False, **BUCKETS)
    out = gen.generate(prompts, pixels, max_new_tokens=NEW, eos_ids=[])
    feats = np.asarray(model.image_features(jnp.asarray(pixels)), np.float64)
    ref = NumpyPHeadModel(model, twig, gen.plan, feats)
    for i, p in enumerate(prompts):
        s = ref.scores(i, p)
        assert s.std() > 0.2 / len(s), "fixture scores are near uniform: the test would not see a wrong pick"
        keep = ref.keep(i, p)
        np.testing.assert_array_equal(out.keep[i], keep, err_msg=f"row {i} kept set")
        assert out.tokens[i] == ref.greedy(i, p, keep, NEW), f"row {i}"
    # The P-head picks differently from the twig's own attention (else "phead" could be a no-op alias).
    twig_out = TwigGenerator(model, twig, twig.twig_cfg, method="twig", ssd=False, **BUCKETS).generate(
        prompts, pixels, max_new_tokens=1, eos_ids=[])
    assert any(not np.array_equal(a, b) for a, b in zip(twig_out.keep, out.keep))


def test_phead_scores_per_layer_equal_stacked(setup):
    cfg, model, twig, prompts, pixels = setup
    plan = make_plan(cfg, twig.twig_cfg, "phead")
    stacked, per = prefill_both_layouts(model, twig, plan, prompts, pixels)
    np.testing.assert_allclose(np.asarray(stacked.scores).sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(per.scores), np.asarray(stacked.scores), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(per.keep), np.asarray(stacked.keep))
    np.testing.assert_allclose(np.asarray(per.logits), np.asarray(stacked.logits), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.stack(per.caches.twig.k), np.asarray(stacked.caches.twig.k), rtol=1e-4, atol=1e-5)


def test_phead_ssd_is_lossless(setup):
    cfg, model, twig, prompts, pixels = setup
    plain = TwigGenerator(model, twig, twig.twig_cfg, method="phead", ssd=False, **BUCKETS)
    ssd = TwigGenerator(model, twig, twig.twig_cfg, method="phead", ssd=True, **BUCKETS)
    want = plain.generate(prompts, pixels, max_new_tokens=NEW, eos_ids=[])
    got = ssd.generate(prompts, pixels, max_new_tokens=NEW, eos_ids=[])
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.keep, want.keep)


# ----------------------------------------------------------------------------------------------
# (b) sampling keep-sets


def test_plackett_luce_logprob_is_a_distribution():
    log_s = jax.nn.log_softmax(jnp.asarray([[0.3, -1.0, 2.0, 0.1, -0.4]]))
    for r in (1, 2, 5):
        orders = np.array(list(itertools.permutations(range(5), r)), np.int32)[None]  # [1, P, r]
        total = float(jnp.sum(jnp.exp(plackett_luce_logprob(log_s, jnp.asarray(orders)))))
        assert abs(total - 1.0) < 1e-5, (r, total)


def test_gumbel_top_k_draws_match_plackett_luce():
    log_s = jax.nn.log_softmax(jnp.asarray([[1.0, 0.0, -0.5, 0.7]]))
    draws = np.asarray(gumbel_top_k(jax.random.key(0), log_s, 2, 40000))[0]  # [G, 2]
    orders = np.array(list(itertools.permutations(range(4), 2)), np.int32)
    want = np.exp(np.asarray(plackett_luce_logprob(log_s, jnp.asarray(orders)[None])))[0]
    got = np.array([np.mean((draws[:, 0] == a) & (draws[:, 1] == b)) for a, b in orders])
    np.testing.assert_allclose(got, want, atol=0.01)


def _cover_case():
    """Five tokens: features pointing every way (so some cosines are negative), uneven scores."""
    rng = np.random.default_rng(4)
    feats = jnp.asarray(rng.normal(size=(1, 5, 3)), jnp.float32)
    log_s = jax.nn.log_softmax(jnp.asarray([[0.3, -1.0, 2.0, 0.1, -0.4]]))
    return log_s, coverage_similarity(feats), feats


@pytest.mark.parametrize("sharpness", [1.0, 4.0])
def test_cover_logprob_is_a_distribution_and_its_mode_is_the_cover_rule(sharpness):
    """The coverage policy's probabilities sum to one over all ordered keep-sets, and taking its
    most likely token at every step is ttp.cover_visual's greedy (at any sharpness)."""
    from twig_jax.twig.keep import cover_visual

    log_s, sim, feats = _cover_case()
    for r in (1, 2, 3):
        orders = jnp.asarray(np.array(list(itertools.permutations(range(5), r)), np.int32)[None])
        total = float(jnp.sum(jnp.exp(cover_logprob(log_s, sim, orders, sharpness))))
        assert abs(total - 1.0) < 1e-5, (r, total)
    greedy = []  # step by step: the order whose next token has the largest conditional probability
    for t in range(3):
        cands = [i for i in range(5) if i not in greedy]
        lp = [float(cover_logprob(log_s, sim, jnp.asarray([[greedy + [i]]], jnp.int32), sharpness)[0, 0])
              for i in cands]
        greedy.append(cands[int(np.argmax(lp))])
    np.testing.assert_array_equal(np.asarray(cover_visual(jnp.exp(log_s), feats, 3))[0], np.sort(greedy))


@pytest.mark.parametrize("sharpness", [1.0, 4.0])
def test_sample_cover_draws_match_cover_logprob(sharpness):
    log_s, sim, _ = _cover_case()
    draws = np.asarray(sample_cover(jax.random.key(0), log_s, sim, 2, 40000, sharpness))[0]  # [G, 2]
    orders = np.array(list(itertools.permutations(range(5), 2)), np.int32)
    want = np.exp(np.asarray(cover_logprob(log_s, sim, jnp.asarray(orders)[None], sharpness)))[0]
    got = np.array([np.mean((draws[:, 0] == a) & (draws[:, 1] == b)) for a, b in orders])
    np.testing.assert_allclose(got, want, atol=0.01)
    assert np.all(draws[:, 0] != draws[:, 1])  # without replacement


def test_sharper_cover_policy_puts_more_mass_on_the_greedy_set():
    """Sharpness a: the greedy coverage order's probability grows with a (a -> inf: the greedy rule)."""
    from twig_jax.twig.keep import cover_visual

    log_s, sim, feats = _cover_case()
    orders = np.array(list(itertools.permutations(range(5), 2)), np.int32)
    probs = {a: np.exp(np.asarray(cover_logprob(log_s, sim, jnp.asarray(orders)[None], a)))[0] for a in (1.0, 4.0, 16.0)}
    best = int(np.argmax(probs[16.0]))
    assert sorted(orders[best]) == list(np.asarray(cover_visual(jnp.exp(log_s), feats, 2))[0])
    assert probs[1.0][best] < probs[4.0][best] < probs[16.0][best]
    assert probs[16.0][best] > 2 * probs[1.0][best]


def test_group_advantage_scaled_and_centred():
    r = jnp.asarray([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5001, 0.4999, 0.5]])
    centred = np.asarray(r) - np.asarray(r).mean(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(group_advantage(r, scale=False)), centred, atol=1e-6)
    np.testing.assert_allclose(np.asarray(group_advantage(r)), centred / (np.asarray(r).std(1, keepdims=True) + 1e-6),
                               rtol=1e-4)
    # a group whose samples score alike: unit-size advantages when scaled, near zero when only centred
    assert np.abs(np.asarray(group_advantage(r))[1]).max() > 0.5
    assert np.abs(np.asarray(group_advantage(r, scale=False))[1]).max() < 1e-3


@pytest.mark.parametrize("scale", [True, False])
def test_reinforce_learns_a_toy_reward(scale):
    """Free logits over 12 tokens, reward = how many of tokens {3, 7, 9} a keep-set of 3 holds:
    the REINFORCE loss used by train.prune_rl must move the mass onto them (either advantage)."""
    import optax

    target = jnp.zeros((12,)).at[jnp.asarray([3, 7, 9])].set(1.0)
    params = jnp.zeros((4, 12))
    tx = optax.adam(0.1)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        ls = jax.nn.log_softmax(params)
        order = gumbel_top_k(key, ls, 3, 16)  # [4, 16, 3]
        adv = group_advantage(jnp.sum(target[order], axis=2), scale=scale)
        grads = jax.grad(lambda p: -jnp.mean(adv * plackett_luce_logprob(jax.nn.log_softmax(p), order)))(params)
        up, opt = tx.update(grads, opt)
        return optax.apply_updates(params, up), opt

    key = jax.random.key(0)
    for _ in range(60):
        key, sub = jax.random.split(key)
        params, opt = step(params, opt, sub)
    mass = np.asarray(jax.nn.softmax(params))[:, [3, 7, 9]].sum(1)
    assert (mass > 0.9).all(), mass


# ----------------------------------------------------------------------------------------------
# (c) the reward's pruned forward


def _batch(cfg, prompts):
    tokens = np.zeros((len(prompts), 32), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return jnp.asarray(tokens)


def test_pruned_logits_equal_prefill_and_full_forward(setup):
    from twig_jax.train.trainer import base_forward
    from twig_jax.model.llama import scan_layers

    cfg, model, twig, prompts, pixels = setup
    tokens = _batch(cfg, prompts)
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    tc, n = cfg.text, cfg.num_image_tokens
    plan = make_plan(cfg, TwigConfig(K=1, T=2, Kf=3, R=5), "random")
    pre = ttp_prefill(model, None, plan, tokens, lengths, jnp.asarray(pixels), extra=2, key=jax.random.key(3))
    is_image = tokens == cfg.image_token_index
    x = model.embed(tokens, model.image_features(jnp.asarray(pixels)))
    pos = jnp.broadcast_to(jnp.arange(32)[None], tokens.shape)
    h_k = scan_layers(tc, model.text.layers.weights(), x, pos, 0, 1)
    w = model.text.layers.weights()
    logits, text_pos = pruned_logits(tc, w, model.text.logits, h_k, is_image, pre.keep[:, ::-1], K=1, Kf=3, N=n)
    last = np.asarray(lengths) - n - 1  # the last prompt token among the text entries
    np.testing.assert_array_equal(np.asarray(text_pos)[np.arange(3), last], np.asarray(lengths) - 1)
    np.testing.assert_allclose(np.asarray(logits)[np.arange(3), last], np.asarray(pre.logits), rtol=1e-4, atol=1e-4)
    # keep everything, no FinalWipe: the full forward at the text positions
    full = np.asarray(base_forward(model, tokens, jnp.asarray(pixels)))
    all_keep = jnp.broadcast_to(jnp.arange(n)[None], (3, n))
    logits, text_pos = pruned_logits(tc, w, model.text.logits, h_k, is_image, all_keep, K=1, Kf=tc.num_hidden_layers,
                                     N=n)
    for i, length in enumerate(np.asarray(lengths)):
        tp = np.asarray(text_pos)[i, :length - n]
        np.testing.assert_allclose(np.asarray(logits)[i, :length - n], full[i, tp], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# (d) round trip, errors, the command


def test_save_load_keeps_the_p_head(setup, tmp_path):
    from twig_jax.twig.io import load_twig, save_twig

    cfg, model, twig, prompts, pixels = setup
    save_twig(twig, str(tmp_path / "t"))
    back = load_twig(str(tmp_path / "t"), cfg.text)
    assert back.twig_cfg.p_head
    for k, v in p_head_weights(twig.p_head).items():
        np.testing.assert_array_equal(np.asarray(p_head_weights(back.p_head)[k]), np.asarray(v))
    plain = Twig(cfg.text, TwigConfig(K=1, T=2, Kf=3, R=5), rngs=nnx.Rngs(0))
    save_twig(plain, str(tmp_path / "p"))
    assert load_twig(str(tmp_path / "p"), cfg.text).p_head is None


def test_phead_without_a_p_head_is_a_clear_error(setup):
    from twig_jax.eval.evaluate import EvalConfig, resolve_twig_config

    cfg, model, twig, prompts, pixels = setup
    plain = Twig(cfg.text, TwigConfig(K=1, T=2, Kf=3, R=5), rngs=nnx.Rngs(0))
    with pytest.raises(TwigConfigError, match="P-head"):
        TwigGenerator(model, plain, plain.twig_cfg, method="phead", ssd=False, **BUCKETS).generate(
            prompts, pixels, max_new_tokens=2, eos_ids=[])
    with pytest.raises(TwigConfigError, match="P-head"):
        resolve_twig_config(model, plain, EvalConfig(method="phead"))
    with pytest.raises(TwigConfigError, match="needs a twig"):
        resolve_twig_config(model, None, EvalConfig(method="phead", R=4))
    # with_p_head adds one to a plain twig, sharing its layers
    added = with_p_head(Twig(cfg.text, TwigConfig(K=1, T=2, Kf=3, R=5), rngs=nnx.Rngs(0)))
    assert added.twig_cfg.p_head and added.p_head is not None


def test_single_turn_records_and_curriculum():
    from twig_jax.train.prune_rl import curriculum_probs, single_turn_records

    recs = [{"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nq1 ?"}, {"from": "gpt", "value": "x ."},
        {"from": "human", "value": "q2 ?"}, {"from": "gpt", "value": "y ."}]}]
    out = single_turn_records(recs)
    assert [r["conversations"][0]["value"] for r in out] == ["<image>\nq1 ?", "<image>\nq2 ?"]
    assert [r["conversations"][1]["value"] for r in out] == ["x .", "y ."]
    assert all(r["image"] == "a.png" for r in out)
    np.testing.assert_allclose(curriculum_probs(0, 100, 3), [1 / 3] * 3)
    end = curriculum_probs(100, 100, 3)
    assert end[0] > 0.99 and abs(end.sum() - 1) < 1e-9


@pytest.fixture(scope="module")
def tiny_shapes_dirs(tmp_path_factory):
    """A tiny random shapes LLaVA (converted dir, shapes tokenizer), a twig (K=1, T=2, no P-head)
    and a 4-image shapes training split."""
    from tests.eval.test_eval import _numpy_init, _tiny_model
    from twig_jax.data.shapes import build_tokenizer, generate_dataset
    from twig_jax.convert.llava import save_converted_model
    from twig_jax.twig.io import save_twig

    root = tmp_path_factory.mktemp("phead_world")
    generate_dataset(str(root / "data"), 4, 0, seed=3)
    tok = build_tokenizer()
    model = _tiny_model(tok)
    base_dir = save_converted_model(model, str(root / "model"), tok)
    twig = _numpy_init(lambda: Twig(model.cfg.text, TwigConfig(K=1, T=2, Kf=3, R=4), rngs=nnx.Rngs(1)), 1)
    twig_dir = save_twig(twig, str(root / "twig"))
    return base_dir, twig_dir, str(root / "data" / "train.json"), str(root / "data" / "images")


def test_prune_rl_command_end_to_end(tmp_path, tiny_shapes_dirs):
    """Two RL steps on the tiny random shapes model: writes a loadable twig with a P-head whose
    gates moved, and a log with finite rewards."""
    from twig_jax.train.prune_rl import main
    from twig_jax.twig.io import load_twig

    base_dir, twig_dir, data_json, images = tiny_shapes_dirs
    out = str(tmp_path / "rl")
    rc = main(["--base", base_dir, "--twig", twig_dir, "--data", data_json, "--images", images, "--out", out,
               "--steps", "2", "--batch", "2", "--group", "3", "--R", "8", "--lr", "0.05", "--log-every", "1",
               "--eval-records", "1"])
    assert rc == 0
    ev = [json.loads(line) for line in open(os.path.join(out, "rl_eval.jsonl"))]
    assert [e["step"] for e in ev] == [0, 2]
    assert all(np.isfinite(v) for v in ev[-1]["R8"].values() if v == v)  # nan: no example of that length
    before = with_p_head(load_twig(twig_dir), seed=0)
    after = load_twig(out)
    assert after.twig_cfg.p_head
    assert not np.allclose(np.asarray(after.p_head.gate_k[...]), np.asarray(before.p_head.gate_k[...]))
    rows = [json.loads(line) for line in open(os.path.join(out, "rl_log.jsonl"))]
    assert len(rows) == 2 and all(np.isfinite(r["reward"]) and r["R"] == 8 for r in rows)
    assert main(["--base", base_dir, "--twig", twig_dir, "--data", data_json, "--images", images, "--out", out,
                 "--steps", "1", "--R", "100000"]) == 2
    assert main(["--base", base_dir, "--twig", twig_dir, "--data", data_json, "--images", images, "--out", out,
                 "--steps", "1", "--R", "8", "--eval-records", "4"]) == 2  # nothing left to train on
    for bad in (["--policy", "cover", "--cover-sharpness", "0"], ["--cover-sharpness", "4"]):  # <= 0; not cover
        assert main(["--base", base_dir, "--twig", twig_dir, "--data", data_json, "--images", images, "--out", out,
                     "--steps", "1", "--R", "8", *bad]) == 2, bad


def test_prune_rl_out_never_overwrites_its_input_twig_or_base(tmp_path, tiny_shapes_dirs, capsys):
    """--out onto the input twig or the base (even with --force), or into a folder holding anything
    but a twig of ours (without --force): status 2, one line, before anything is loaded or trained,
    and every byte of them is still there."""
    from twig_jax.train.prune_rl import main

    base_dir, twig_dir, data_json, images = tiny_shapes_dirs
    other = tmp_path / "notes"
    other.mkdir()
    (other / "paper.txt").write_text("mine")

    def files(path):
        return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(path) for f in fs}

    before = {p: files(p) for p in (base_dir, twig_dir, str(other))}
    args = ["--base", base_dir, "--twig", twig_dir, "--data", data_json, "--images", images, "--steps", "1",
            "--R", "8", "--batch", "2", "--group", "2", "--eval-records", "1"]
    for out, extra, named in ((twig_dir, [], "--twig"), (twig_dir, ["--force"], "--twig"),
                              (base_dir, ["--force"], "--base"), (str(other), [], "paper.txt")):
        assert main([*args, "--out", out, *extra]) == 2, (out, extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("twig-jax train-phead: error:") and named in err[0], err
    for p, content in before.items():
        assert files(p) == content, p


def test_sampled_keep_sets(setup):
    """select='sample': keep-sets are Gumbel-top-R draws from the scores (the RL policy): they
    depend on the generation seed, favour high-scoring tokens, and SSD on them stays lossless."""
    import dataclasses

    cfg, model, twig, prompts, pixels = setup
    tc = dataclasses.replace(twig.twig_cfg, select="sample")
    plain = TwigGenerator(model, twig, tc, method="phead", ssd=False, **BUCKETS)
    ssd = TwigGenerator(model, twig, tc, method="phead", ssd=True, **BUCKETS)
    top = TwigGenerator(model, twig, twig.twig_cfg, method="phead", ssd=False, **BUCKETS)
    keeps = [plain.generate(prompts, pixels, max_new_tokens=1, eos_ids=[], seed=s).keep for s in range(12)]
    assert any(not np.array_equal(keeps[0], k) for k in keeps[1:]), "sampled keep-sets ignore the seed"
    scores, top_keep = top.prune_scores(prompts, pixels)
    for i in range(len(prompts)):  # a sampled token's score beats a random token's on average
        kept = np.mean([scores[i][k[i]].mean() for k in keeps])
        assert kept > scores[i].mean(), (i, kept, scores[i].mean())
    want = plain.generate(prompts, pixels, max_new_tokens=NEW, eos_ids=[], seed=3)
    got = ssd.generate(prompts, pixels, max_new_tokens=NEW, eos_ids=[], seed=3)
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.keep, want.keep)
    with pytest.raises(TwigConfigError, match="select"):
        dataclasses.replace(twig.twig_cfg, select="best").validate(cfg.text.num_hidden_layers, cfg.num_image_tokens)


def test_twig_training_refuses_a_p_head_twig(setup):
    from twig_jax.train.trainer import split_model

    cfg, model, twig, prompts, pixels = setup
    with pytest.raises(ValueError, match="P-head"):
        split_model(model, twig, train_all=False)


def test_attention_over_visual_is_ttps_scores(setup):
    """The probe's / RL eval's "twig" rule: the last twig layer's attention from the last prompt row,
    renormalised over the visual tokens, equals TTP's scores up to that normalisation."""
    from twig_jax.train.phead_objectives import attention_over_visual, attention_rows
    from twig_jax.model.llama import scan_layers
    from twig_jax.twig.keep import visual_positions

    cfg, model, twig, prompts, pixels = setup
    tokens = _batch(cfg, prompts)
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    plan = make_plan(cfg, twig.twig_cfg, "twig")
    pre = ttp_prefill(model, twig, plan, tokens, lengths, jnp.asarray(pixels), extra=2)
    pos = jnp.broadcast_to(jnp.arange(32)[None], tokens.shape)
    x = model.embed(tokens, model.image_features(jnp.asarray(pixels)))
    h_k = scan_layers(cfg.text, model.text.layers.weights(), x, pos, 0, plan.K)
    h_t = scan_layers(cfg.text, twig.layers.weights(), h_k, pos, 0, plan.T - 1)
    label_mask = jax.nn.one_hot(lengths, 32, dtype=jnp.int32)  # the answer starts right after the prompt
    img_pos = visual_positions(tokens == cfg.image_token_index, cfg.num_image_tokens)
    a = attention_over_visual(cfg.text, twig.layers.weights(), h_t, pos, plan.T - 1,
                              attention_rows(label_mask, "last"), img_pos)
    want = np.asarray(pre.scores) / np.asarray(pre.scores).sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(a), want, rtol=1e-4, atol=1e-7)


def test_keep_set_probe_runs(tmp_path, tiny_shapes_dirs):
    """research/keep_set_probe.py end to end on the tiny model: every rule scored on both answer kinds;
    keeping everything (R = N) gives every rule the same reward."""
    from research.keep_set_probe import main

    base_dir, twig_dir, data_json, images = tiny_shapes_dirs
    out = tmp_path / "probe.json"
    assert main(["--model", base_dir, "--twig", twig_dir, "--data", data_json, "--images", images, "--records", "2",
                 "--R", "4", "--cells", "2", "--batch", "4", "--out-json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"unpruned", "twig", "random", "grid", "base L0 last", "base L0 answer"} <= set(res["rules"])
    assert all(v[c] is None or np.isfinite(v[c]) for v in res["rules"].values() for c in ("long", "short"))
    assert main(["--model", base_dir, "--twig", twig_dir, "--data", data_json, "--images", images, "--records", "2",
                 "--R", "16", "--cells", "2", "--batch", "4", "--out-json", str(out)]) == 0
    rules = {k: v for k, v in json.loads(out.read_text())["rules"].items() if k != "unpruned"}
    for c in ("long", "short"):
        vals = [v[c] for v in rules.values() if v[c] is not None]
        assert vals and max(vals) - min(vals) < 1e-4, (c, rules)  # every rule keeps all 16 tokens
