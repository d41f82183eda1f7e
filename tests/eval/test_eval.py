"""twig_jax.eval: exact match and object-level P/R/F1 on hand-made answers, question / answer /
prediction file errors, TwigConfig resolution for baselines, and `twig-jax eval` end to end on a
tiny random LLaVA over a tiny generated shapes eval split (one answer per question; the printed
metrics equal those recomputed from the written answer file)."""

from __future__ import annotations

import dataclasses

import json
import math
import os

import pytest

from twig_jax.eval.evaluate import (
    EvalConfig, EvalFileError, Reference, attach_categories, exact_match, normalize_answer, object_score,
    read_answers, read_predictions, read_questions, resolve_twig_config, score, score_files,
)

REF3 = ("there are three objects . a large red circle is at the top left of the image . "
        "a small blue square is at the center of the image . a small green triangle is at the bottom of the image .")


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------------------------
# Metrics


def test_normalize_and_exact_match():
    assert normalize_answer("  Two. ") == "2" == normalize_answer("2")
    assert normalize_answer("The Top-Left") == "top left"
    assert exact_match("yes", "Yes .") and exact_match("three", "3")
    assert not exact_match("red", "blue")
    assert not exact_match("top", "top left")  # a position prefix is not the answer
    assert not exact_match("", "no")


def test_parser_reads_hand_made_description():
    from twig_jax.data.shapes import parse_description

    assert sorted(parse_description(REF3)) == sorted([("large", "red", "circle", "top left"),
                                                       ("small", "blue", "square", "center"),
                                                       ("small", "green", "triangle", "bottom")])


def test_object_score_exact_and_order_free():
    s = object_score(REF3, REF3)
    assert (s.tp, s.n_pred, s.n_ref, s.precision, s.recall, s.f1) == (3, 3, 3, 1.0, 1.0, 1.0)
    sentences = REF3.split(" . ")
    shuffled = " . ".join([sentences[3], sentences[1], sentences[2]]) + " ."
    assert object_score(shuffled, REF3).f1 == 1.0  # order and the count sentence do not matter


def test_wrong_colour_costs_exactly_one_object():
    n = 3
    wrong = REF3.replace("blue square", "yellow square")
    s = object_score(wrong, REF3)
    assert s.tp == n - 1
    assert s.precision == pytest.approx(1 - 1 / n) and s.recall == pytest.approx(1 - 1 / n)
    assert s.f1 == pytest.approx(1 - 1 / n)
    # Wrong position (top left -> top) counts as a miss as well, not a partial hit.
    assert object_score(REF3.replace("top left", "top"), REF3).tp == n - 1


def test_missing_extra_and_duplicate_objects():
    missing = REF3.replace("a small green triangle is at the bottom of the image .", "")
    s = object_score(missing, REF3)
    assert (s.precision, s.recall) == (1.0, pytest.approx(2 / 3))
    extra = REF3 + " a large purple cross is at the right of the image ."
    s = object_score(extra, REF3)
    assert (s.precision, s.recall) == (pytest.approx(3 / 4), 1.0)
    one = "a small red circle is at the left of the image ."
    dup = object_score(one + " " + one, one)  # multiset: saying it twice matches once
    assert (dup.tp, dup.n_pred, dup.precision, dup.recall) == (1, 2, 0.5, 1.0)
    empty = object_score("", REF3)
    assert (empty.precision, empty.recall, empty.f1) == (0.0, 0.0, 0.0)
    assert object_score("garbled words", "").f1 == 1.0  # nothing to find, nothing claimed


def test_score_micro_and_mean_and_short():
    one = "there is one object . a small red circle is at the left of the image ."
    answers = {"d1": Reference("d1", one, "description"), "d2": Reference("d2", REF3, "description"),
               "s1": Reference("s1", "two", "short"), "s2": Reference("s2", "yes", "short"),
               "s3": Reference("s3", "blue", "short")}
    preds = {"d1": one.replace("red", "blue"), "d2": REF3, "s1": "2", "s2": "yes", "s3": "red"}
    m = score(preds, answers)
    assert m["questions"] == 5
    assert m["short"] == {"n": 3, "correct": 2, "em": pytest.approx(2 / 3)}
    d = m["description"]
    assert (d["n"], d["tp"], d["pred_objects"], d["ref_objects"]) == (2, 3, 4, 4)
    assert d["precision"] == pytest.approx(3 / 4) and d["recall"] == pytest.approx(3 / 4)
    assert d["f1"] == pytest.approx(3 / 4)
    assert d["mean_precision"] == pytest.approx(0.5) and d["mean_f1"] == pytest.approx(0.5)
    # A subset run scores only what was predicted, unless every answer is required.
    sub = score({"s1": "2"}, answers, require_all=False)
    assert sub["questions"] == 1 and sub["short"]["em"] == 1.0 and sub["description"]["n"] == 0
    assert math.isnan(sub["description"]["f1"])
    with pytest.raises(EvalFileError, match="no prediction for 4"):
        score({"s1": "2"}, answers)
    with pytest.raises(EvalFileError, match="unknown question id"):
        score(dict(preds, zz="x"), answers)


