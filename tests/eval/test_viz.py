"""Pruning pictures (twig_jax.eval.viz): highlighted cells, CLS handling, PNG size, the prune-viz CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from twig_jax.eval.viz import Panel, figure_pixels, kept_cells, patch_layout, render, score_grid, unnormalize


def test_kept_cells_default_strategy():
    keep = np.array([0, 5, 6, 15])
    m = kept_cells(keep, 4, has_cls=False)
    assert m.shape == (4, 4) and m.sum() == 4
    assert m[0, 0] and m[1, 1] and m[1, 2] and m[3, 3]


def test_kept_cells_full_strategy_skips_cls():
    # N = 16 patches + CLS at index 0: token i is patch i - 1.
    m = kept_cells(np.array([0, 1, 16]), 4, has_cls=True)
    assert m.sum() == 2 and m[0, 0] and m[3, 3]
    m = kept_cells(np.array([3, 4]), 4, has_cls=True)
    assert m.sum() == 2 and m[0, 2] and m[0, 3]
    with pytest.raises(ValueError):
        kept_cells(np.array([17]), 4, has_cls=True)
    s = score_grid(np.arange(17.0), 4, has_cls=True)
    assert s.shape == (4, 4) and s[0, 0] == 1.0 and s[3, 3] == 16.0


def test_patch_layout():
    import dataclasses

    from twig_jax.model.config import load_preset

    cfg = load_preset("tiny")
    assert patch_layout(cfg) == (4, False)
    full = dataclasses.replace(cfg, vision_feature_select_strategy="full")
    assert patch_layout(full) == (4, True) and full.num_image_tokens == 17


def test_render_size_full_grid(tmp_path):
    from PIL import Image

    img = unnormalize(np.zeros((3, 28, 28), np.float32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert img.shape == (28, 28, 3) and img.dtype == np.uint8 and img[0, 0, 0] in (127, 128)
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(17, 6, replace=False))
    panels = [Panel("a", score_grid(rng.random(17), 4, True), kept_cells(keep, 4, True))]
    out = render(img, panels, str(tmp_path / "p.png"), suptitle="Q")
    with Image.open(out) as im:
        assert im.size == figure_pixels(2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from PIL import Image

    from twig_jax.cli.demo import random_demo_model
    from twig_jax.convert.llava import save_converted_model
    from twig_jax.twig.module import Twig
    from twig_jax.twig.config import TwigConfig
    from twig_jax.twig.io import save_twig

    root = tmp_path_factory.mktemp("viz")
    model, tok = random_demo_model()
    model_dir = save_converted_model(model, str(root / "model"), tok)
    twig = Twig(model.cfg.text, TwigConfig(K=1, T=2, Kf=3, R=16), rngs=nnx.Rngs(1))
    twig_dir = save_twig(twig, str(root / "twig"))
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((50, 80, 3)) * 255).astype(np.uint8)).save(root / "img.png")
    return dict(root=root, model_dir=model_dir, twig_dir=twig_dir, image=str(root / "img.png"), model=model)


def test_prune_viz_cli(saved, tmp_path, capsys):
    from PIL import Image

    from twig_jax.cli.main import main

    out = tmp_path / "prune.png"
    r = 10
    rc = main(["prune-viz", "--model", saved["model_dir"], "--twig", saved["twig_dir"], "--image", saved["image"],
               "--prompt", "where is the red circle ?", "--R", str(r), "--out", str(out)])
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["R"] == r and info["grid"] == 8 and not info["has_cls"]
    assert info["panels"]["twig"]["kept_cells"] == r
    assert info["panels"]["fastv"]["kept_cells"] == r
    with Image.open(out) as im:
        assert im.size == figure_pixels(3)  # input | TTP | FastV
