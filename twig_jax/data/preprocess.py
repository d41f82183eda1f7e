"""LLaVA-1.5 input pipeline: images -> pixel values, question -> prompt -> token ids.

Mirrors the reference LLaVA-1.5 code path used at inference time
(``image_aspect_ratio == "pad"``, ``conv_mode == "vicuna_v1"``):

* images: convert to RGB (every mode keeping what it shows: 16-bit samples scaled,
  transparency over white) -> pad to square with the CLIP mean colour
  (:func:`expand2square`) -> CLIP image processor (resize shortest edge ->
  centre crop -> rescale 1/255 -> normalise), giving float32 ``[B, 3, H, W]``.
* text: :func:`build_prompt` -> :func:`tokenize_with_image`, which splices
  ``num_image_tokens`` copies of the image token id where ``<image>`` was
  (LLaVA's ``tokenizer_image_token``, but with the placeholder already expanded
  to one position per visual token; the id need not be in the vocabulary, as
  liuhaotian's -200 is not) -> :func:`pad_batch` into a fixed bucket.

Nothing here downloads anything: image-processor settings come from a dict or a
local directory holding ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_PLACEHOLDER",
    "VICUNA_V1_SYSTEM",
    "LLAVA15_CLIP_PARAMS",
    "DEFAULT_PROMPT_BUCKETS",
    "expand2square",
    "mean_background_color",
    "load_image",
    "make_clip_image_processor",
    "ImagePreprocessor",
    "preprocess_images",
    "build_prompt",
    "tokenize_with_image",
    "round_up_to_bucket",
    "pad_batch",
]

IMAGE_PLACEHOLDER = "<image>"

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# preprocessor_config.json of openai/clip-vit-large-patch14-336, the LLaVA-1.5 vision tower.
LLAVA15_CLIP_PARAMS: dict[str, Any] = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "do_rescale": True,
    "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,  # PIL.Image.BICUBIC
    "rescale_factor": 1.0 / 255.0,
    "size": {"shortest_edge": 336},
}

DEFAULT_PROMPT_BUCKETS: tuple[int, ...] = (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)

_PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"


# --------------------------------------------------------------------------- images


def mean_background_color(image_mean: Sequence[float]) -> tuple[int, ...]:
    """LLaVA-1.5's pad colour: ``tuple(int(x * 255) for x in image_processor.image_mean)``."""
    return tuple(int(x * 255) for x in image_mean)


