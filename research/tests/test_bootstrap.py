"""research.bootstrap against eval.score run on each resampled question list (the oracle), plus the
paired identities: a run identical to the unpruned one keeps [100%, 100%], its margin is [0, 0]."""

from __future__ import annotations

import numpy as np
import pytest

from research.bootstrap import difference_interval, image_sums, image_weights, kept_interval
from twig_jax.eval.evaluate import DESCRIPTION, SHORT, Question, Reference, accuracy, score

OBJECTS = ["small red circle at top left", "large blue square at center", "small green triangle at bottom right",
           "large yellow circle at top right"]


def synthetic(n_images: int, seed: int):
    """Questions, references and three prediction sets (unpruned-like, good, poor) over n_images."""
    rng = np.random.default_rng(seed)
    qs, refs, preds = [], {}, [{}, {}, {}]
    for i in range(n_images):
        image = f"img{i:03d}.png"
        for j in range(2):
            key = f"{i}_{j}"
            qs.append(Question(key, image, "what colour is the circle ?", SHORT))
            refs[key] = Reference(key, "red", SHORT)
            for p, wrong in zip(preds, (0.05, 0.15, 0.7)):
                p[key] = "blue" if rng.random() < wrong else "red"
        key = f"{i}_d"
        objs = list(rng.choice(OBJECTS, size=rng.integers(1, 4), replace=False))
        qs.append(Question(key, image, "describe the image .", DESCRIPTION))
        refs[key] = Reference(key, " . ".join(f"a {o}" for o in objs) + " .", DESCRIPTION)
        for p, drop in zip(preds, (0.05, 0.2, 0.6)):
            said = [o for o in objs if rng.random() > drop] + ([OBJECTS[0]] if rng.random() < drop else [])
            p[key] = " . ".join(f"a {o}" for o in said) + " ." if said else ""
    return qs, refs, preds


def test_image_sums_and_intervals_match_rescoring_each_draw():
    qs, refs, (base, good, poor) = synthetic(40, seed=0)
    images = sorted({q.image for q in qs})
    sums = [image_sums(qs, p, refs, images) for p in (base, good, poor)]
    for p, s in zip((base, good, poor), sums):  # the sums give eval.score's own figures
        m = score(p, refs)
        tot = s.sum(0)
        assert tot[0] / tot[1] == pytest.approx(accuracy(m, SHORT))
        assert 2 * tot[2] / (tot[3] + tot[4]) == pytest.approx(accuracy(m, DESCRIPTION))
    w = image_weights(len(images), 300, seed=3)
    assert w.shape == (300, 40) and (w.sum(1) == 40).all()

    # Oracle: for each draw, the question list with every image repeated as often as it was drawn,
    # scored by eval.score (distinct keys per copy), then the percentile interval of the ratios.
    def rescored(pred, draw):
        p2, r2 = {}, {}
        for q in qs:
            for c in range(int(draw[images.index(q.image)])):
                p2[f"{q.key}#{c}"], r2[f"{q.key}#{c}"] = pred[q.key], refs[q.key]
        m = score(p2, r2)
        return accuracy(m, SHORT), accuracy(m, DESCRIPTION)

    ratios = {SHORT: [], DESCRIPTION: []}
    diffs = {SHORT: [], DESCRIPTION: []}
    for draw in w:
        b, g, pr = (rescored(p, draw) for p in (base, good, poor))
        for i, c in enumerate((SHORT, DESCRIPTION)):
            ratios[c].append(g[i] / b[i])
            diffs[c].append((g[i] - pr[i]) / b[i])
    got, got_d = kept_interval(sums[1], sums[0], w), difference_interval(sums[1], sums[2], sums[0], w)
    for c in (SHORT, DESCRIPTION):
        assert got[c] == pytest.approx(tuple(np.percentile(ratios[c], [2.5, 97.5])))
        assert got_d[c] == pytest.approx(tuple(np.percentile(diffs[c], [2.5, 97.5])))
        assert got[c][0] < got[c][1]  # the data differ between draws: a real interval
        assert got_d[c][0] > 0  # the good run beats the poor one on every category here


def test_paired_identities():
    qs, refs, (base, good, _) = synthetic(8, seed=1)
    images = sorted({q.image for q in qs})
    b, g = image_sums(qs, base, refs, images), image_sums(qs, good, refs, images)
    w = image_weights(len(images), 200)
    for c, (lo, hi) in kept_interval(b, b, w).items():
        assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0), c
    for c, (lo, hi) in difference_interval(g, g, b, w).items():
        assert lo == pytest.approx(0.0) and hi == pytest.approx(0.0), c
