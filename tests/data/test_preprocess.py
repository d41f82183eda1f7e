"""Tests for twig_jax.data.preprocess (LLaVA-1.5 input pipeline). All offline and fast."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from twig_jax.data.preprocess import (
    DEFAULT_PROMPT_BUCKETS, LLAVA15_CLIP_PARAMS, VICUNA_V1_SYSTEM, ImagePreprocessor, build_prompt, expand2square,
    load_image, pad_batch, preprocess_images, round_up_to_bucket, tokenize_with_image,
)

CLIP_MEAN = np.array(LLAVA15_CLIP_PARAMS["image_mean"], dtype=np.float64)
CLIP_STD = np.array(LLAVA15_CLIP_PARAMS["image_std"], dtype=np.float64)


def _rand_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)  # [H, W, 3]


def _manual_pad_to_square(arr: np.ndarray, color) -> np.ndarray:
    """numpy version of LLaVA's expand2square on an HWC uint8 array."""
    h, w, _ = arr.shape
    s = max(h, w)
    out = np.empty((s, s, 3), dtype=np.uint8)
    out[...] = np.asarray(color, dtype=np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    out[top : top + h, left : left + w] = arr
    return out


@pytest.fixture(scope="module")
def preproc() -> ImagePreprocessor:
    return ImagePreprocessor()  # LLaVA-1.5 CLIP-L/336 defaults


# ------------------------------------------------------------------ images


def test_background_color_is_llava_mean_colour(preproc):
    assert preproc.background_color == (122, 116, 104)
    assert preproc.crop_size == (336, 336)


@pytest.mark.parametrize("hw", [(100, 160), (170, 90), (64, 64)])
def test_expand2square_matches_numpy(hw):
    arr = _rand_image(*hw, seed=1)
    color = (122, 116, 104)
    got = np.asarray(expand2square(Image.fromarray(arr), color))
    np.testing.assert_array_equal(got, _manual_pad_to_square(arr, color))


def test_pipeline_equals_manual_pad_plus_hf_processor(preproc):
    from transformers import CLIPImageProcessorPil

    arr = _rand_image(120, 200, seed=2)  # non-square, wider than tall
    padded = _manual_pad_to_square(arr, (122, 116, 104))  # [200, 200, 3]
    hf = CLIPImageProcessorPil(**LLAVA15_CLIP_PARAMS)
    want = hf(images=[Image.fromarray(padded)], return_tensors="np")["pixel_values"]

    got = preproc(arr)
    assert got.shape == (1, 3, 336, 336)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_pipeline_equals_fully_manual_numpy(preproc):
    """pad -> bicubic resize to 336 (square, so no crop) -> /255 -> CLIP normalise."""
    arr = _rand_image(90, 150, seed=3)
    padded = _manual_pad_to_square(arr, (122, 116, 104))
    resized = np.asarray(Image.fromarray(padded).resize((336, 336), Image.BICUBIC), dtype=np.float64)
    want = ((resized / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)[None]  # [1, 3, 336, 336]
    got = preproc(Image.fromarray(arr))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_input_kinds_agree(preproc, tmp_path):
    arr = _rand_image(60, 40, seed=4)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    rgba = np.concatenate([arr, np.full((60, 40, 1), 255, np.uint8)], axis=-1)

    from_array = preproc(arr)
    from_pil = preproc(Image.fromarray(arr))
    from_path = preproc(str(path))
    from_pathlike = preproc(path)
    from_rgba = preproc(rgba)
    for other in (from_pil, from_path, from_pathlike, from_rgba):
        np.testing.assert_array_equal(from_array, other)

    batch = preproc([arr, str(path), Image.fromarray(_rand_image(50, 50, seed=5))])
    assert batch.shape == (3, 3, 336, 336)
    np.testing.assert_array_equal(batch[0], from_array[0])
    np.testing.assert_array_equal(batch[1], from_array[0])
    assert preproc(np.stack([arr, arr])).shape == (2, 3, 336, 336)  # BHWC array


def test_grayscale_converted_to_rgb(preproc):
    gray = _rand_image(30, 30, seed=6)[..., 0]
    out = preproc(gray)
    assert out.shape == (1, 3, 336, 336)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_array_equal(out, preproc(rgb))
    assert load_image(Image.fromarray(gray)).mode == "RGB"


def test_from_pretrained_local_dir_old_style_config(tmp_path):
    # openai/clip-vit-large-patch14-336 ships ints for size / crop_size.
    cfg = {
        "crop_size": 336,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": LLAVA15_CLIP_PARAMS["image_mean"],
        "image_std": LLAVA15_CLIP_PARAMS["image_std"],
        "resample": 3,
        "size": 336,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    p = ImagePreprocessor.from_pretrained(tmp_path)
    assert p.crop_size == (336, 336)
    arr = _rand_image(80, 100, seed=7)
    np.testing.assert_allclose(p(arr), ImagePreprocessor()(arr), rtol=0, atol=1e-6)


def test_small_params_dict_gives_its_crop_size():
    params = dict(LLAVA15_CLIP_PARAMS, size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})
    out = preprocess_images([_rand_image(20, 50, seed=8)], ImagePreprocessor(params))
    assert out.shape == (1, 3, 28, 28)


# ------------------------------------------------------------------ prompts


def test_build_prompt_vicuna_v1_exact():
    want = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
        " USER: <image>\nWhat is in the image? ASSISTANT:"
    )
    assert build_prompt("What is in the image?") == want
    assert build_prompt("What is in the image?", conv="vicuna_v1") == want
    assert want.startswith(VICUNA_V1_SYSTEM)


def test_build_prompt_keeps_existing_image_marker():
    p = build_prompt("Describe <image> please")
    assert p.count("<image>") == 1
    assert p == f"{VICUNA_V1_SYSTEM} USER: Describe <image> please ASSISTANT:"


def test_build_prompt_plain_and_text_only():
    assert build_prompt("Hi there", conv="plain") == "<image>\nHi there"
    assert build_prompt("Hi", with_image=False) == f"{VICUNA_V1_SYSTEM} USER: Hi ASSISTANT:"
    with pytest.raises(ValueError, match="unknown conversation template"):
        build_prompt("Hi", conv="llama_2")


# ------------------------------------------------------------------ tokenisation

IMG_ID = 99  # image_token_index used in these tests (outside the tiny vocab)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<image>", "<pad>", "hello", "world", "what", "is", "this", "?",
             "USER:", "ASSISTANT:"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    assert hf("hello").input_ids == [1, 5]  # the tokenizer adds BOS to every call
    return hf


def test_tokenize_with_image_inserts_tokens_and_single_bos(tiny_tokenizer):
    prompt = "USER: hello <image>\nwhat is this ? ASSISTANT:"
    ids = tokenize_with_image(tiny_tokenizer, prompt, image_token_index=IMG_ID, num_image_tokens=5)
    assert ids == [1, 11, 5] + [IMG_ID] * 5 + [7, 8, 9, 10, 12]
    assert ids.count(1) == 1 and ids[0] == 1


def test_tokenize_with_image_at_start_and_end(tiny_tokenizer):
    ids = tokenize_with_image(tiny_tokenizer, "<image>\nhello", IMG_ID, 3)
    assert ids == [1, IMG_ID, IMG_ID, IMG_ID, 5]
    ids = tokenize_with_image(tiny_tokenizer, "hello <image>", IMG_ID, 2)
    assert ids == [1, 5, IMG_ID, IMG_ID]


def test_tokenize_with_image_on_built_prompt(tiny_tokenizer):
    prompt = build_prompt("what is this ?")
    ids = tokenize_with_image(tiny_tokenizer, prompt, IMG_ID, 576)
    assert ids.count(IMG_ID) == 576
    start = ids.index(IMG_ID)
    assert ids[start : start + 576] == [IMG_ID] * 576
    assert ids[start - 1] == 11  # "USER:"
    assert ids[start + 576 :] == [7, 8, 9, 10, 12]
    assert ids.count(1) == 1


def test_tokenize_text_only(tiny_tokenizer):
    ids = tokenize_with_image(tiny_tokenizer, "hello world", IMG_ID, 576, expected_images=0)
    assert ids == [1, 5, 6]


def test_tokenize_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"exactly 1 '<image>' marker.*found 2"):
        tokenize_with_image(tiny_tokenizer, "<image> hello <image>", IMG_ID, 4)
    with pytest.raises(ValueError, match=r"exactly 1 '<image>' marker.*found 0"):
        tokenize_with_image(tiny_tokenizer, "hello world", IMG_ID, 4)
    with pytest.raises(ValueError, match=r"exactly 0 '<image>' marker.*found 1"):
        tokenize_with_image(tiny_tokenizer, "<image> hello", IMG_ID, 4, expected_images=0)


