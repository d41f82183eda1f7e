"""The training-only attention target (research/attention_target.py): which cells a question is
about, the batch fields the data pipeline builds, the loss against the inference layer runner's
attention, that training with it moves the supervised heads onto the target, and the
research.train_attention entry point."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.attention_target import (
    ShapesAttentionLoss, ShapesAttentionTargets, answer_rows, attention_mass_loss, cells_patch_mask, key_mass_loss,
    shapes_attention, supervision_fields,
)
from twig_jax.model.config import load_preset
from twig_jax.data.shapes import (COLOURS, NUMBERS, POSITIONS, RELATION_WORDS, SHAPES, ShapeObject,
                                  generate_dataset, key_words, question_cells, relation_cells, sample_scene,
                                  short_questions)
from twig_jax.model.llava import Llava
from twig_jax.train.trainer import OptimConfig, TrainConfig, Trainer, base_forward, base_forward_with_probs


def test_question_cells_name_the_objects_that_answer():
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(300):
        objs = sample_scene(rng)
        by_cell = {o.cell: o for o in objs}
        for kind, q, a in short_questions(objs, rng):
            cells = question_cells(q, objs)
            seen.add((kind, cells is None))
            if kind in ("colour_of", "shape_of", "size_of", "position"):
                (c,) = cells
                o = by_cell[c]
                assert a == {"colour_of": o.colour, "shape_of": o.shape, "size_of": o.size,
                             "position": o.position}[kind], q
            elif kind in ("left_of", "above"):
                assert len(cells) == 2 and len(set(cells)) == 2
                subject, reference = relation_cells(q, objs)
                assert sorted((subject, reference)) == cells
                words = q.split()
                cut = next(i for i, w in enumerate(words) if w in RELATION_WORDS)
                # the subject is named before the relation word, the reference after it
                for c, part in ((subject, words[:cut]), (reference, words[cut:])):
                    assert by_cell[c].colour in part and by_cell[c].shape in part, q
                # and the generator's answer is the subject's relation to the reference
                (rs, cs), (rr, cr) = divmod(subject, 3), divmod(reference, 3)
                assert a == ("yes" if (cs < cr if kind == "left_of" else rs < rr) else "no"), q
            elif kind == "exists":
                assert (cells is None) == (a == "no")
            elif kind in ("count_colour", "count_shape"):
                n = NUMBERS.index(a)
                assert (cells is None) if n == 0 else len(cells) == n
            else:
                assert cells is None, (kind, q)
            if kind not in ("left_of", "above"):
                assert relation_cells(q, objs) is None, q
    assert ("colour_of", False) in seen and ("exists", True) in seen and ("count_shape", False) in seen
    objs = [ShapeObject("circle", "red", "small", 0), ShapeObject("circle", "blue", "large", 8)]
    assert question_cells("what colour is the circle ?", objs) is None  # ambiguous: not supervised
    assert question_cells("what colour is the large circle ?", objs) == [8]
    assert question_cells("describe the image .", objs) is None
    assert question_cells("<image>\nwhat shape is the blue object ?", objs) == [8]
    assert len(SHAPES) * len(COLOURS) and POSITIONS[8] == "bottom right"


def test_cells_patch_mask_and_answer_rows():
    m = cells_patch_mask([0, 8], 144).reshape(12, 12)
    assert m[:4, :4].all() and m[8:, 8:].all() and m.sum() == 32
    assert cells_patch_mask([4], 36).reshape(6, 6)[2:4, 2:4].all()
    with pytest.raises(ValueError, match="square patch grid"):
        cells_patch_mask([0], 16)  # 4 x 4 does not split into 3 x 3 cells
    assert answer_rows(np.array([0, 0, 1, 1, 0, 0, 1, 0, 1])) == [1, 5, 7]


@pytest.mark.parametrize("targets", ["shapes", "shapes-roles"])
def test_data_pipeline_rows_point_at_each_answer(tmp_path, targets):
    from twig_jax.data import ConversationEncoder, SampleProcessor
    from twig_jax.data.shapes import build_tokenizer

    out = str(tmp_path / "w")
    generate_dataset(out, 6, 0, seed=1)
    with open(os.path.join(out, "train.json")) as f:
        records = json.load(f)
    tok = build_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    enc = ConversationEncoder(tok, image_id, 144, 400)
    proc = SampleProcessor(enc, lambda path: np.zeros((1, 3, 96, 96), np.float32), os.path.join(out, "images"),
                           (3, 96, 96), extra_fields=ShapesAttentionTargets(roles=targets == "shapes-roles", slots=8))
    supervised = relations = 0
    for i, rec in enumerate(records):
        s = proc((i, rec))
        assert "_bad" not in s, s
        objs = [ShapeObject.from_key(k) for k in rec["objects"]]
        questions = [t["value"] for t in rec["conversations"][0::2]]
        answers = [t["value"] for t in rec["conversations"][1::2]]
        expect = [(q, a) for q, a in zip(questions, answers) if question_cells(q, objs)]
        assert int(s["attn_valid"].sum()) == len(expect)
        assert s["tokens"][s["attn_img_start"]] == image_id and s["tokens"][s["attn_img_start"] - 1] != image_id
        for q, (question, answer) in enumerate(expect):
            row = int(s["attn_rows"][q])
            # the row predicts the answer's first word (the label run starts right after it)
            assert s["label_mask"][row] == 0 and s["label_mask"][row + 1] == 1
            first = tok.convert_ids_to_tokens(int(s["tokens"][row + 1]))
            assert first == answer.split()[0], (question, answer, first)
            words = [w for w in question.replace("<image>", " ").split() if w in key_words()]
            pair = relation_cells(question, objs) if targets == "shapes-roles" else None
            if pair is None:  # one target, both roles
                cells, role_words = (question_cells(question, objs),) * 2, (words, words)
            else:  # the subject and its words, then the reference and its words
                cut = next(i for i, w in enumerate(question.split()) if w in RELATION_WORDS)
                before = [w for w in question.split()[:cut] if w in key_words()]
                cells, role_words = ([pair[0]], [pair[1]]), (before, words[len(before):])
                relations += 1
            for role in range(2):
                np.testing.assert_array_equal(s["attn_target"][q, role], cells_patch_mask(cells[role], 144))
                # the key-word target marks exactly the role's attribute words, in this question
                keys = [tok.convert_ids_to_tokens(int(t)) for t in s["tokens"][s["attn_key_target"][q, role] > 0]]
                assert keys == role_words[role], (question, role)
            assert s["attn_key_target"][q, :, row + 1:].sum() == 0
            supervised += 1
        assert not s["attn_target"][len(expect):].any() and not s["attn_valid"][len(expect):].any()
    assert supervised >= 6 and (relations > 0) == (targets == "shapes-roles")
    bad = proc((0, {k: v for k, v in records[1].items() if k != "objects"}))
    assert bad["_bad"] == "malformed" and "objects" in bad["_detail"]


@pytest.fixture(scope="module")
def tiny():
    return Llava(load_preset("tiny"), rngs=nnx.Rngs(3))


SPLIT = 151  # the relation word's token id in _batch


def _batch(cfg, b=4, s=32, seed=0):
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    tokens = rng.integers(3, 150, (b, s)).astype(np.int32)
    tokens[:, 2:2 + n] = cfg.image_token_index
    mask = np.zeros((b, s), np.int32)
    mask[:, 24:26] = 1
    mask[:, 29:31] = 1
    pix = rng.standard_normal((b, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    eye = np.eye(n, dtype=np.float32)
    tokens[1, 20] = SPLIT  # sample 1's first question is a relation: two roles, split at token 20
    fields = [supervision_fields(tokens[i], mask[i], cfg.image_token_index, n,
                                 [(eye[1], eye[6]) if i == 1 else eye[i % n] + eye[(i + 5) % n],
                                  None if i == 0 else eye[(3 * i) % n]], 3,
                                 key_ids=range(3, 100), split_ids=[SPLIT])
              for i in range(b)]
    batch = {"tokens": tokens, "label_mask": mask, "pixel_values": pix}
    batch.update({k: np.stack([f[k] for f in fields]) for k in fields[0]})
    return batch


def test_loss_matches_the_inference_layer_runner(tiny):
    """base_forward_with_probs = base_forward's logits, and its layer probabilities (in the order
    asked) = the inference runner's (run_layers, return_last_probs); both losses = -log of their
    target mass computed by hand."""
    from twig_jax.model.cache import KVCache
    from twig_jax.model.llama import run_layers

    cfg = tiny.cfg
    batch = _batch(cfg)
    tok, pix = jnp.asarray(batch["tokens"]), jnp.asarray(batch["pixel_values"])
    logits, (probs, key_probs) = base_forward_with_probs(tiny, tok, pix, (2, 0))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(base_forward(tiny, tok, pix)), rtol=1e-5, atol=1e-5)
    b, s = tok.shape
    x = tiny.embed(tok, tiny.image_features(pix))
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
    tc = cfg.text

    def runner_probs(layer):  # [B, H, S, S]
        cache = KVCache.zeros(layer + 1, b, tc.num_key_value_heads, s, tc.head_dim, x.dtype)
        return np.asarray(run_layers(tc, tiny.text.layers.stacked(), x, pos, cache.k, cache.v,
                                     jnp.zeros((b,), jnp.int32), stop=layer + 1, fresh=True,
                                     return_last_probs=True).attn_probs)

    ref, key_ref = runner_probs(2), runner_probs(0)
    np.testing.assert_allclose(np.asarray(probs), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(key_probs), key_ref, rtol=1e-5, atol=1e-6)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    nll, count = attention_mass_loss(probs, jb, heads=2)
    key_nll, key_count = key_mass_loss(key_probs, jb, heads=2)
    want, key_want = [], []
    for i in range(b):
        for q in range(3):
            if batch["attn_valid"][i, q]:
                r, s0 = batch["attn_rows"][i, q], batch["attn_img_start"][i]
                # head j is pulled onto role j % 2's target
                m = [(ref[i, j, r, s0:s0 + cfg.num_image_tokens] * batch["attn_target"][i, q, j % 2]).sum()
                     for j in range(2)]
                want.append(-np.log(np.array(m) + 1e-6).mean())
                km = [-np.log((key_ref[i, j, r] * batch["attn_key_target"][i, q, j % 2]).sum() + 1e-6)
                      for j in range(2) if batch["attn_key_target"][i, q, j % 2].any()]
                if km:
                    key_want.append(np.mean(km))
    assert float(count) == len(want) == 7 and float(key_count) == len(key_want) >= 5
    np.testing.assert_allclose(float(nll), np.sum(want), rtol=1e-5)
    np.testing.assert_allclose(float(key_nll), np.sum(key_want), rtol=1e-5)
    # the key targets lie in each question's own span: after the image / previous answer, up to the row
    for i in range(b):
        for q in range(int(batch["attn_valid"][i].sum())):
            r = batch["attn_rows"][i, q]
            lo = 18 if r == 23 else 26
            is_key = {j for j in range(lo, r + 1) if 3 <= batch["tokens"][i, j] < 100}
            subject, reference = (set(np.flatnonzero(batch["attn_key_target"][i, q, role])) for role in range(2))
            if (i, q) == (1, 0):  # the relation: its words before the split token, then after it
                assert subject == {j for j in is_key if j < 20} and reference == {j for j in is_key if j > 20}
                np.testing.assert_array_equal(batch["attn_target"][i, q], np.eye(cfg.num_image_tokens)[[1, 6]])
            else:
                assert subject == reference == is_key
                np.testing.assert_array_equal(batch["attn_target"][i, q, 0], batch["attn_target"][i, q, 1])


def test_training_pulls_the_heads_onto_the_target(tiny):
    """A few steps with only the attention loss (CE weight is 1 but the target dominates) raise
    the supervised heads' mass on the target; the unsupervised heads are not asked to."""
    batch = _batch(tiny.cfg, seed=1)
    tr = Trainer(tiny, TrainConfig(steps=30, batch_size=4, train_all=True, freeze=("vision",),
                                   aux_loss=ShapesAttentionLoss(layer=1, heads=2, key_layer=0),
                                   optim=OptimConfig(lr=3e-3, warmup_ratio=0.0)))
    first = float(tr.step(batch)["attn_mass_nll"])
    for _ in range(29):
        last = float(tr.step(batch)["attn_mass_nll"])
    assert last < 0.5 * first, (first, last)