# ----------------------------------------------------------------------------------------------
# Files


def test_file_errors(tmp_path):
    q = {"question_id": "a", "image": "x.png", "text": "how many objects are there ?", "category": "short"}
    a = {"question_id": "a", "answer": "two", "category": "short"}
    good_q, good_a = _write(tmp_path / "q.jsonl", [q, ""]), _write(tmp_path / "a.jsonl", [a])
    qs = attach_categories(read_questions(good_q), read_answers(good_a))
    assert [(x.question_id, x.category) for x in qs] == [("a", "short")]

    with pytest.raises(EvalFileError, match=r"q2.jsonl:2: question line lacks key\(s\) \['image'\]"):
        read_questions(_write(tmp_path / "q2.jsonl", [q, {"question_id": "b", "text": "?"}]))
    with pytest.raises(EvalFileError, match="q3.jsonl:2: duplicate question_id 'a' \\(first on line 1\\)"):
        read_questions(_write(tmp_path / "q3.jsonl", [q, q]))
    with pytest.raises(EvalFileError, match="unknown category 'long'"):
        read_questions(_write(tmp_path / "q4.jsonl", [dict(q, category="long")]))
    with pytest.raises(EvalFileError, match="q5.jsonl:1: not valid JSON"):
        read_questions(_write(tmp_path / "q5.jsonl", ["{oops"]))
    with pytest.raises(EvalFileError, match="not found"):
        read_questions(str(tmp_path / "nope.jsonl"))
    with pytest.raises(EvalFileError, match="empty question file"):
        read_questions(_write(tmp_path / "q6.jsonl", [""]))
    with pytest.raises(EvalFileError, match=r"lacks key\(s\) \['category'\]"):
        read_answers(_write(tmp_path / "a2.jsonl", [{"question_id": "a", "answer": "two"}]))
    with pytest.raises(EvalFileError, match="duplicate question_id"):
        read_predictions(_write(tmp_path / "p.jsonl", [{"question_id": 1, "text": "x"},
                                                       {"question_id": "1", "text": "y"}]))
    # Answers for unknown ids, questions without answers, disagreeing categories.
    extra = read_answers(_write(tmp_path / "a3.jsonl", [a, dict(a, question_id="zz")]))
    with pytest.raises(EvalFileError, match=r"answer\(s\) for question ids not in .*\['zz'\]"):
        attach_categories(read_questions(good_q), extra)
    q2 = read_questions(_write(tmp_path / "q7.jsonl", [q, dict(q, question_id="b")]))
    with pytest.raises(EvalFileError, match="no reference answer for question_id 'b'"):
        attach_categories(q2, read_answers(good_a))
    with pytest.raises(EvalFileError, match="category 'short' in .* but 'description'"):
        attach_categories(read_questions(good_q), read_answers(_write(tmp_path / "a4.jsonl",
                                                                      [dict(a, category="description")])))


# ----------------------------------------------------------------------------------------------
# Methods and the end-to-end run


