"""Pruning pictures: which visual tokens TTP (twig attention) and FastV keep for a question.

One PNG: the image as the model sees it (padded to square, resized: the preprocessed pixel values
un-normalised), then one panel per method with its scores as a semi-transparent heatmap over the
patch grid and the kept patches outlined (the dropped ones dimmed). With the "full" select
strategy visual token 0 is CLIP's CLS token (N = patches + 1): only the patch grid is drawn and
the panel title says whether CLS was kept.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

PANEL_INCHES = 4.0
TITLE_INCHES = 0.6
DPI = 100


def figure_pixels(n_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a picture with n_panels panels (image + methods)."""
    return int(round(PANEL_INCHES * n_panels * DPI)), int(round((PANEL_INCHES + TITLE_INCHES) * DPI))


def patch_layout(cfg) -> tuple[int, bool]:
    """(grid side g, has_cls): N = g*g (+1 with a leading CLS token for select strategy 'full')."""
    g = cfg.vision.image_size // cfg.vision.patch_size
    return g, cfg.vision_feature_select_strategy == "full"


def kept_cells(keep: Sequence[int], grid: int, has_cls: bool) -> np.ndarray:
    """Boolean [grid, grid] mask of the patches whose visual token is kept (CLS is not a cell)."""
    keep = np.asarray(keep, np.int64).reshape(-1)
    n = grid * grid + int(has_cls)
    if keep.size and (keep.min() < 0 or keep.max() >= n):
        raise ValueError(f"kept indices must be in [0, {n}), got {keep.min()}..{keep.max()}")
    idx = keep - int(has_cls)
    idx = idx[idx >= 0]
    mask = np.zeros(grid * grid, bool)
    mask[idx] = True
    return mask.reshape(grid, grid)


def score_grid(scores: Sequence[float], grid: int, has_cls: bool) -> np.ndarray:
    """[grid, grid] float scores of the patches (row-major, as CLIP orders them)."""
    s = np.asarray(scores, np.float64).reshape(-1)
    return s[int(has_cls):].reshape(grid, grid)


def unnormalize(pixel_values: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3, H, W] normalised pixels -> uint8 [H, W, 3]."""
    x = np.asarray(pixel_values, np.float32).transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class Panel:
    title: str
    scores: np.ndarray  # [g, g]
    kept: np.ndarray  # [g, g] bool


def render(image: np.ndarray, panels: Sequence[Panel], out_path: str, suptitle: str | None = None) -> str:
    """Save image | panel 1 | panel 2 ... as a PNG of figure_pixels(1 + len(panels))."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = 1 + len(panels)
    w, h = figure_pixels(n)
    fig = plt.figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    H, W = image.shape[:2]
    top = PANEL_INCHES / (PANEL_INCHES + TITLE_INCHES)
    try:
        for i in range(n):
            ax = fig.add_axes((i / n + 0.01 / n, 0.01, 0.98 / n, top - 0.02))
            ax.imshow(image, extent=(0, W, H, 0), interpolation="nearest")
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("input (padded, resized)", fontsize=9)
                continue
            pnl = panels[i - 1]
            g = pnl.scores.shape[0]
            cw, ch = W / g, H / g
            s = pnl.scores
            rng = float(s.max() - s.min())
            norm = (s - s.min()) / rng if rng > 0 else np.zeros_like(s)
            ax.imshow(norm, extent=(0, W, H, 0), cmap="jet", alpha=0.45, interpolation="nearest", vmin=0, vmax=1)
            dim = np.where(pnl.kept, 0.0, 0.55)
            ax.imshow(np.dstack([np.zeros_like(dim)] * 3 + [dim]), extent=(0, W, H, 0), interpolation="nearest")
            for r, c in zip(*np.nonzero(pnl.kept)):
                ax.add_patch(Rectangle((c * cw, r * ch), cw, ch, fill=False, edgecolor="white",
                                       linewidth=max(0.4, min(1.5, 40.0 / g))))
            ax.set_title(pnl.title, fontsize=9)
        if suptitle:
            fig.text(0.5, 1 - (1 - top) * 0.25, suptitle, ha="center", va="top", fontsize=8)
        fig.savefig(out_path, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return out_path


def prune_picture(model, tokenizer, image: Any, question: str, out_path: str, twig_cfg, *, twig=None,
                  image_processor=None, conv: str = "vicuna_v1") -> dict:
    """Score the visual tokens with TTP (when a twig is given), the TwigVLM++ P-head (when the twig
    has one), both with twig_cfg's keep-set rule, and FastV (top R) at the same R, save the picture;
    returns {"out", "R", "panels": {method: {"kept_cells", "kept_cls"}}}."""
    from twig_jax.pipeline import image_preprocessor_for
    from twig_jax.data.preprocess import build_prompt, tokenize_with_image
    from twig_jax.twig.config import baseline_keep_rule
    from twig_jax.decode.generator import TwigGenerator

    cfg = model.cfg
    proc = image_processor or image_preprocessor_for(model, None)
    pixels = proc([image])  # [1, 3, H, W]
    prompt = tokenize_with_image(tokenizer, build_prompt(question, conv), cfg.image_token_index,
                                 cfg.num_image_tokens)
    grid, has_cls = patch_layout(cfg)
    panels, info = [], {}
    methods = (["twig"] if twig is not None else []) + \
        (["phead"] if twig is not None and twig.p_head is not None else []) + ["fastv"]
    r = None
    for method in methods:
        gen = TwigGenerator(model, twig if method in ("twig", "phead") else None,
                            baseline_keep_rule(twig_cfg, method), method=method, ssd=False)
        r = gen.plan.R
        scores, keep = gen.prune_scores([prompt], pixels)
        kept = kept_cells(keep[0], grid, has_cls)
        kept_cls = bool(has_cls and 0 in set(keep[0].tolist()))
        name = {"twig": "TTP (twig)", "phead": "P-head (TwigVLM++)"}.get(method, f"FastV (layer {gen.plan.K - 1})")
        title = f"{name}: keep {r}/{cfg.num_image_tokens}, {gen.plan.keep_rule}" + (" (+CLS)" if kept_cls else "")
        panels.append(Panel(title, score_grid(scores[0], grid, has_cls), kept))
        info[method] = {"kept_cells": int(kept.sum()), "kept_cls": kept_cls}
    q = question if len(question) <= 90 else question[:87] + "..."
    render(unnormalize(pixels[0], proc.image_mean, proc.image_std), panels, out_path, suptitle=f"Q: {q}")
    return {"out": out_path, "R": r, "grid": grid, "has_cls": has_cls, "panels": info}