def test_clear_errors(tiny):
    with pytest.raises(ValueError, match="needs train_all"):
        Trainer(tiny, TrainConfig(steps=1, batch_size=2, aux_loss=ShapesAttentionLoss(layer=1)))
    tr = Trainer(tiny, TrainConfig(steps=1, batch_size=4, train_all=True, aux_loss=ShapesAttentionLoss(layer=1)))
    plain = {k: v for k, v in _batch(tiny.cfg).items() if not k.startswith("attn")}
    with pytest.raises(ValueError, match="needs its fields in the batch"):
        tr.step(plain)
    with pytest.raises(ValueError, match="needs attn_layer"):
        shapes_attention(attn_layer=None, attn_key_layer=0)
    with pytest.raises(ValueError, match=r"layers \[1, 9\]"):
        base_forward_with_probs(tiny, jnp.zeros((1, 20), jnp.int32), None, (1, 9))
    with pytest.raises(ValueError, match="heads=5"):
        attention_mass_loss(jnp.zeros((1, 4, 3, 3)), {}, heads=5)
    eye = np.eye(16, dtype=np.float32)
    tokens = np.array([5] * 2 + [tiny.cfg.image_token_index] * 16 + [7, 8, 9, 4, 4]), np.array([0] * 21 + [1, 1])
    with pytest.raises(ValueError, match="relation word"):  # a two-role target in a question without one
        supervision_fields(*tokens, tiny.cfg.image_token_index, 16, [(eye[0], eye[1])], 2, split_ids=[SPLIT])