def _numpy_init(make, seed):
    """Build an NNX module abstractly and fill it with numpy random weights: a fraction of a second,
    where eager random init dispatches (and compiles) one small op per parameter."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = "/".join(str(p) for p in path).lower()
        z = rng.standard_normal(x.shape)
        if "norm" in name or "scale" in name:
            a = 1.0 + 0.1 * z
        elif "bias" in name or "/['b" in name:
            a = 0.1 * z
        elif "embed" in name:
            a = z
        else:  # [.., in, out] weights; x2 so that the random answers vary
            a = 2.0 * z / np.sqrt(x.shape[-2])
        return jnp.asarray(a.astype(x.dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _tiny_model(tok, seed=0):
    from flax import nnx

    from twig_jax.model.config import LlavaConfig, TextConfig, VisionConfig
    from twig_jax.model.llava import Llava

    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8),
        text=TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return _numpy_init(lambda: Llava(cfg, rngs=nnx.Rngs(seed)), seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny shapes eval split (2 images: 4 short questions + 2 descriptions), a tiny random LLaVA
    with the shapes tokenizer saved as a converted dir, and a random twig (K=1, T=1, Kf=3)."""
    from flax import nnx

    from twig_jax.data.shapes import build_tokenizer, generate_dataset
    from twig_jax.convert.llava import save_converted_model
    from twig_jax.twig.module import Twig
    from twig_jax.twig.config import TwigConfig
    from twig_jax.twig.io import save_twig

    root = tmp_path_factory.mktemp("eval_world")
    generate_dataset(str(root / "data"), 0, 2, seed=3)
    tok = build_tokenizer()
    model = _tiny_model(tok)
    model_dir = save_converted_model(model, str(root / "model"), tok)
    twig = _numpy_init(lambda: Twig(model.cfg.text, TwigConfig(K=1, T=1, Kf=3, R=4), rngs=nnx.Rngs(1)), 1)
    twig_dir = save_twig(twig, str(root / "twig"))
    return dict(root=root, model=model, tok=tok, twig=twig, model_dir=model_dir, twig_dir=twig_dir,
                questions=str(root / "data" / "eval" / "questions.jsonl"),
                answers=str(root / "data" / "eval" / "answers.jsonl"), images=str(root / "data" / "images"))


def test_resolve_twig_config(world):
    from twig_jax.twig.config import TwigConfigError

    model, twig = world["model"], world["twig"]
    assert resolve_twig_config(model, None, EvalConfig(method="none")) is None
    with pytest.raises(TwigConfigError, match="needs R"):
        resolve_twig_config(model, None, EvalConfig(method="fastv"))
    with pytest.raises(TwigConfigError, match="needs a twig"):
        resolve_twig_config(model, None, EvalConfig(method="twig", R=4))
    with pytest.raises(TwigConfigError, match="SSD needs a twig"):
        resolve_twig_config(model, None, EvalConfig(method="none", ssd=True))
    tc = resolve_twig_config(model, None, EvalConfig(method="random", R=5))
    assert (tc.K, tc.Kf, tc.R) == (2, 3, 5)
    # With a twig, baselines prune at the twig's layers; R overrides the twig's own.
    tc = resolve_twig_config(model, twig, EvalConfig(method="fastv", R=8))
    assert (tc.K, tc.Kf, tc.R, tc.R_bar) == (1, 3, 8, None)
    assert resolve_twig_config(model, twig, EvalConfig(method="twig")).R == 4
    with pytest.raises(TwigConfigError, match="differs from the twig's K=1"):
        resolve_twig_config(model, twig, EvalConfig(method="twig", K=2))
    # score_rows: the twig's unless given (the paper's all-text-rows equation or the last row).
    assert resolve_twig_config(model, twig, EvalConfig(method="twig")).score_rows == twig.twig_cfg.score_rows
    assert resolve_twig_config(model, twig, EvalConfig(method="twig", score_rows="text")).score_rows == "text"
    assert resolve_twig_config(model, None, EvalConfig(method="fastv", R=4, score_rows="text")).score_rows == "text"
    with pytest.raises(TwigConfigError, match="score_rows='all'"):
        resolve_twig_config(model, twig, EvalConfig(method="twig", score_rows="all"))
    # select: a twig's keep-set rule reaches its own scores; baselines keep their published top R
    # unless a rule is asked for.
    old = twig.twig_cfg
    twig.twig_cfg = dataclasses.replace(old, select="cover")
    try:
        assert resolve_twig_config(model, twig, EvalConfig(method="twig")).select == "cover"
        assert resolve_twig_config(model, twig, EvalConfig(method="fastv")).select == "top"
        assert resolve_twig_config(model, twig, EvalConfig(method="random")).select == "top"
        assert resolve_twig_config(model, twig, EvalConfig(method="fastv", select="cover")).select == "cover"
        assert resolve_twig_config(model, twig, EvalConfig(method="twig", select="top")).select == "top"
    finally:
        twig.twig_cfg = old


