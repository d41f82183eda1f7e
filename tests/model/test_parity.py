"""float32 logits of our Llava vs the Hugging Face reference on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import hf_logits, jax_logits, make_llava_inputs, rel_err
from twig_jax.convert.llava import load_hf_llava

TOL = 1e-4

CASES = [
    dict(gqa=False),
    dict(gqa=True),
    dict(gqa=False, vision_feature_layer=-1),
    dict(gqa=True, vision_feature_layer=-1, select_strategy="full"),
    dict(gqa=True, vision_feature_layer=[-2, -1]),
    dict(gqa=False, vision_feature_layer=[-3, -1], select_strategy="full"),
    dict(gqa=True, tie=True),
]


def _id(case):
    return "-".join(f"{k}={v}" for k, v in case.items()).replace(" ", "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_logits_match_hf(tiny_llava, case):
    tl = tiny_llava(**case)
    model = load_hf_llava(tl.dir)
    cfg = model.cfg
    assert cfg.text.num_key_value_heads == (2 if case["gqa"] else 4)
    assert cfg.text.tie_word_embeddings == case.get("tie", False)
    assert cfg.vision_feature_select_strategy == case.get("select_strategy", "default")
    if case.get("tie"):
        assert model.text.lm_head is None
    ids, pix = make_llava_inputs(cfg, batch=2)
    want = hf_logits(tl.model, ids, pix)
    got = jax_logits(model, ids, pix)
    assert got.shape == want.shape == (ids.shape[0], ids.shape[1], cfg.text.vocab_size)
    assert np.abs(want).max() > 1.0  # a meaningful comparison, not logits ~ 0
    assert rel_err(got, want) <= TOL


def test_image_changes_logits(hf_llava_gqa):
    """The image really reaches the text: other pixels, other logits after the image (both models)."""
    tl = hf_llava_gqa
    model = load_hf_llava(tl.dir)
    ids, pix = make_llava_inputs(tl.cfg, batch=2, seed=1)
    pix2 = pix[::-1].copy()  # swap the two rows' images
    a, b = jax_logits(model, ids, pix), jax_logits(model, ids, pix2)
    ha, hb = hf_logits(tl.model, ids, pix), hf_logits(tl.model, ids, pix2)
    last = ids.shape[1] - 1
    assert np.abs(a[:, last] - b[:, last]).max() > 1e-2
    assert rel_err(b, hb) <= TOL and rel_err(a, ha) <= TOL
    # Before the first image token the logits do not depend on the image.
    np.testing.assert_allclose(a[:, :3], b[:, :3], rtol=1e-6, atol=1e-6)


def test_text_only_matches_hf(hf_llava_mha):
    tl = hf_llava_mha
    model = load_hf_llava(tl.dir)
    ids = np.random.default_rng(3).integers(0, tl.cfg.image_token_index, size=(2, 11))
    assert rel_err(jax_logits(model, ids, None), hf_logits(tl.model, ids, None)) <= TOL


def test_liuhaotian_layout_as_published_matches_hf(tiny_liuhaotian):
    """No image_token_index in its config, no <image> in its tokenizer: the placeholder is -200, which
    the model never embeds; the logits over its vocabulary are the llava-hf oracle's."""
    lh = tiny_liuhaotian
    model = load_hf_llava(lh.dir, vision_dir=lh.vision_dir)
    cfg = model.cfg
    assert cfg.image_token_index == -200 and cfg.text.vocab_size == lh.hf.cfg.text.vocab_size - 1
    ids, pix = make_llava_inputs(cfg, batch=2)
    hf_ids = np.where(ids == cfg.image_token_index, lh.hf.cfg.image_token_index, ids)
    want = hf_logits(lh.hf.model, hf_ids, pix)[..., :cfg.text.vocab_size]
    assert np.abs(want).max() > 1.0
    assert rel_err(jax_logits(model, ids, pix), want) <= TOL
    text = np.random.default_rng(4).integers(0, cfg.text.vocab_size, size=(2, 9))
    assert rel_err(jax_logits(model, text, None), hf_logits(lh.hf.model, text, None)[..., :cfg.text.vocab_size]) <= TOL