# ------------------------------------------------------------------ padding


def test_pad_batch_picks_smallest_bucket():
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    tokens, lengths = pad_batch(seqs, pad_id=0, bucket_sizes=(4, 8, 16))
    assert tokens.dtype == np.int32 and lengths.dtype == np.int32
    assert tokens.shape == (3, 8)
    np.testing.assert_array_equal(lengths, [3, 5, 1])
    np.testing.assert_array_equal(tokens[0], [1, 2, 3, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(tokens[1], [4, 5, 6, 7, 8, 0, 0, 0])
    np.testing.assert_array_equal(tokens[2], [9, 0, 0, 0, 0, 0, 0, 0])
    tokens, _ = pad_batch([[1, 2, 3, 4]], pad_id=-1, bucket_sizes=(16, 4, 8))  # unsorted, exact fit
    assert tokens.shape == (1, 4)


def test_round_up_to_bucket():
    assert round_up_to_bucket(1) == 64
    assert round_up_to_bucket(64) == 64
    assert round_up_to_bucket(65) == 128
    assert round_up_to_bucket(600) == 768
    assert round_up_to_bucket(4096) == 4096
    assert DEFAULT_PROMPT_BUCKETS == (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)
    with pytest.raises(ValueError, match=r"4097.*4096"):
        round_up_to_bucket(4097)


def test_pad_batch_errors():
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], pad_id=0, bucket_sizes=(8,))
    with pytest.raises(ValueError, match=r"length 9 exceeds the largest bucket size 8"):
        pad_batch([[1] * 3, [1] * 9], pad_id=0, bucket_sizes=(4, 8))