def _check_run(world, out, metrics_json, method, R, ssd):
    qs = read_questions(world["questions"])
    recs = [json.loads(line) for line in open(out)]
    assert [r["question_id"] for r in recs] == [q.question_id for q in qs]  # one answer per question, in order
    assert [r["prompt"] for r in recs] == [q.text for q in qs]
    assert all(isinstance(r["text"], str) and r["answer_id"] and r["model_id"] == "model" for r in recs)
    for r in recs:
        md = r["metadata"]
        assert (md["method"], md["R"], md["ssd"]) == (method, R, ssd)
        assert md["category"] in ("short", "description") and md["num_tokens"] >= 1
    shown = json.load(open(metrics_json))
    again = score_files(str(out), world["answers"], require_all=True)
    assert shown["questions"] == again["questions"] == 6
    assert shown["short"] == again["short"] and shown["short"]["n"] == 4
    for k in ("n", "tp", "pred_objects", "ref_objects"):
        assert shown["description"][k] == again["description"][k]
    for k in ("precision", "recall", "f1", "mean_f1"):
        a, b = shown["description"][k], again["description"][k]
        assert (a is None and math.isnan(b)) or a == pytest.approx(b)
    assert shown["generated_tokens"] == sum(r["metadata"]["num_tokens"] for r in recs)
    return recs, shown


def test_cli_eval_end_to_end(world, tmp_path, capsys):
    from twig_jax.cli.main import main

    common = ["eval", "--questions", world["questions"], "--images", world["images"], "--answers", world["answers"],
              "--model", world["model_dir"], "--batch", "4", "--max-new-short", "4", "--max-new-description", "8"]
    out, mj = tmp_path / "preds.jsonl", tmp_path / "m.json"
    assert main(common + ["--out", str(out), "--metrics-json", str(mj)]) == 0
    recs, shown = _check_run(world, out, mj, "none", 16, False)
    assert "short: exact match" in capsys.readouterr().out

    # TTP + SSD with the twig: same bookkeeping, SSD statistics per answer.
    out2, mj2 = tmp_path / "preds2.jsonl", tmp_path / "m2.json"
    assert main(common + ["--twig", world["twig_dir"], "--method", "twig", "--ssd", "--out", str(out2),
                          "--metrics-json", str(mj2)]) == 0
    recs2, _ = _check_run(world, out2, mj2, "twig", 4, True)
    assert all(r["metadata"]["kept_visual_tokens"] == 4 and "rounds" in r["metadata"] for r in recs2)

    # Scoring a file: the references themselves score 1; one wrong short answer costs 1/4 EM.
    refs = [json.loads(line) for line in open(world["answers"])]
    perfect = _write(tmp_path / "perfect.jsonl", [{"question_id": r["question_id"], "text": r["answer"]} for r in refs])
    assert main(common + ["--predictions", perfect, "--metrics-json", str(mj)]) == 0
    m = json.load(open(mj))
    assert m["short"]["em"] == 1.0 and m["description"]["f1"] == 1.0
    first_short = next(i for i, r in enumerate(refs) if r["category"] == "short")
    refs[first_short]["answer"] = "not the answer"
    worse = _write(tmp_path / "worse.jsonl", [{"question_id": r["question_id"], "text": r["answer"]} for r in refs])
    assert main(common + ["--predictions", worse, "--metrics-json", str(mj)]) == 0
    assert json.load(open(mj))["short"]["em"] == pytest.approx(3 / 4)

    # Bad usage is a clean argparse error.
    with pytest.raises(SystemExit):
        main(common + ["--method", "twig"])  # no twig
    assert "needs a twig" in capsys.readouterr().err


