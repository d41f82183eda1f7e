"""The bundled shapes-world model (infer/assets/shapes-llava) on the checked-in mini eval
subset (infer/assets/shapes-eval-mini: the first 16 eval images of seed 0, 48 questions).

(a) the bundle loads (base + twig) and is at most 25 MB of plain, git-trackable files;
(b) unpruned (and twig-pruned) accuracy reaches the figures it was measured at (expected.json,
    written by `python research/scripts/bundle_shapes.py --measure`) within TOLERANCE; an unmeasured
    (null) or low (< MEASURED_FLOOR) expected.json fails: the bundle was never measured;
(c) TTP + SSD greedy answers are token-identical to the plain greedy answers of the same pruned
    model (method twig, SSD off).
Skipped only when the bundle directory is absent. TWIG_JAX_BUNDLE=DIR tests another bundle dir,
TWIG_JAX_MINI=DIR another subset dir (with its expected.json).
Each (method, ssd) compiles once per question category (all questions of a category in one batch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from research.bundle import (
    BUNDLE_DIR, EXPECTED_FIELDS, EXPECTED_FILE, EXPECTED_METHODS, MAX_BUNDLE_BYTES, MEASURED_FLOOR, MINI_DIR, REPO,
    TOLERANCE, bundle_files, expected_methods, main_method,
)

BUNDLE = os.environ.get("TWIG_JAX_BUNDLE", BUNDLE_DIR)
MINI = os.environ.get("TWIG_JAX_MINI", MINI_DIR)

pytestmark = pytest.mark.skipif(
    not os.path.isdir(BUNDLE),
    reason=f"no bundled model at {BUNDLE}: build it with `python research/scripts/bundle_shapes.py --base DIR --twig DIR "
           f"--measure` (README, 'The bundled model')")


@pytest.fixture(scope="module")
def bundle():
    from twig_jax.pipeline import load_bundle

    return load_bundle(BUNDLE)


@pytest.fixture(scope="module")
def subset():
    from twig_jax.eval.evaluate import read_subset

    return read_subset(MINI)


_RUNS: dict = {}


def answers_for(bundle, subset, method: str, ssd: bool):
    """{question key: Answer} for (method, ssd), computed once per module."""
    from twig_jax.eval.evaluate import run_questions

    key = (method, ssd)
    if key not in _RUNS:
        questions, _, images = subset
        _RUNS[key] = run_questions(bundle.model, bundle.tokenizer, bundle.image_processor, questions, images,
                                   twig=bundle.twig, twig_cfg=bundle.twig_cfg, method=method, ssd=ssd,
                                   image_cache=_RUNS.setdefault("images", {}))
    return _RUNS[key]


def test_bundle_loads_and_is_small(bundle):
    files = bundle_files(BUNDLE)  # raises on symlinks / special files
    total = sum(n for _, n in files)
    assert total <= MAX_BUNDLE_BYTES, f"bundle is {total / 1e6:.2f} MB > {MAX_BUNDLE_BYTES / 1e6:.0f} MB"
    names = {rel.split(os.sep)[0] for rel, _ in files}
    assert {"base", "twig"} <= names, names
    cfg = bundle.model.cfg
    assert bundle.twig is not None, "bundle has no twig"
    tc = bundle.twig_cfg
    tc.validate(cfg.text.num_hidden_layers, cfg.num_image_tokens)
    assert bundle.image_processor.crop_size == (cfg.vision.image_size,) * 2
    assert os.path.isfile(os.path.join(BUNDLE, "base", "preprocessor_config.json"))
    assert bundle.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_index
    # Every file is committable: none is matched by a .gitignore rule.
    if shutil.which("git") and os.path.isdir(os.path.join(REPO, ".git")):
        paths = [os.path.join(BUNDLE, rel) for rel, _ in files]
        r = subprocess.run(["git", "-C", REPO, "check-ignore", "--no-index", "--stdin"], input="\n".join(paths),
                           capture_output=True, text=True)
        assert r.stdout.strip() == "", f"bundle files ignored by git: {r.stdout.split()[:5]}"


def _expected() -> dict:
    path = os.path.join(MINI, EXPECTED_FILE)
    with open(path) as f:
        return json.load(f)


def _check_accuracy(bundle, subset, method: str, floor: dict | None) -> None:
    from twig_jax.eval.evaluate import accuracy_of

    exp = _expected()
    want = exp.get(method) or {}
    missing = [f for f in EXPECTED_FIELDS if want.get(f) is None]
    assert not missing, (f"{MINI}/{EXPECTED_FILE} has no measured {method} {missing}: the bundle was never "
                         f"measured; run `python research/scripts/bundle_shapes.py --measure`")
    if floor is not None:
        low = {f: want[f] for f in EXPECTED_FIELDS if want[f] < floor[f]}
        assert not low, (f"{EXPECTED_FILE}: unpruned accuracy {low} < {floor}: the bundle was never measured "
                         f"as a trained model (or it is not one)")
    answers, _ = answers_for(bundle, subset, method, False)
    got = accuracy_of(answers, subset[1])
    for f in EXPECTED_FIELDS:
        assert got[f] >= want[f] - TOLERANCE, (f"{method}: {f} {got[f]:.3f} < expected {want[f]:.3f} - {TOLERANCE} "
                                               f"(all: {got} vs {want})")


def test_unpruned_accuracy_as_measured(bundle, subset):
    assert set(EXPECTED_METHODS) == {"none", "twig"}
    _check_accuracy(bundle, subset, "none", MEASURED_FLOOR)


def test_twig_pruned_accuracy_as_measured(bundle, subset):
    _check_accuracy(bundle, subset, "twig", None)


def test_phead_pruned_accuracy_as_measured(bundle, subset):
    """With a P-head in the bundled twig, expected.json must hold its measured accuracy and the
    bundle must reach it; without one, expected.json must not claim P-head figures."""
    methods = expected_methods(bundle.twig)
    assert set(methods) - {"phead"} == set(EXPECTED_METHODS)
    if "phead" not in methods:
        assert "phead" not in _expected(), "expected.json has P-head figures but the bundled twig has no P-head"
        return
    _check_accuracy(bundle, subset, "phead", None)


def test_ttp_ssd_equals_pruned_greedy(bundle, subset):
    """The demo's main run (SSD on the P-head's pruning when the twig has one, else on TTP)."""
    method = main_method(bundle.twig)
    pruned, _ = answers_for(bundle, subset, method, False)
    spec, stats = answers_for(bundle, subset, method, True)
    diff = [(k, pruned[k].text, spec[k].text) for k in pruned if pruned[k].tokens != spec[k].tokens]
    assert not diff, f"{len(diff)}/{len(pruned)} TTP+SSD answers differ from the pruned greedy ones: {diff[:3]}"
    for cat, st in stats.items():  # SSD ran: rounds counted, each emitting >= 1 token
        assert st["ssd"] and st["rounds"] > 0, (cat, st)
        assert st["mean_tokens_per_round"] >= 1.0, (cat, st)


def test_demo_main_job_answers_and_reports(bundle, tmp_path, capsys):
    """The README's main command (scripts/demo.sh -> twig-jax demo) on the bundle and its demo set: it
    answers every question, and the accuracy it prints is eval.score's on the answers it writes."""
    from twig_jax.cli.demo import DEMO_DIR, main
    from twig_jax.eval.evaluate import read_answers, score

    out = tmp_path / "answers.jsonl"
    assert main(["--bundle", BUNDLE, "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    preds = {str(r["question_id"]): r["text"] for r in map(json.loads, out.read_text().splitlines())}
    refs = read_answers(os.path.join(DEMO_DIR, "answers.jsonl"))
    assert set(preds) == set(refs)
    m = score(preds, refs)
    label = "P-head+SSD" if main_method(bundle.twig) == "phead" else "TTP+SSD"
    assert (f"accuracy {label:8s} short exact match {m['short']['em']:.3f}, description object F1 "
            f"{m['description']['f1']:.3f}") in printed
    assert "speed (median of 1 timed calls" in printed and "  all " in printed
    with pytest.raises(SystemExit):
        main(["--repeats", "0"])


def test_tree_ssd_equals_pruned_greedy(bundle, subset):
    """Tree drafting with the bundled trained twig (a small tree, so the subset stays quick) answers
    token for token as greedy decoding of the same pruned model."""
    import dataclasses

    from twig_jax.eval.evaluate import run_questions

    method = main_method(bundle.twig)
    pruned, _ = answers_for(bundle, subset, method, False)
    questions, _, images = subset
    tree_cfg = dataclasses.replace(bundle.twig_cfg, spec="tree", tree_width=3, tree_depth=4, tree_nodes=10)
    tree, stats = run_questions(bundle.model, bundle.tokenizer, bundle.image_processor, questions, images,
                                twig=bundle.twig, twig_cfg=tree_cfg, method=method, ssd=True,
                                image_cache=_RUNS.setdefault("images", {}))
    diff = [(k, pruned[k].text, tree[k].text) for k in pruned if pruned[k].tokens != tree[k].tokens]
    assert not diff, f"{len(diff)}/{len(pruned)} tree answers differ from the pruned greedy ones: {diff[:3]}"
    for cat, st in stats.items():
        assert st["rounds"] > 0 and st["drafted"] == 10 * st["rounds"], (cat, st)