# ------------------------------------------------------------------ image errors


def test_image_errors(preproc, tmp_path):
    with pytest.raises(ValueError, match=r"1, 3 or 4 channels.*\(2 channels\)"):
        preproc(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(5 channels\)"):
        preproc(np.zeros((8, 8, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"ndim 1"):
        preproc(np.zeros((8,), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"ndim 5"):
        preproc(np.zeros((1, 1, 8, 8, 3), dtype=np.uint8))
    missing = tmp_path / "does_not_exist.jpg"
    with pytest.raises(ValueError, match=r"not found.*does_not_exist\.jpg"):
        preproc(str(missing))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=r"cannot read image file.*junk\.png"):
        preproc(junk)
    with pytest.raises(ValueError, match="empty batch"):
        preproc([])
    with pytest.raises(ValueError, match=r"values must be in \[0, 1\]"):
        preproc(np.full((8, 8, 3), 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        ImagePreprocessor.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------ image modes
# What each mode should give, computed in numpy: 16-bit samples scaled (65535 -> 255), never clipped;
# transparency composited over white; CMYK as (255 - C)(255 - K) / 255.


def _gradient16(h: int = 24, w: int = 40) -> np.ndarray:
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)  # [H, W]


def _gray_to_rgb(gray8: np.ndarray) -> np.ndarray:
    return np.repeat(gray8[..., None], 3, axis=-1)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def test_16bit_png_is_scaled_not_clipped(preproc, tmp_path):
    g16 = _gradient16()
    path = tmp_path / "gray16.png"
    Image.fromarray(g16).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")  # what the file really is
    want = _gray_to_rgb(np.round(g16 / 257.0).astype(np.uint8))
    for given in (str(path), Image.open(path), Image.fromarray(g16), g16):
        np.testing.assert_array_equal(np.asarray(load_image(given)), want)
    np.testing.assert_array_equal(preproc(str(path)), preproc(want))
    assert np.asarray(load_image(str(path))).mean() < 200  # not the white of a clipped conversion


def test_mode_I_holds_16bit_samples():
    g16 = _gradient16().astype(np.int32)
    im = Image.fromarray(g16)
    assert im.mode == "I"
    want = _gray_to_rgb(np.round(g16 / 257.0).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(load_image(im)), want)
    with pytest.raises(ValueError, match=r"mode 'I'.*\[0, 65535\]"):
        load_image(Image.fromarray(np.full((4, 4), 70000, np.int32)))
    with pytest.raises(ValueError, match=r"mode 'I'.*\[0, 65535\]"):
        load_image(Image.fromarray(np.full((4, 4), -3, np.int32)))


def test_mode_F_is_a_float_image():
    x = np.linspace(0.0, 1.0, 24 * 40, dtype=np.float32).reshape(24, 40)
    im = Image.fromarray(x)
    assert im.mode == "F"
    want = _gray_to_rgb(np.round(x.astype(np.float64) * 255.0).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(load_image(im)), want)
    np.testing.assert_array_equal(np.asarray(load_image(im)), np.asarray(load_image(x)))
    with pytest.raises(ValueError, match=r"values must be in \[0, 1\]"):
        load_image(Image.fromarray(x * 255.0))


def test_transparency_is_composited_over_white(tmp_path):
    rng = np.random.default_rng(11)
    gray = rng.integers(0, 256, (16, 20), dtype=np.uint8)
    alpha = rng.integers(0, 256, (16, 20), dtype=np.uint8)
    alpha[0, :] = 0  # fully transparent: the stored colour must not show
    la = Image.fromarray(np.stack([gray, alpha], axis=-1), mode="LA")
    np.testing.assert_array_equal(np.asarray(load_image(la)), _over_white(_gray_to_rgb(gray), alpha))

    rgb = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    want = _over_white(rgb, alpha)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(rgba, mode="RGBA"))), want)
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), want)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    np.testing.assert_array_equal(np.asarray(load_image(path)), want)