def expand2square(img: Image.Image, background_color: Any) -> Image.Image:
    """Pad ``img`` to a square of side ``max(W, H)`` filled with ``background_color``,
    the original centred (offset rounded down), exactly as LLaVA-1.5's ``expand2square``.
    Square images are returned unchanged."""
    width, height = img.size
    if width == height:
        return img
    if width > height:
        result = Image.new(img.mode, (width, width), background_color)
        result.paste(img, (0, (width - height) // 2))
        return result
    result = Image.new(img.mode, (height, height), background_color)
    result.paste(img, ((height - width) // 2, 0))
    return result


# Sample conversions to 8 bits, shared by arrays and PIL images so both give the same pixels.


def _unit_float_to_8bit(x: np.ndarray, what: str) -> np.ndarray:
    """Floating samples in [0, 1] -> uint8 (x 255, rounded); anything else is refused."""
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contains NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{what} values must be in [0, 1]; got range [{lo:g}, {hi:g}] (pass uint8 for 0..255 data)")
    return np.round(x.astype(np.float64) * 255.0).astype(np.uint8)


def _16bit_to_8bit(x: np.ndarray, what: str) -> np.ndarray:
    """16-bit samples in [0, 65535] -> uint8, 65535 -> 255 (x / 257, rounded): scaled, never clipped."""
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > 65535:
        raise ValueError(f"{what} values must be 16-bit samples in [0, 65535]; got range [{lo}, {hi}]")
    return np.round(x.astype(np.float64) / 257.0).astype(np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """[H, W, 4] uint8 -> [H, W, 3] uint8 composited over white, as an image viewer shows it (and as
    transformers' convert_to_rgb does): a transparent pixel's stored colour never shows."""
    a = rgba[..., 3:].astype(np.float64) / 255.0
    return np.round(rgba[..., :3].astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB showing what the image shows.

    * 16-bit gray ("I;16*") and "I" (what 16-bit PNG / PGM / TIFF samples decode to): scaled from
      [0, 65535] to [0, 255]; PIL's own conversion clips them, turning most of the image white.
      "I" values outside [0, 65535] are refused.
    * "F": samples in [0, 1], as for float arrays; others are refused.
    * transparency ("RGBA", "LA", "PA", premultiplied modes, or a "transparency" entry such as a
      palette's transparent index): composited over white.
    * everything else ("1", "L", "P", "CMYK", "YCbCr", ...): PIL's conversion (CMYK:
      (255 - C)(255 - K) / 255).
    """
    mode = img.mode
    if mode == "I" or mode.startswith("I;16"):
        gray = _16bit_to_8bit(np.asarray(img), f"image mode {mode!r}")
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        gray = _unit_float_to_8bit(np.asarray(img), f"image mode {mode!r}")
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return Image.fromarray(_over_white(np.asarray(img.convert("RGBA"))), mode="RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert image mode {mode!r} to RGB: {e}") from e


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    """HWC (or HW grayscale) array -> RGB PIL image. uint8 and other integer values in [0, 255];
    uint16 values are 16-bit samples in [0, 65535]; floating values in [0, 1]. A fourth channel is
    alpha (composited over white)."""
    if arr.ndim == 3:
        channels = arr.shape[-1]
        if channels not in (1, 3, 4):
            raise ValueError(
                f"image array must be HWC with 1, 3 or 4 channels; got shape {tuple(arr.shape)} "
                f"({channels} channels)"
            )
    elif arr.ndim != 2:
        raise ValueError(
            f"image array must have ndim 2 (HW) or 3 (HWC), or 4 for a batch (BHWC); "
            f"got ndim {arr.ndim} with shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image array is empty: shape {tuple(arr.shape)}")

    if arr.dtype == np.uint8:
        data = arr
    elif arr.dtype == np.bool_:
        data = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        data = _16bit_to_8bit(arr, "uint16 image array")
    elif np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"integer image array values must be in [0, 255]; got range [{lo}, {hi}] ({arr.dtype})"
            )
        data = arr.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        data = _unit_float_to_8bit(arr, "floating image array")
    else:
        raise ValueError(f"unsupported image array dtype {arr.dtype}")

    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    data = np.ascontiguousarray(data)
    if data.ndim == 2:
        return Image.fromarray(data, mode="L").convert("RGB")
    if data.shape[-1] == 4:
        return Image.fromarray(_over_white(data), mode="RGB")
    return Image.fromarray(data, mode="RGB")


def load_image(image: Any) -> Image.Image:
    """One image -> RGB ``PIL.Image``. Accepts a PIL image, a numpy HWC/HW array or a
    file path (str / ``os.PathLike``). Raises ``ValueError`` (naming the path) for a
    missing or unreadable file, and for arrays of the wrong ndim / channel count.
    Every mode keeps what it shows (:func:`_pil_to_rgb`): 16-bit samples are scaled to
    8 bits, transparency is composited over white."""
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise ValueError(f"image file not found: {path!r}")
        if os.path.isdir(path):
            raise ValueError(f"image path is a directory, not an image file: {path!r}")
        try:
            with Image.open(path) as im:
                im.load()
                rgb = _pil_to_rgb(im)
                return rgb.copy() if rgb is im else rgb  # outlives the closed file
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image file {path!r}: {e}") from e
    raise TypeError(
        f"unsupported image type {type(image).__name__}; expected a PIL.Image, a numpy array "
        f"or a file path"
    )


def _as_image_list(images: Any) -> list[Any]:
    """Normalise single image / sequence / BHWC array into a list of single images."""
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        return [images]
    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, Sequence):
        return list(images)
    return [images]


def make_clip_image_processor(params: Mapping[str, Any] | None = None):
    """Build transformers' CLIP image processor from a dict of
    ``preprocessor_config.json`` fields (default: LLaVA-1.5's CLIP-L/336).

    Uses ``CLIPImageProcessorPil`` (the PIL/numpy backend), which is what
    ``CLIPImageProcessor`` resolves to without torchvision and matches the
    original PIL-based CLIP preprocessing that LLaVA-1.5 used.
    """
    from transformers import CLIPImageProcessorPil

    params = dict(LLAVA15_CLIP_PARAMS if params is None else params)
    return CLIPImageProcessorPil(**params)


def _load_processor_dir(path: str | os.PathLike):
    """CLIP image processor from a local directory holding ``preprocessor_config.json``
    (or the path of that json file itself). Never touches the network."""
    path = os.fspath(path)
    cfg_file = path if os.path.isfile(path) else os.path.join(path, _PREPROCESSOR_CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        raise ValueError(
            f"no {_PREPROCESSOR_CONFIG_NAME} found at {path!r} (expected a local directory "
            f"containing it, or the json file itself)"
        )
    try:
        with open(cfg_file, encoding="utf-8") as f:
            params = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read image processor config {cfg_file!r}: {e}") from e
    if not isinstance(params, dict):
        raise ValueError(f"image processor config {cfg_file!r} is not a JSON object")
    return make_clip_image_processor(params)


class ImagePreprocessor:
    """LLaVA-1.5 image pipeline: RGB -> pad to square (mean colour) -> CLIP processor.

    ``ImagePreprocessor()`` uses LLaVA-1.5's CLIP-L/336 settings;
    ``ImagePreprocessor(params)`` takes a dict of ``preprocessor_config.json`` fields;
    ``ImagePreprocessor.from_pretrained(dir)`` reads a local ``preprocessor_config.json``;
    ``ImagePreprocessor(processor=p)`` wraps an existing HF image processor.
    Calling it returns float32 ``[B, 3, H, W]`` (NCHW, HF convention).
    """

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        *,
        processor: Any = None,
        pad_to_square: bool = True,
    ):
        if processor is not None and params is not None:
            raise ValueError("pass either params or processor, not both")
        self.processor = processor if processor is not None else make_clip_image_processor(params)
        self.pad_to_square = pad_to_square

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, pad_to_square: bool = True) -> ImagePreprocessor:
        """Load from a local directory with ``preprocessor_config.json`` (no download)."""
        return cls(processor=_load_processor_dir(path), pad_to_square=pad_to_square)

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.processor.image_mean)

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.processor.image_std)

    @property
    def background_color(self) -> tuple[int, ...]:
        """Pad colour, ``(122, 116, 104)`` for the CLIP mean."""
        return mean_background_color(self.image_mean)

    @property
    def crop_size(self) -> tuple[int, int]:
        """Output ``(H, W)``."""
        cs = self.processor.crop_size
        if isinstance(cs, Mapping):
            return int(cs["height"]), int(cs["width"])
        return int(cs.height), int(cs.width)

    def prepare(self, image: Any) -> Image.Image:
        """One image -> RGB PIL, padded to square if ``pad_to_square``."""
        img = load_image(image)
        if self.pad_to_square:
            img = expand2square(img, self.background_color)
        return img

    def __call__(self, images: Any) -> np.ndarray:
        """Image(s) -> pixel values float32 ``[B, 3, H, W]``.

        ``images``: one image or a sequence of them (PIL / numpy HWC / path), or a
        BHWC numpy array.
        """
        items = _as_image_list(images)
        if not items:
            raise ValueError("no images given (empty batch)")
        prepared = [self.prepare(x) for x in items]
        out = self.processor.preprocess(images=prepared, return_tensors="np")["pixel_values"]
        pixel_values = np.ascontiguousarray(np.asarray(out, dtype=np.float32))  # [B, 3, H, W]
        if pixel_values.ndim != 4 or pixel_values.shape[:2] != (len(prepared), 3):
            raise ValueError(
                f"image processor returned unexpected shape {pixel_values.shape}; "
                f"expected [{len(prepared)}, 3, H, W]"
            )
        return pixel_values


def preprocess_images(images: Any, preprocessor: ImagePreprocessor | None = None) -> np.ndarray:
    """Functional form: ``(preprocessor or ImagePreprocessor())(images)`` -> ``[B, 3, H, W]``."""
    if preprocessor is None:
        preprocessor = ImagePreprocessor()
    return preprocessor(images)  # [B, 3, H, W]


# --------------------------------------------------------------------------- text


def build_prompt(question: str, conv: str = "vicuna_v1", *, with_image: bool = True) -> str:
    """LLaVA-1.5 prompt for a single-turn question.

    ``vicuna_v1``: ``f"{VICUNA_V1_SYSTEM} USER: <image>\\n{question} ASSISTANT:"``.
    ``plain``:     ``f"<image>\\n{question}"``.
    If ``question`` already contains ``<image>`` (or ``with_image=False``), no
    placeholder is added.
    """
    if with_image and IMAGE_PLACEHOLDER not in question:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    if conv == "vicuna_v1":
        return f"{VICUNA_V1_SYSTEM} USER: {question} ASSISTANT:"
    if conv == "plain":
        return question
    raise ValueError(f"unknown conversation template {conv!r}; expected 'vicuna_v1' or 'plain'")


def _input_ids(tokenizer: Any, text: str) -> list[int]:
    enc = tokenizer(text)
    if hasattr(enc, "input_ids"):
        ids = enc.input_ids
    elif isinstance(enc, Mapping):
        ids = enc["input_ids"]
    else:
        ids = enc
    return [int(t) for t in ids]


def tokenize_with_image(
    tokenizer: Any,
    prompt: str,
    image_token_index: int,
    num_image_tokens: int,
    expected_images: int = 1,
) -> list[int]:
    """Tokenise ``prompt``, replacing each ``<image>`` by ``num_image_tokens`` copies of
    ``image_token_index``. The tokenizer need not know ``<image>`` (liuhaotian's has no such
    token and its placeholder id, -200, is outside the vocabulary): the marker is cut out of the
    text before tokenisation.

    As LLaVA's ``tokenizer_image_token``: the prompt is split on ``<image>``, each
    chunk is tokenised with the HF tokenizer's defaults (special tokens on), and if
    the first chunk starts with BOS, the BOS that the tokenizer puts on every later
    chunk is dropped, so BOS appears only at the start.

    Raises ``ValueError`` unless the prompt holds exactly ``expected_images``
    ``<image>`` markers (0 for text-only prompts).
    """
    if num_image_tokens < 0:
        raise ValueError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count != expected_images:
        raise ValueError(
            f"prompt must contain exactly {expected_images} {IMAGE_PLACEHOLDER!r} marker(s), "
            f"found {count}"
        )
    chunks = [_input_ids(tokenizer, chunk) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    bos = getattr(tokenizer, "bos_token_id", None)
    strip_bos = bos is not None and len(chunks[0]) > 0 and chunks[0][0] == bos

    ids: list[int] = list(chunks[0])
    for chunk in chunks[1:]:
        ids.extend([int(image_token_index)] * num_image_tokens)
        if strip_bos and chunk and chunk[0] == bos:
            chunk = chunk[1:]
        ids.extend(chunk)
    return ids


def round_up_to_bucket(n: int, buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS) -> int:
    """Smallest bucket ``>= n``; ``ValueError`` if ``n`` exceeds the largest bucket."""
    if not buckets:
        raise ValueError("bucket_sizes is empty")
    ordered = sorted(int(b) for b in buckets)
    for b in ordered:
        if b >= n:
            return b
    raise ValueError(f"sequence length {n} exceeds the largest bucket size {ordered[-1]}")


def pad_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    bucket_sizes: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists into the smallest bucket that fits the longest one.

    Returns ``tokens`` int32 ``[B, S_bucket]`` (padded with ``pad_id``) and
    ``lengths`` int32 ``[B]``.
    """
    if len(sequences) == 0:
        raise ValueError("cannot pad an empty batch (no sequences given)")
    lengths = np.asarray([len(s) for s in sequences], dtype=np.int32)  # [B]
    max_len = int(lengths.max())
    seq_len = round_up_to_bucket(max_len, bucket_sizes)
    tokens = np.full((len(sequences), seq_len), pad_id, dtype=np.int32)  # [B, S_bucket]
    for i, seq in enumerate(sequences):
        if len(seq):
            tokens[i, : len(seq)] = np.asarray(seq, dtype=np.int32)
    return tokens, lengths
