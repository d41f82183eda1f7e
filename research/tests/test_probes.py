"""The measurement helpers behind research/kept_coverage.py and research/lookup_probe.py, against
hand-made scenes whose answers are known, and one kept_coverage run on the bundled model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from research.kept_coverage import cell_of_patch, coverage, object_patches
from research.lookup_probe import asked_cells
from research.bundle import BUNDLE_DIR, MINI_DIR


def test_cell_of_patch_is_the_3x3_grid():
    cells = cell_of_patch(12)
    assert cells.shape == (12, 12)
    assert cells[0, 0] == 0 and cells[0, 11] == 2 and cells[5, 5] == 4 and cells[11, 0] == 6 and cells[11, 11] == 8
    assert all((cells == c).sum() == 16 for c in range(9))


def test_object_patches_finds_saturated_pixels_only():
    img = np.full((96, 96, 3), 120, np.uint8)  # grey background
    img[10:13, 20:23] = (220, 30, 30)  # 9 red pixels inside patch (1, 2)
    img[50, 50] = (30, 70, 225)  # 1 blue pixel: below min_pixels
    img[80:88, 80:88] = 200  # bright grey block: not saturated
    obj = object_patches(img, 12, min_pixels=3)
    assert obj.sum() == 1 and obj[1, 2]


def test_coverage_counts_objects_and_kept_patches():
    cells = cell_of_patch(12)
    obj = np.zeros((12, 12), bool)
    obj[0, 0] = obj[5, 5] = True  # objects in cells 0 and 4
    kept = np.zeros((12, 12), bool)
    kept[0, 0] = True  # on the cell-0 object
    kept[4, 4] = True  # in cell 4 but not on its object pixels
    kept[11, 11] = True  # empty cell 8
    c = coverage(kept, [0, 4], obj, cells)
    assert c == {"objects_covered": 1.0, "objects_hit": 0.5, "kept_on_objects": pytest.approx(1 / 3)}


def test_asked_cells_names_the_questions_object():
    objects = [["large", "red", "cross", "top left"], ["small", "red", "circle", "center"],
               ["large", "blue", "circle", "bottom right"]]
    assert asked_cells("position", "where is the red circle ?", objects) == [4]
    assert asked_cells("colour_of", "what colour is the cross ?", objects) == [0]
    assert asked_cells("colour_of", "what colour is the large circle ?", objects) == [8]
    with pytest.raises(ValueError, match="unknown kind"):
        asked_cells("exists", "is there a red cross ?", objects)


@pytest.mark.skipif(not os.path.isdir(BUNDLE_DIR), reason=f"no bundled model at {BUNDLE_DIR}")
def test_kept_coverage_on_the_bundle(tmp_path):
    """Two mini-subset images: every method keeps R patches (random: exactly), so its shares are
    fractions; an R above the visual token count is refused."""
    from research.kept_coverage import main

    data = tmp_path / "data"
    os.makedirs(data / "eval")
    os.symlink(os.path.abspath(os.path.join(MINI_DIR, "images")), data / "images")
    for name in ("questions.jsonl", "answers.jsonl"):
        with open(os.path.join(MINI_DIR, name)) as f, open(data / "eval" / name, "w") as g:
            g.write(f.read())
    out = tmp_path / "cov.json"
    assert main(["--data", str(data), "--images", "2", "--R", "16", "--random-draws", "4", "--out-json", str(out)]) == 0
    result = json.loads(out.read_text())
    with open(os.path.join(BUNDLE_DIR, "twig", "twig_config.json")) as f:
        has_p_head = json.load(f)["twig"].get("p_head", False)  # the P-head's row when the twig has one
    assert result["images"] == 2
    assert set(result["methods"]) == {"twig", "fastv", "random"} | ({"phead"} if has_p_head else set())
    for v in result["methods"].values():
        assert all(0.0 <= x <= 1.0 for x in v.values())
        assert v["objects_hit"] <= v["objects_covered"]
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--images", "1", "--R", "1000"])


def test_find_probe_fields_and_prompts(tmp_path):
    """research/find_probe.py: fields of a key-first answer (one- and two-word keys and positions, a
    model that runs on after its first sentence), and prompts whose references are the generator's."""
    from research.find_probe import field_hits, find_prompts
    from twig_jax.data.shapes import generate_dataset

    ref = "red object large red circle top left ."
    assert all(field_hits("red object large red circle top left . a large", ref, 2).values())
    hits = field_hits("red object small red square top .", ref, 2)
    assert hits == {"key": True, "size": False, "colour": True, "shape": False, "position": False}
    hits = field_hits("circle large blue circle center .", "circle large red circle center .", 1)
    assert hits == {"key": True, "size": True, "colour": False, "shape": True, "position": True}
    assert not any(field_hits("", ref, 2).values())

    out = str(tmp_path / "w")
    generate_dataset(out, 0, 8, seed=2)
    prompts = find_prompts(os.path.join(out, "eval", "questions.jsonl"), os.path.join(out, "eval", "answers.jsonl"), 5)
    assert 1 <= len(prompts) <= 5
    for image, text, answer, key_len in prompts:
        assert image.startswith("eval_") and text.count("</s>USER: ") == 2
        question = text.split("</s>USER: ")[-1]
        assert question.startswith("describe the ") and question.split()[2:2 + key_len] == answer.split()[:key_len]


def test_keep_set_probe_grid_spreads_over_regions():
    from research.keep_set_probe import grid_keep

    nine = grid_keep(12, 3, 9)
    assert [(int(i) // 12, int(i) % 12) for i in nine] == [(y, x) for y in (1, 5, 9) for x in (1, 5, 9)]
    for r in (16, 40, 144):
        keep = grid_keep(12, 3, r)
        assert len(keep) == r and len(set(keep.tolist())) == r and list(keep) == sorted(keep)
        regions = np.bincount([(int(i) // 12 // 4) * 3 + (int(i) % 12) // 4 for i in keep], minlength=9)
        assert regions.max() - regions.min() <= 1, regions  # round-robin: as even as r allows
