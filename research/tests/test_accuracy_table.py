"""research/accuracy_table.py on the bundled model and the first image of the checked-in mini subset:
the table's runs answer exactly what `twig-jax eval` answers for the same method, keep-set rule, R
and Kf (so --Kf and the row's rule really reach every pruned run), accuracy kept is method / unpruned accuracy, and bad
--Kf / --ninths values are refused with a message that names them."""

from __future__ import annotations

import json
import os

import pytest

from research.bundle import BUNDLE_DIR, MINI_DIR

pytestmark = pytest.mark.skipif(not os.path.isdir(BUNDLE_DIR), reason=f"no bundled model at {BUNDLE_DIR}")

FILES = ["--questions", os.path.join(MINI_DIR, "questions.jsonl"), "--images", os.path.join(MINI_DIR, "images"),
         "--answers", os.path.join(MINI_DIR, "answers.jsonl")]
LIMIT = 3  # the first image: two short questions and its description


def _preds(path):
    with open(path) as f:
        return {str(r["question_id"]): r["text"] for r in map(json.loads, f)}


def test_table_runs_at_the_given_Kf_equal_eval(tmp_path):
    from research.accuracy_table import main
    from twig_jax.eval.evaluate import EvalConfig, read_answers, read_questions, attach_categories, run_eval
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
    from twig_jax.twig.io import load_twig_any
    from twig_jax.convert.llava import load_model
    import jax.numpy as jnp

    model = load_model(os.path.join(BUNDLE_DIR, "base"), dtype=jnp.float32)
    L = model.cfg.text.num_hidden_layers
    out, preds = str(tmp_path / "acc.json"), str(tmp_path / "preds")
    os.makedirs(preds)
    assert main(FILES + ["--methods", "twig,twig-cover", "--ninths", "1", "--Kf", str(L), "--limit", str(LIMIT),
                         "--out-json", out, "--preds-dir", preds]) == 0
    with open(out) as f:
        result = json.load(f)
    R = round(model.cfg.num_image_tokens / 9)
    assert [(r["method"], r["R"], r["Kf"]) for r in result["runs"]] == [("twig", R, L), ("twig-cover", R, L)]
    assert result["Kf"] == L
    for run in result["runs"]:
        for cat, acc in run["accuracy"].items():
            base = result["unpruned"]["accuracy"][cat]
            if base:
                assert run["kept"][cat] == pytest.approx(acc / base)
                # one image: every bootstrap draw is that image, so the interval is the point itself
                assert run["kept_ci"][cat] == pytest.approx((acc / base, acc / base))
    assert result["bootstrap"]["images"] == 1

    # The oracle: the eval library run directly with the same method, keep-set rule, R and Kf.
    qpath, apath = FILES[1], FILES[5]
    answers = read_answers(apath)
    questions = attach_categories(read_questions(qpath), answers, qpath, apath)[:LIMIT]
    twig, _ = load_twig_any(os.path.join(BUNDLE_DIR, "twig"), model.cfg.text, dtype=jnp.float32)
    tok = load_tokenizer(os.path.join(BUNDLE_DIR, "base"))
    improc = image_preprocessor_for(model, os.path.join(BUNDLE_DIR, "base"))
    for row, select in (("twig", "top"), ("twig-cover", "cover")):
        direct, m = run_eval(model, tok, questions,
                             EvalConfig(method="twig", R=R, Kf=L, select=select, ssd=False, batch_size=16),
                             images_dir=FILES[3], twig=twig, image_processor=improc,
                             answers={q.key: answers[q.key] for q in questions})
        assert m["Kf"] == L
        table = _preds(os.path.join(preds, f"{row}_R{R}.jsonl"))
        assert table == {str(r["question_id"]): r["text"] for r in direct}, row


@pytest.mark.parametrize("flag,value,match", [("--Kf", "99", "FinalWipe layer must be in"),
                                               ("--ninths", "0", "each k must be in 1..8"),
                                               ("--ninths", "x", "comma list of integers")])
def test_bad_options_are_refused(flag, value, match, capsys):
    from research.accuracy_table import main

    with pytest.raises(SystemExit):
        main(FILES + ["--methods", "random", "--limit", "1", flag, value])
    assert match in capsys.readouterr().err