def test_ckpt_eval_scores_and_exports_a_training_checkpoint(world, tmp_path):
    """research.ckpt_eval restores a run's checkpoint (not the base it started from), exports it as a
    model dir, and scores it exactly as run_eval scores that exported dir; its per-kind counts add
    up to the short-answer totals."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from research import ckpt_eval
    from twig_jax.convert.llava import load_model
    from twig_jax.eval.evaluate import EvalConfig, attach_categories, read_answers, read_questions, run_eval
    from twig_jax.pipeline import image_preprocessor_for
    from twig_jax.train.trainer import Checkpointer, TrainConfig, Trainer

    trainer = Trainer(world["model"], TrainConfig(steps=1, batch_size=1, train_all=True, freeze=("vision",)))
    moved = jax.tree.map(lambda a: a + 0.05 * jnp.sign(jnp.sin(jnp.arange(a.size, dtype=jnp.float32))).reshape(a.shape)
                         if jnp.issubdtype(a.dtype, jnp.floating) else a, trainer.state["params"])
    state = dict(trainer.state, params=moved)
    ck_dir = str(tmp_path / "ck")
    ck = Checkpointer(ck_dir, 1, 3)
    ck.save(7, state, None, {}, force=True)
    ck.close()  # the save is asynchronous: finish it before another process-level reader looks
    data = str(world["root"] / "data")
    out_json, export = tmp_path / "res.json", tmp_path / "export"
    assert ckpt_eval.main(["--base", world["model_dir"], "--ckpt-dir", ck_dir, "--steps", "7", "--data", data,
                           "--short", "3", "--descriptions", "1", "--export-dir", str(export),
                           "--out-json", str(out_json)]) == 0
    exported = load_model(str(export / "step_7"), dtype=jnp.float32)
    got = nnx.state(exported.text)
    want = nnx.state(trainer.model.modules(moved, trainer.frozen)[0].text)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    assert not np.array_equal(np.asarray(exported.text.embed[...]), np.asarray(world["model"].text.embed[...]))

    assert ckpt_eval.main(["--base", world["model_dir"], "--ckpt-dir", ck_dir, "--steps", "7,8", "--data", data,
                           "--no-score"]) == 2  # step 8 was never saved: a clear error, not orbax's trace
    res = json.loads(out_json.read_text())["7"]
    answers = read_answers(world["answers"])
    qs = ckpt_eval.select_questions(attach_categories(read_questions(world["questions"]), answers), 3, 1)
    assert [q.category for q in qs].count("short") == 3 and [q.category for q in qs].count("description") == 1
    _, m = run_eval(exported, world["tok"], qs, EvalConfig(batch_size=50), images_dir=world["images"],
                    image_processor=image_preprocessor_for(exported, str(export / "step_7")),
                    answers={q.key: answers[q.key] for q in qs})
    assert res["short_em"] == m["short"]["em"] and res["short_n"] == 3
    assert res["description_f1"] == pytest.approx(m["description"]["f1"], nan_ok=True)
    assert sum(c for c, _ in res["kinds"].values()) == m["short"]["correct"]
    assert sum(n for _, n in res["kinds"].values()) == 3


# ----------------------------------------------------------------------------------------------
# Any LLaVA question file: categories the project cannot score are answered, not scored


def _run(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stderr, stdout) of `twig-jax *argv` run in-process."""
    from twig_jax.cli.main import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.strip()]
    return line


def test_object_f1_only_for_shapes_descriptions():
    refs = {"d": Reference("d", "a brown dog sleeps on a sofa .", "description"),
            "s": Reference("s", "two", "short"),
            "c": Reference("c", "The man is ironing clothes.", "conv"),
            "x": Reference("x", "A taxi.", None)}
    m = score({"d": "a cat sits on a mat .", "s": "2", "c": "he irons", "x": "a cab"}, refs)
    assert m["questions"] == 4
    assert m["short"] == {"n": 1, "correct": 1, "em": 1.0}
    assert m["description"]["n"] == 0 and math.isnan(m["description"]["f1"])  # not shapes-world text
    assert m["unscored"] == {"description": 1, "conv": 1, "uncategorized": 1}
    shapes = score({"d": REF3}, {"d": Reference("d", REF3, "description")})
    assert shapes["description"]["f1"] == 1.0 and shapes["unscored"] == {}


def test_any_category_and_encoding_errors(tmp_path):
    rows = [{"question_id": 1, "image": "a.png", "text": "What is odd here?", "category": "complex"},
            {"question_id": 2, "image": "a.png", "text": "Describe it.", "category": "detail"},
            {"question_id": 3, "image": "a.png", "text": "What colour?"}]
    path = _write(tmp_path / "bench.jsonl", rows)
    qs = read_questions(path, known_categories=None)
    assert [q.category for q in qs] == ["complex", "detail", None] and [q.line for q in qs] == [1, 2, 3]
    with pytest.raises(EvalFileError, match="unknown category 'complex'"):
        read_questions(path)  # the shapes-world categories by default
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(rows[0]).encode() + b"\n" + b'{"question_id": 2, "image": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(EvalFileError, match=r"latin1.jsonl:2: not UTF-8"):
        read_questions(str(bad), known_categories=None)
    answers = _write(tmp_path / "a.jsonl", [{"question_id": 1, "answer": "x", "category": "complex"},
                                             {"question_id": 2, "answer": "y"}, {"question_id": 3, "answer": "z"}])
    refs = read_answers(answers, known_categories=None)
    assert [refs[k].category for k in ("1", "2", "3")] == ["complex", None, None]
    attached = attach_categories(qs, refs)
    assert [q.category for q in attached] == ["complex", "detail", None]


