"""LLaVA instruction data: vicuna_v1 tokens + label mask, bad-sample reporting, grain determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from twig_jax.data import ConversationEncoder, DataConfig, build_dataset
from twig_jax.data.preprocess import VICUNA_V1_SYSTEM, ImagePreprocessor

N_IMG = 3  # visual tokens per image in these tests
IMG_ID = 4
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
WORDS = "what is red ? a cat . and the dog big yes".split()


def _word_tokenizer() -> Tokenizer:
    """WordLevel tokenizer: whitespace/punctuation split, '<s>' prepended like LLaMA's BOS."""
    pt = pre_tokenizers.Whitespace()
    words = {w for w, _ in pt.pre_tokenize_str(VICUNA_V1_SYSTEM + " USER: ASSISTANT: " + " ".join(WORDS))}
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for w in sorted(words):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pt
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@pytest.fixture(scope="module")
def tok():
    return _word_tokenizer()


TWO_TURNS = [
    {"from": "human", "value": "what is red ?\n<image>"},  # LLaVA moves <image> to the front
    {"from": "gpt", "value": "a cat ."},
    {"from": "human", "value": "and the dog ?"},
    {"from": "gpt", "value": "yes big"},
]

SYSTEM_WORDS = ("A chat between a curious human and an artificial intelligence assistant . The assistant gives "
                "helpful , detailed , and polite answers to the human ' s questions .").split()


def test_two_turn_tokens_and_label_mask(tok):
    enc = ConversationEncoder(tok, IMG_ID, N_IMG, max_len=64, pad_id=0)
    tokens, mask, length, truncated = enc.encode(TWO_TURNS, has_image=True)
    # "{system} USER: <image>\nwhat is red ? ASSISTANT: a cat .</s>USER: and the dog ? ASSISTANT: yes big</s>"
    expected = (
        [("<s>", 0)]
        + [(w, 0) for w in SYSTEM_WORDS]
        + [("USER", 0), (":", 0)] + [("<image>", 0)] * N_IMG
        + [("what", 0), ("is", 0), ("red", 0), ("?", 0), ("ASSISTANT", 0), (":", 0)]
        + [("a", 1), ("cat", 1), (".", 1), ("</s>", 1)]
        + [("USER", 0), (":", 0), ("and", 0), ("the", 0), ("dog", 0), ("?", 0), ("ASSISTANT", 0), (":", 0)]
        + [("yes", 1), ("big", 1), ("</s>", 1)]
    )
    vocab = tok.get_vocab()
    want_ids = [vocab[w] for w, _ in expected]
    want_mask = [m for _, m in expected]
    assert length == len(expected) and not truncated
    assert tokens[:length].tolist() == want_ids
    assert mask[:length].tolist() == want_mask
    assert tokens[length:].tolist() == [0] * (64 - length)  # padding
    assert mask[length:].sum() == 0
    assert tokens.shape == mask.shape == (64,) and tokens.dtype == np.int32


def test_text_only_and_leading_gpt_turn(tok):
    enc = ConversationEncoder(tok, IMG_ID, N_IMG, max_len=64, pad_id=0)
    conv = [{"from": "gpt", "value": "a"}] + [dict(t, value=t["value"].replace("\n<image>", "")) for t in TWO_TURNS]
    tokens, mask, length, _ = enc.encode(conv, has_image=False)
    assert IMG_ID not in tokens[:length].tolist()
    inv = {v: k for k, v in tok.get_vocab().items()}
    labelled = [inv[int(t)] for t, m in zip(tokens[:length], mask[:length]) if m]
    assert labelled == ["a", "cat", ".", "</s>", "yes", "big", "</s>"]


def test_too_long_truncate(tok):
    enc = ConversationEncoder(tok, IMG_ID, N_IMG, max_len=50, pad_id=0, on_too_long="truncate")
    tokens, mask, length, truncated = enc.encode(TWO_TURNS, has_image=True)
    assert truncated and length == 50
    full, fmask, _, _ = ConversationEncoder(tok, IMG_ID, N_IMG, max_len=64, pad_id=0).encode(TWO_TURNS, True)
    assert tokens.tolist() == full[:50].tolist() and mask.tolist() == fmask[:50].tolist()


