"""The shapes world: deterministic, answers consistent with the scene, parser and tokenizer exact."""

import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

from twig_jax.data import shapes
from twig_jax.data.shapes import (COLOURS, NUMBERS, PLURALS, POSITIONS, RGB, SHAPES, ShapeObject, build_tokenizer,
                                  describe, generate_dataset, parse_description)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    generate_dataset(out, 40, 10, seed=3)
    return out


def _records(out):
    with open(os.path.join(out, "train.json")) as f:
        return json.load(f)


def test_deterministic_per_seed(world, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    generate_dataset(again, 40, 10, seed=3)
    generate_dataset(other, 40, 10, seed=4)
    for rel in ("train.json", "eval/questions.jsonl", "eval/answers.jsonl", "images/train_000007.png",
                "images/eval_000003.png"):
        assert filecmp.cmp(os.path.join(world, rel), os.path.join(again, rel), shallow=False), rel
    assert not filecmp.cmp(os.path.join(world, "train.json"), os.path.join(other, "train.json"), shallow=False)


def _answer_from_scene(question: str, objs: list[tuple]) -> str | None:
    """Recompute a short answer from the scene's (size, colour, shape, position) tuples."""
    q = question.replace(" ?", "").split()
    def find(colour, shape):
        hits = [o for o in objs if o[1] == colour and o[2] == shape]
        assert len(hits) == 1, (question, objs)
        return hits[0]
    if question == "how many objects are there ?":
        return NUMBERS[len(objs)]
    if q[:2] == ["how", "many"] and q[2] in COLOURS:
        return NUMBERS[sum(o[1] == q[2] for o in objs)]
    if q[:2] == ["how", "many"]:
        shape = {v: k for k, v in PLURALS.items()}[q[2]]
        return NUMBERS[sum(o[2] == shape for o in objs)]
    if q[:3] == ["is", "there", "a"]:
        return "yes" if any(o[1] == q[3] and o[2] == q[4] for o in objs) else "no"
    if q[:3] == ["what", "colour", "is"]:
        hits = [o for o in objs if o[2] == q[-1] and (len(q) == 5 or o[0] == q[4])]
        assert len(hits) == 1, question
        return hits[0][1]
    if q[:3] == ["what", "shape", "is"]:
        hits = [o for o in objs if o[1] == q[4]]
        assert len(hits) == 1, question
        return hits[0][2]
    if q[:2] == ["where", "is"]:
        return find(q[3], q[4])[3]
    if q[:3] == ["what", "size", "is"]:
        return find(q[4], q[5])[0]
    if q[0] == "is" and q[4] in ("left", "above"):
        a, b = find(q[2], q[3]), find(q[-2], q[-1])
        ra, ca = divmod(POSITIONS.index(a[3]), 3)
        rb, cb = divmod(POSITIONS.index(b[3]), 3)
        return "yes" if (ca < cb if q[4] == "left" else ra < rb) else "no"
    raise AssertionError(f"unknown question form {question!r}")


def test_answers_consistent_with_scene(world):
    kinds = set()
    for r in _records(world):
        objs = [tuple(o) for o in r["objects"]]
        conv = r["conversations"]
        assert conv[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in conv) == 1
        # The description comes last (earlier, its text would answer the short questions), and
        # alone in every third record.
        assert conv[-2]["value"].replace("<image>\n", "") == shapes.DESCRIBE
        assert all(t["value"] != shapes.DESCRIBE for t in conv[:-2])
        assert (len(conv) == 2) == (int(r["id"].split("_")[1]) % 3 == 0), r["id"]
        for q, a in zip(conv[0::2], conv[1::2]):
            question = q["value"].replace("<image>\n", "")
            if question == shapes.DESCRIBE:
                assert sorted(parse_description(a["value"])) == sorted(objs)
                n = len(objs)
                assert a["value"].startswith("there is one object" if n == 1 else f"there are {NUMBERS[n]} objects")
            else:
                assert a["value"] == _answer_from_scene(question, objs), question
                kinds.add(question.split()[0] + question.split()[1])
    assert len(kinds) >= 5  # many question forms occur


def test_eval_split_format(world):
    with open(os.path.join(world, "eval", "questions.jsonl")) as f:
        qs = [json.loads(line) for line in f]
    with open(os.path.join(world, "eval", "answers.jsonl")) as f:
        ans = {a["question_id"]: a for a in map(json.loads, f)}
    assert len(qs) == 30 and set(ans) == {q["question_id"] for q in qs}
    for q in qs:
        assert set(q) == {"question_id", "image", "text", "category"} and "answer" not in q
        a = ans[q["question_id"]]
        objs = [tuple(o) for o in a["objects"]]
        if q["category"] == "description":
            assert sorted(parse_description(a["answer"])) == sorted(objs)
        else:
            assert a["answer"] == _answer_from_scene(q["text"], objs)
        assert os.path.isfile(os.path.join(world, "images", q["image"]))


def test_pictures_show_the_objects(world):
    """Each object's colour dominates the centre of its grid cell; other cells hold no object colour."""
    for r in _records(world)[:15]:
        img = np.asarray(Image.open(os.path.join(world, "images", r["image"])).convert("RGB"), np.float32)
        assert img.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
        cell = shapes.IMAGE_SIZE // 3
        by_cell = {POSITIONS.index(o[3]): o for o in r["objects"]}
        for c in range(9):
            row, col = divmod(c, 3)
            patch = img[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell].reshape(-1, 3)
            dists = {name: np.linalg.norm(patch - np.asarray(rgb), axis=1) for name, rgb in RGB.items()}
            near = {name: int((d < 45).sum()) for name, d in dists.items()}
            if c in by_cell:
                assert max(near, key=near.get) == by_cell[c][1] and near[by_cell[c][1]] > 30
            else:
                assert max(near.values()) < 10


def test_parse_description_round_trip_and_robustness():
    objs = [ShapeObject("cross", "orange", "large", 0), ShapeObject("circle", "blue", "small", 1),
            ShapeObject("square", "blue", "small", 8)]
    text = describe(objs)
    assert sorted(parse_description(text)) == sorted(o.key() for o in objs)
    assert parse_description(text.replace(" .", ".").upper()) == parse_description(text)
    # "top" alone must not swallow "top left"; a garbled sentence is dropped, the rest kept.
    assert parse_description("a small red circle is at the top of the image .") == [("small", "red", "circle", "top")]
    garbled = text.replace("a small blue circle is at the top of the image", "a small blue is at")
    assert sorted(parse_description(garbled)) == sorted([objs[0].key(), objs[2].key()])


def test_tokenizer_covers_the_data(world):
    tok = build_tokenizer()
    unk = tok.unk_token_id
    for r in _records(world):
        for t in r["conversations"]:
            ids = tok(t["value"])["input_ids"]
            assert unk not in ids, t["value"]
    text = describe([ShapeObject("triangle", "yellow", "large", 4)])
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids("<image>") == len(tok) - 1
    saved = os.path.join(world, "tokenizer")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(saved, local_files_only=True)
    assert again("is there a red cross ?")["input_ids"] == tok("is there a red cross ?")["input_ids"]


def test_cli_writes_dataset(tmp_path, capsys):
    from twig_jax.cli.main import main

    assert main(["data", "shapes", "--out", str(tmp_path), "--n", "3", "--n-eval", "2", "--seed", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_images"] == 3 and summary["eval_questions"] == 6
    assert len(_records(str(tmp_path))) == 3
    assert {len(SHAPES), len(COLOURS)} == {4, 6}


def _pairs(record):
    conv = record["conversations"]
    assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in conv[1:])
    return [(q["value"].replace("<image>\n", ""), a["value"]) for q, a in zip(conv[0::2], conv[1::2])]


def test_description_turn_random_is_the_same_scenes_reordered(world, tmp_path):
    """--description-turn random (the first training stage's format) draws the same images and
    questions from the seed; only the turn order and the description-only records differ."""
    other = str(tmp_path / "random")
    generate_dataset(other, 40, 10, seed=3, description_turn="random", describe_only_every=0)
    moved = 0
    for last, rand in zip(_records(world), _records(other)):
        assert last["image"] == rand["image"] and last["objects"] == rand["objects"]
        p_last, p_rand = _pairs(last), _pairs(rand)
        if len(p_last) == 1:  # description-only record: the random one holds it and the short questions
            assert p_last[0] in p_rand and len(p_rand) > 1
        else:
            assert sorted(p_last) == sorted(p_rand)
        moved += p_rand[-1][0] != shapes.DESCRIBE
        with open(os.path.join(world, "images", last["image"]), "rb") as f1, \
                open(os.path.join(other, "images", rand["image"]), "rb") as f2:
            assert f1.read() == f2.read()
    assert moved > 10  # the random order really puts descriptions before short questions
    with pytest.raises(ValueError, match="description_turn"):
        generate_dataset(str(tmp_path / "bad"), 1, 0, description_turn="first")


def test_description_turn_alone_splits_records(tmp_path):
    """--description-turn alone: every N-th record is the scene's description alone, every other
    record holds that scene's short questions (in the shuffled order) and no description; same
    scenes and images as the other formats."""
    rand, alone = str(tmp_path / "random"), str(tmp_path / "alone")
    generate_dataset(rand, 24, 0, seed=5, description_turn="random", describe_only_every=0)
    generate_dataset(alone, 24, 0, seed=5, description_turn="alone", describe_only_every=4)
    n_desc = 0
    for i, (r, a) in enumerate(zip(_records(rand), _records(alone))):
        assert r["image"] == a["image"] and r["objects"] == a["objects"]
        with open(os.path.join(rand, "images", r["image"]), "rb") as f1, \
                open(os.path.join(alone, "images", a["image"]), "rb") as f2:
            assert f1.read() == f2.read()
        want = [p for p in _pairs(r) if (p[0] == shapes.DESCRIBE) == (i % 4 == 0)]
        assert _pairs(a) == want and want
        if i % 4 == 0:
            objects = [ShapeObject(sh, c, sz, shapes.POSITIONS.index(pos)) for sz, c, sh, pos in a["objects"]]
            assert want == [(shapes.DESCRIBE, describe(objects))]
            n_desc += 1
    assert n_desc == 6
    with pytest.raises(ValueError, match="describe_only_every"):
        generate_dataset(str(tmp_path / "bad"), 1, 0, description_turn="alone", describe_only_every=0)


def test_find_turns_follow_the_short_questions_and_name_one_object(tmp_path):
    """--find-turns N: the same records with N "describe the K ." turns appended after the short
    questions (never in a description-only record); each answer is the key, then the attributes of
    the one scene object the key names, recomputed here from the record's objects."""
    alone, find = str(tmp_path / "alone"), str(tmp_path / "find")
    generate_dataset(alone, 24, 6, seed=5, description_turn="alone", describe_only_every=3)
    generate_dataset(find, 24, 6, seed=5, description_turn="alone", describe_only_every=3, find_turns=3)
    for rel in ("eval/questions.jsonl", "eval/answers.jsonl"):
        assert filecmp.cmp(os.path.join(alone, rel), os.path.join(find, rel), shallow=False), rel
    n_find = 0
    for i, (a, f) in enumerate(zip(_records(alone), _records(find))):
        assert a["image"] == f["image"] and a["objects"] == f["objects"]
        p_a, p_f = _pairs(a), _pairs(f)
        if i % 3 == 0:
            assert p_f == p_a and p_a[0][0] == shapes.DESCRIBE
            continue
        assert p_f[:len(p_a)] == p_a
        finds = p_f[len(p_a):]
        assert 1 <= len(finds) <= 3 and len(set(finds)) == len(finds)
        for q, ans in finds:
            words = q.split()
            assert words[:2] == ["describe", "the"] and words[-1] == "."
            key = words[2:-1]
            if key[-1] == "object":  # colour key
                hits = [o for o in f["objects"] if o[1] == key[0]]
            elif len(key) == 1:  # shape key
                hits = [o for o in f["objects"] if o[2] == key[0]]
            elif key[0] in shapes.SIZES:
                hits = [o for o in f["objects"] if o[0] == key[0] and o[2] == key[1]]
            else:
                hits = [o for o in f["objects"] if o[1] == key[0] and o[2] == key[1]]
            assert len(hits) == 1, (q, f["objects"])
            size, colour, shape, pos = hits[0]
            assert ans == " ".join(key + [size, colour, shape, pos, "."])
            n_find += 1
    assert n_find >= 30
    assert build_tokenizer().unk_token_id not in build_tokenizer()(
        " ".join(q + " " + a for r in _records(find) for q, a in _pairs(r)))["input_ids"]
    with pytest.raises(ValueError, match="find_turns"):
        generate_dataset(str(tmp_path / "bad"), 1, 0, find_turns=-1)


def test_from_key_inverts_key():
    rng = np.random.default_rng(7)
    for _ in range(20):
        for o in shapes.sample_scene(rng):
            assert ShapeObject.from_key(o.key()) == o