def _bench_questions(world, path, image=None):
    names = sorted(os.listdir(world["images"]))
    rows = [{"question_id": "c1", "image": names[0], "text": "what is in the image ?", "category": "conv"},
            {"question_id": "d1", "image": names[1], "text": "describe the image .", "category": "detail"},
            {"question_id": "x1", "image": image or names[0], "text": "is there a red circle ?", "category": "complex"},
            {"question_id": "n1", "image": names[1], "text": "how many objects are there ?"}]
    return _write(path, rows)


def test_cli_eval_answers_any_question_file_without_answers(world, tmp_path, capsys):
    qfile = _bench_questions(world, tmp_path / "bench.jsonl")
    out, mj = tmp_path / "answers.jsonl", tmp_path / "m.json"
    code, err, printed = _run(["eval", "--questions", qfile, "--images", world["images"], "--model",
                               world["model_dir"], "--max-new-other", "6", "--out", str(out),
                               "--metrics-json", str(mj)], capsys)
    assert code == 0, err
    assert "not scored" in printed
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in recs] == ["c1", "d1", "x1", "n1"]
    assert all(isinstance(r["text"], str) and 1 <= r["metadata"]["num_tokens"] <= 6 for r in recs)
    assert [r["metadata"]["category"] for r in recs] == ["conv", "detail", "complex", None]
    m = json.load(open(mj))
    assert m["questions"] == 4 and m["categories"] == {"conv": 1, "detail": 1, "complex": 1, "uncategorized": 1}
    assert "short" not in m and "description" not in m
    assert "eval: 4/4 questions (100%)" in err

    # with references in categories it cannot score: answered, reported as not scored
    answers = _write(tmp_path / "refs.jsonl", [{"question_id": q, "answer": "x", "category": c} for q, c in
                                                (("c1", "conv"), ("d1", "detail"), ("x1", "complex"),
                                                 ("n1", "short"))])
    code, err, printed = _run(["eval", "--questions", qfile, "--images", world["images"], "--model",
                               world["model_dir"], "--answers", answers, "--max-new-other", "6",
                               "--metrics-json", str(mj)], capsys)
    assert code == 0, err
    m = json.load(open(mj))
    assert m["short"]["n"] == 1 and m["unscored"] == {"conv": 1, "detail": 1, "complex": 1}


def test_cli_eval_input_errors_are_one_line_before_loading(world, tmp_path, capsys):
    qfile = _bench_questions(world, tmp_path / "bench.jsonl", image="gone.png")
    base = ["eval", "--questions", qfile, "--images", world["images"]]
    code, err, printed = _run(base + ["--out", str(tmp_path / "a.jsonl")], capsys)  # no --model
    assert code == 2 and "--model" in _one_line(err)
    code, err, printed = _run(base + ["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "a.jsonl")],
                              capsys)
    assert code == 2
    line = _one_line(err)
    assert f"{qfile}:3" in line and "x1" in line and "gone.png" in line and "no-model" not in line
    code, err, printed = _run(base + ["--model", world["model_dir"]], capsys)  # nothing would be kept
    assert code == 2 and "--out" in _one_line(err)
    existing = tmp_path / "old.jsonl"
    existing.write_text("keep me\n")
    code, err, printed = _run(["eval", "--questions", world["questions"], "--images", world["images"], "--answers",
                      world["answers"], "--model", world["model_dir"], "--out", str(existing)], capsys)
    assert code == 2 and "--force" in _one_line(err) and existing.read_text() == "keep me\n"
    code, err, printed = _run(["eval", "--questions", world["questions"], "--images", world["images"], "--answers",
                      world["answers"], "--model", world["model_dir"], "--twig", world["twig_dir"]], capsys)
    assert code == 2 and "--twig" in _one_line(err)  # method none without SSD would not use it