# ---------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava_data")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(12):
        r = {"id": f"ok{i}", "conversations": TWO_TURNS}
        if i % 4 == 3:  # text-only sample
            r = {"id": f"ok{i}", "conversations": [dict(t, value=t["value"].replace("\n<image>", "")) for t in TWO_TURNS]}
        else:
            r["image"] = f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(d / f"{i}.png")
        recs.append(r)
    (d / "broken.png").write_text("not an image")
    long_conv = [TWO_TURNS[0], {"from": "gpt", "value": " ".join(["cat"] * 80)}]
    recs += [
        {"id": "bad_missing", "image": "nope.png", "conversations": TWO_TURNS},
        {"id": "bad_unreadable", "image": "broken.png", "conversations": TWO_TURNS},
        {"id": "bad_long", "image": "0.png", "conversations": long_conv},
        {"id": "bad_roles", "image": "0.png", "conversations": [TWO_TURNS[0], TWO_TURNS[0]]},
        {"id": "bad_noconv"},
    ]
    path = d / "data.json"
    path.write_text(json.dumps(recs))
    return d


@pytest.fixture(scope="module")
def tiny_pre():
    return ImagePreprocessor({"crop_size": {"height": 14, "width": 14}, "size": {"shortest_edge": 14},
                              "do_center_crop": True, "do_normalize": True, "do_resize": True, "do_rescale": True,
                              "do_convert_rgb": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                              "resample": 3, "rescale_factor": 1 / 255})


def _build(data_dir, tok, pre, batch_size=2, **kw):
    cfg = DataConfig(json_path=str(data_dir / "data.json"), image_dir=str(data_dir), max_len=72,
                     batch_size=batch_size, seed=3, num_epochs=1, **kw)
    return build_dataset(cfg, tok, image_token_index=IMG_ID, num_image_tokens=N_IMG, image_preprocessor=pre,
                         pixel_shape=(3, 14, 14))


def test_bad_samples_counted_and_skipped(data_dir, tok, tiny_pre, caplog):
    ds, report = _build(data_dir, tok, tiny_pre)
    with caplog.at_level("WARNING", logger="twig_jax.data"):
        batches = list(ds)
    ids = sorted(int(i) for b in batches for i in b["index"])
    assert ids == list(range(12))  # every good sample once, no bad one, no crash
    assert report.counts == {"missing_image": 1, "unreadable_image": 1, "too_long": 1, "malformed": 2}
    assert report.examples["missing_image"] == ["bad_missing"]
    assert "bad_unreadable" in caplog.text and "bad_long" in caplog.text  # not silent
    assert "5 bad samples" in report.summary()
    b = batches[0]
    assert b["tokens"].shape == (2, 72) and b["label_mask"].shape == (2, 72)
    assert b["pixel_values"].shape == (2, 3, 14, 14) and b["pixel_values"].dtype == np.float32
    text_only = [i for bt in batches for i, h in zip(bt["index"], bt["has_image"]) if not h]
    assert sorted(int(i) for i in text_only) == [3, 7, 11]


def test_truncate_option_reports(data_dir, tok, tiny_pre):
    ds, report = _build(data_dir, tok, tiny_pre, batch_size=1, on_too_long="truncate")
    batches = list(ds)
    assert len(batches) == 13  # the long sample (record 14) is kept, truncated to max_len
    long = [b for b in batches if int(b["index"][0]) == 14][0]
    assert long["label_mask"].sum() > 0 and long["tokens"].shape == (1, 72)
    assert report.counts["too_long_truncated"] == 1 and "too_long" not in report.counts


def test_deterministic_order_and_resume(data_dir, tok, tiny_pre):
    ds, _ = _build(data_dir, tok, tiny_pre)
    order = [b["index"].tolist() for b in ds]
    ds2, _ = _build(data_dir, tok, tiny_pre)
    it = iter(ds2)
    first = [next(it)["index"].tolist() for _ in range(2)]
    state = it.get_state()
    rest = [b["index"].tolist() for b in it]
    assert first + rest == order
    ds3, _ = _build(data_dir, tok, tiny_pre)
    it3 = iter(ds3)
    it3.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    assert [b["index"].tolist() for b in it3] == rest


def test_process_sharding_disjoint(data_dir, tok, tiny_pre):
    import grain

    seen = []
    for k in range(2):
        cfg = DataConfig(json_path=str(data_dir / "data.json"), image_dir=str(data_dir), max_len=72, batch_size=2,
                         seed=3, num_epochs=1)
        ds, _ = build_dataset(cfg, tok, image_token_index=IMG_ID, num_image_tokens=N_IMG, image_preprocessor=tiny_pre,
                              pixel_shape=(3, 14, 14), shard=grain.sharding.ShardOptions(k, 2, drop_remainder=True))
        seen.append({int(i) for b in ds for i in b["index"]})
        assert all(len(b["index"]) == 1 for b in ds)  # per-process batch = global / processes
    assert not seen[0] & seen[1] and seen[0] | seen[1] <= set(range(12))