def test_train_attention_entry_point_hands_its_objects_to_twig_jax_train(monkeypatch, capsys):
    """The --attn-* flags become the data extension and the auxiliary loss; every other argument
    goes to twig-jax train unchanged, which rejects the loss without --train-all."""
    from research import train_attention
    from twig_jax.cli.train import main as train_main

    calls = []
    monkeypatch.setattr(train_attention, "train_main", lambda argv, **kw: calls.append((argv, kw)) or 0)
    rest = ["--data", "d.json", "--train-all", "--steps", "5", "--lr", "3e-4"]
    assert train_attention.main(["--attn-layer", "1", "--data", "d.json", "--attn-heads", "2", "--train-all",
                                 "--attn-key-layer", "0", "--steps", "5", "--attn-weight", "0.3", "--attn-roles",
                                 "--lr", "3e-4"]) == 0
    assert calls == [(rest, {"extra_fields": ShapesAttentionTargets(roles=True, slots=8),
                             "aux_loss": ShapesAttentionLoss(layer=1, heads=2, key_layer=0, weight=0.3)})]
    assert train_attention.main(["--attn-key-layer", "0", *rest]) == 2 and len(calls) == 1
    assert "needs attn_layer" in capsys.readouterr().err
    assert train_main(["--data", "d.json", "--base-preset", "tiny", "--steps", "1"],
                      aux_loss=ShapesAttentionLoss(layer=1)) == 2
    assert "needs --train-all" in capsys.readouterr().err


