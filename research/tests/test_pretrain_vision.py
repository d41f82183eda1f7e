"""Labels of the vision-tower pretraining (train/pretrain_vision.py): per-cell and per-patch."""

import numpy as np

from research.pretrain_vision import SIZE_CLASSES, cell_labels, patch_labels
from twig_jax.data.shapes import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES


def test_patch_labels_follow_pixel_geometry():
    objects = [("small", "red", "circle", "top left"), ("large", "blue", "cross", "center"),
               ("large", "orange", "triangle", "bottom right")]
    cells = cell_labels(objects)  # [9, 3]
    assert cells.shape == (9, 3)
    assert tuple(cells[0]) == (COLOURS.index("red") + 1, SHAPES.index("circle") + 1, SIZE_CLASSES.index("small"))
    assert tuple(cells[4]) == (COLOURS.index("blue") + 1, SHAPES.index("cross") + 1, SIZE_CLASSES.index("large"))
    assert not cells[[1, 2, 3, 5, 6, 7]].any()

    side, patch = 12, IMAGE_SIZE // 12
    labels = patch_labels(cells[None], side)[0]  # [144, 4]
    assert labels.shape == (side * side, 4)
    cell_px = IMAGE_SIZE / 3
    for p in range(side * side):
        # The cell that holds the patch's centre pixel, computed from pixel coordinates.
        cy, cx = (p // side + 0.5) * patch, (p % side + 0.5) * patch
        cell = int(cy // cell_px) * 3 + int(cx // cell_px)
        assert labels[p, 0] == cell, p
        np.testing.assert_array_equal(labels[p, 1:], cells[cell])
    # Every cell owns a 4 x 4 block of patches.
    assert np.bincount(labels[:, 0], minlength=9).tolist() == [16] * 9
    assert POSITIONS[labels[0, 0]] == "top left" and POSITIONS[labels[-1, 0]] == "bottom right"