def test_palette_with_transparency(tmp_path):
    palette = np.array([[0, 0, 0], [200, 30, 10], [10, 200, 30], [10, 30, 200]], np.uint8)
    idx = np.random.default_rng(12).integers(0, 4, (10, 12)).astype(np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette(palette.ravel().tolist())
    im.info["transparency"] = 0  # index 0 (black) is transparent
    want = np.where((idx == 0)[..., None], 255, palette[idx]).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(im)), want)
    path = tmp_path / "palette.png"
    im.save(path, transparency=0)
    np.testing.assert_array_equal(np.asarray(load_image(path)), want)
    opaque = Image.fromarray(idx, mode="P")
    opaque.putpalette(palette.ravel().tolist())
    np.testing.assert_array_equal(np.asarray(load_image(opaque)), palette[idx])


def test_cmyk():
    cmyk = np.random.default_rng(13).integers(0, 256, (16, 20, 4), dtype=np.uint8)
    c, k = cmyk[..., :3].astype(np.int64), cmyk[..., 3:].astype(np.int64)
    want = (((255 - c) * (255 - k) + 127) // 255).astype(np.uint8)  # (255 - C)(255 - K) / 255, rounded
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(cmyk, mode="CMYK"))), want)


def test_tokenize_with_a_tokenizer_that_has_no_image_token():
    """liuhaotian's tokenizer has no <image>; its placeholder id (-200) is outside the vocabulary."""
    from tests.conftest import tiny_llama_tokenizer

    tok = tiny_llama_tokenizer(199)
    assert tok.convert_tokens_to_ids("<image>") == tok.unk_token_id
    prompt = build_prompt("what is in the image?")
    ids = tokenize_with_image(tok, prompt, -200, 16)
    assert ids.count(-200) == 16 and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    start = ids.index(-200)
    assert ids[start:start + 16] == [-200] * 16
    assert tok.unk_token_id not in ids  # the marker never reached the tokenizer as text
    text = [t for t in ids if t != -200]
    assert all(0 <= t < len(tok) for t in text)
    assert tok.decode(ids[start + 16:]).strip() == "what is in the image? ASSISTANT:"