def test_train_attention_runs_a_shapes_step(tmp_path):
    """One step of python -m research.train_attention on a random shapes-world LLaVA: the metrics
    log the attention target as attn_mass_nll, weighted into the loss."""
    from research.train_attention import main

    data = str(tmp_path / "data")
    generate_dataset(data, 6, 0, seed=2)
    with open(os.path.join(data, "train.json")) as f:
        records = [r for r in json.load(f) if len(r["conversations"]) > 2]  # the scenes with short questions
    with open(os.path.join(data, "train.json"), "w") as f:
        json.dump(records, f)
    ckpt = str(tmp_path / "run")
    assert main(["--attn-layer", "1", "--attn-key-layer", "0", "--attn-heads", "2", "--attn-weight", "0.3",
                 "--attn-roles", "--base-preset", "shapes-lm-2layer", "--tokenizer", os.path.join(data, "tokenizer"),
                 "--train-all", "--freeze", "vision", "--data", os.path.join(data, "train.json"), "--images",
                 os.path.join(data, "images"), "--max-len", "352", "--on-too-long", "truncate", "--batch", "2",
                 "--steps", "1", "--ckpt-dir", ckpt, "--no-progress"]) == 0
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        (rec,) = [json.loads(line) for line in f]
    assert rec["attn_mass_nll"] > 0 and rec["attn_kl"] == 0.0  # no AttnKL term in this run
    np.testing.assert_allclose(rec["loss"], rec["ce"] + 0.3 * rec["attn_mass_nll"], rtol=1e-6)
