"""Confidence intervals for accuracy kept, by a paired bootstrap over images.

Short questions about one image are not independent draws (a pruned keep-set that loses an object
loses every question about it), so the resampling unit is the image: each bootstrap replicate draws
the eval images with replacement and recomputes, for every run on the same replicate (paired),
exact match over its short questions and micro object F1 (2 tp / (predicted + reference objects))
over its descriptions. Accuracy kept is a ratio of two such figures, so its interval comes from the
replicates of the ratio, not from two separate intervals.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from twig_jax.eval.evaluate import (
    DESCRIPTION, SHORT, Parser, Question, Reference, default_parser, exact_match, object_score,
)

# Per-image sums, one column each: short correct, short count, tp, predicted objects, reference objects.
_COLS = 5


def image_sums(questions: Sequence[Question], predictions: Mapping[str, str], answers: Mapping[str, Reference],
               images: Sequence[str], parser: Parser | None = None) -> np.ndarray:  # [n_images, 5] float64
    """Per-image sums of one run's outcomes, rows in the order of `images`."""
    parse = parser or default_parser()
    row = {im: i for i, im in enumerate(images)}
    out = np.zeros((len(images), _COLS), np.float64)
    for q in questions:
        ref = answers[q.key]
        i = row[q.image]
        if ref.category == SHORT:
            out[i, 0] += exact_match(predictions[q.key], ref.answer)
            out[i, 1] += 1
        else:
            s = object_score(predictions[q.key], ref.answer, parse)
            out[i, 2:] += (s.tp, s.n_pred, s.n_ref)
    return out


def accuracies(sums: np.ndarray) -> dict[str, np.ndarray]:  # {category: [...]} over leading axes
    """Exact match and micro F1 from (replicated) column sums [..., 5]."""
    with np.errstate(invalid="ignore", divide="ignore"):
        em = sums[..., 0] / sums[..., 1]
        f1 = 2 * sums[..., 2] / (sums[..., 3] + sums[..., 4])
    return {SHORT: em, DESCRIPTION: f1}


def image_weights(n_images: int, n_boot: int, seed: int = 0) -> np.ndarray:  # [n_boot, n_images] float64
    """How many times each image is drawn in each replicate (draws with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_boot).astype(np.float64)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the finite replicate values (NaN where there are none)."""
    values = values[np.isfinite(values)]
    if not values.size:
        return (np.nan, np.nan)
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def kept_interval(run: np.ndarray, base: np.ndarray, weights: np.ndarray,
                  level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile interval of accuracy kept (run / base) per category, paired over `weights`."""
    r, b = accuracies(weights @ run), accuracies(weights @ base)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {c: _interval(r[c] / b[c], level) for c in (SHORT, DESCRIPTION)}


def difference_interval(run: np.ndarray, other: np.ndarray, base: np.ndarray, weights: np.ndarray,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile interval of (run kept - other kept) per category, all three paired over `weights`."""
    r, o, b = (accuracies(weights @ x) for x in (run, other, base))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {c: _interval((r[c] - o[c]) / b[c], level) for c in (SHORT, DESCRIPTION)}
