"""research/text_control.py: the text-only layouts keep every short question and answer of a scene, the
eval prompts match the training format, and its batched first-token predictions equal one
unpadded forward pass per prompt."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from research import text_control as tc
from twig_jax.data.shapes import DESCRIBE, build_tokenizer, describe, generate_dataset
from twig_jax.data.preprocess import IMAGE_PLACEHOLDER, build_prompt


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("text_world"))
    generate_dataset(out, 12, 4, seed=2)
    with open(os.path.join(out, "train.json")) as f:
        return out, json.load(f)


@pytest.fixture(scope="module")
def random_model():
    from flax import nnx

    from twig_jax.model.config import load_preset
    from twig_jax.model.llava import Llava

    return Llava(load_preset("shapes-llava"), rngs=nnx.Rngs(0))


def _source_turns(rec):
    conv = rec["conversations"]
    return [(conv[i]["value"].replace(IMAGE_PLACEHOLDER + "\n", ""), conv[i + 1]["value"])
            for i in range(0, len(conv), 2) if DESCRIBE not in conv[i]["value"]]


def test_scene_first_keeps_every_short_turn_in_order(world):
    _, recs = world
    out = tc.text_records(recs, "scene-first")
    with_short = [r for r in recs if _source_turns(r)]
    assert len(out) == len(with_short) > 0
    for src, rec in zip(with_short, out):
        conv = rec["conversations"]
        turns = [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv), 2)]
        want = _source_turns(src)
        scene = describe(tc._objects(src))
        assert turns[0] == (f"{scene}\n{want[0][0]}", want[0][1])
        assert turns[1:] == want[1:]
        text = json.dumps(rec)
        assert IMAGE_PLACEHOLDER not in text and DESCRIBE not in text


def test_question_first_is_one_record_per_question(world):
    _, recs = world
    out = tc.text_records(recs, "question-first", seed=1)
    want = {(f"{q}\n{describe(tc._objects(r))}", a) for r in recs for q, a in _source_turns(r)}
    got = {(r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in out}
    assert len(out) == sum(len(_source_turns(r)) for r in recs) and got == want


def test_lm_layout_puts_everything_in_the_answer(world):
    _, recs = world
    out = tc.text_records(recs, "lm")
    src = next(r for r in recs if _source_turns(r))
    rec = next(r for r in out if r["id"] == src["id"])
    assert rec["conversations"][0]["value"] == tc.LM_TURN
    text = rec["conversations"][1]["value"]
    assert text.startswith(describe(tc._objects(src)))
    assert text.endswith(" ".join(f"{q} {a}" for q, a in _source_turns(src)))


def test_bad_input_is_named(world):
    _, recs = world
    with pytest.raises(ValueError, match="unknown layout"):
        tc.text_records(recs, "image-last")
    with pytest.raises(ValueError, match="no 'objects'"):
        tc.text_records([{"id": "x", "conversations": []}], "lm")


def test_eval_items_match_the_training_prompt(world):
    out, _ = world
    tok = build_tokenizer()
    items = tc.eval_items(out, tok, "question-first", n=5)
    answers = [json.loads(line) for line in open(os.path.join(out, "eval", "answers.jsonl"))]
    questions = {json.loads(line)["question_id"]: json.loads(line)["text"]
                 for line in open(os.path.join(out, "eval", "questions.jsonl"))}
    short = [a for a in answers if a["category"] == "short"][:5]
    assert len(items) == 5
    for (ids, first, kind), a in zip(items, short):
        q = questions[a["question_id"]].replace(IMAGE_PLACEHOLDER + "\n", "")
        assert ids == tok.encode(build_prompt(f"{q}\n{describe(tc._objects(a))}", with_image=False))
        assert tok.decode([first]) == a["answer"].split()[0] and kind == a["kind"]
        assert tok.unk_token_id not in ids[-20:]  # the scene and question are in the vocabulary


def test_batched_first_tokens_equal_unpadded_forwards(world, random_model):
    import jax.numpy as jnp

    out, _ = world
    items = tc.eval_items(out, build_tokenizer(), "scene-first", n=4)
    prompts = [it[0] for it in items]
    assert len({len(p) for p in prompts}) > 1  # padding is exercised
    pred = tc.first_token_predictions(random_model, prompts)
    for p, got in zip(prompts, pred):
        logits = np.asarray(random_model(jnp.asarray([p]))[0, -1])
        assert got == int(np.argmax(logits))
    res = tc.score(pred, items)
    assert res["all"][1] == 4 and sum(v[1] for k, v in res.items() if k != "all") == 4


def test_mimetic_init_ties_keys_to_queries():
    from flax import nnx

    from twig_jax.model.config import load_preset
    from twig_jax.model.llava import Llava

    model = Llava(load_preset("shapes-llava"), rngs=nnx.Rngs(1))
    wq0 = np.asarray(model.text.layers.wq[...])
    wk0 = np.asarray(model.text.layers.wk[...])
    tc.mimetic_init(model, scale=2.0, noise=0.3)
    wq, wk = np.asarray(model.text.layers.wq[...]), np.asarray(model.text.layers.wk[...])
    np.testing.assert_allclose(wq, 2.0 * wq0, rtol=1e-6)
    assert np.corrcoef(wq.ravel(), wk.ravel())[0, 1] > 0.9
    assert abs(np.corrcoef(wq0.ravel(), wk0.ravel())[0, 1]) < 0.05  # independent before
