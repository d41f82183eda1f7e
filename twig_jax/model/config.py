"""Frozen dataclass configs for LLaVA-1.5: vision tower, projector, language model.

Built from a Hugging Face `config.json` in either layout:
  * llava-hf (`LlavaForConditionalGeneration`): nested `vision_config` / `text_config`.
  * liuhaotian (`LlavaLlamaForCausalLM`): a flat LLaMA config with `mm_*` keys; the CLIP vision
    config comes from a separate CLIP checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from twig_jax.assets import REPO

# CLIP ViT-L/14-336, the tower LLaVA-1.5 uses; the liuhaotian layout only names it.
CLIP_VIT_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)

SUPPORTED_VISION_ACTS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")
SUPPORTED_TEXT_ACTS = ("silu",)
SUPPORTED_PROJECTOR_ACTS = ("gelu", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu")

# The placeholder id of liuhaotian's LLaVA (IMAGE_TOKEN_INDEX): its config names none and its tokenizer
# has no <image> token. The placeholder is never embedded, so it needs no row of the vocabulary.
LIUHAOTIAN_IMAGE_TOKEN_INDEX = -200

# What a config.json may say it is: LLaVA-1.5 in the llava-hf and the liuhaotian layouts.
LLAVA_HF_ARCHITECTURE = "LlavaForConditionalGeneration"
LIUHAOTIAN_ARCHITECTURE = "LlavaLlamaForCausalLM"
SUPPORTED_TEXT_MODEL_TYPES = ("llama",)
SUPPORTED_VISION_MODEL_TYPES = ("clip_vision_model", "clip")


class ConfigError(ValueError):
    """A config that twig-jax cannot represent faithfully."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.hidden_act not in SUPPORTED_VISION_ACTS:
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} unsupported (have {SUPPORTED_VISION_ACTS})")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotate-half RoPE")
        if self.hidden_act not in SUPPORTED_TEXT_ACTS:
            raise ConfigError(f"text hidden_act {self.hidden_act!r} unsupported (have {SUPPORTED_TEXT_ACTS})")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    # An int (HF hidden_states index: -2 = second-to-last block) or a tuple (concatenated).
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image after selection (N in docs/design.md)."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """vision_feature_layer as non-negative hidden_states indices (0 = embeddings)."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        n = self.vision.num_hidden_layers + 1  # hidden_states has embeddings + one per block
        out = []
        for layer in layers:
            idx = layer + n if layer < 0 else layer
            if not 0 <= idx < n:
                raise ConfigError(f"vision_feature_layer {layer} out of range for {n - 1} vision layers")
            out.append(idx)
        return tuple(out)

    @property
    def projector_in_dim(self) -> int:
        return self.vision.hidden_size * len(self.feature_layers)

    def validate(self) -> "LlavaConfig":
        self.vision.validate()
        self.text.validate()
        _ = self.feature_layers
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} must be 'default' or 'full'")
        if self.projector_hidden_act not in SUPPORTED_PROJECTOR_ACTS:
            raise ConfigError(f"projector_hidden_act {self.projector_hidden_act!r} unsupported")
        # Any integer: the placeholder is replaced by image features, never looked up in the vocabulary.
        if not isinstance(self.image_token_index, int) or isinstance(self.image_token_index, bool):
            raise ConfigError(f"image_token_index {self.image_token_index!r} is not an integer")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlavaConfig":
        d = dict(d)
        vision = VisionConfig(**d.pop("vision"))
        text = TextConfig(**d.pop("text"))
        if isinstance(d.get("vision_feature_layer"), list):
            d["vision_feature_layer"] = tuple(d["vision_feature_layer"])
        return cls(vision=vision, text=text, **d).validate()


# ----------------------------------------------------------------------------------------------
# Hugging Face config.json -> LlavaConfig


def _pick(d: dict[str, Any], cls, renames: dict[str, str] | None = None, **overrides):
    """Build dataclass `cls` from the keys of `d` it knows (after renames), plus overrides."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in d.items():
        key = (renames or {}).get(key, key)
        if key in names and value is not None:
            kw[key] = value
    kw.update(overrides)
    return cls(**kw)


_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings", "image_size", "patch_size", "num_channels")
_POSITIVE_CONSTANTS = ("rms_norm_eps", "rope_theta", "layer_norm_eps")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_numbers(d: dict[str, Any], where: str) -> None:
    """Sizes must be positive integers and eps / theta positive numbers: anything else would fail
    later, far from the key that caused it."""
    for key in _SIZES:
        v = d.get(key)
        if v is not None and not (_is_int(v) and v > 0):
            raise ConfigError(f"{where}{key} is {v!r}, not a positive integer")
    for key in _POSITIVE_CONSTANTS:
        v = d.get(key)
        if v is not None and not ((_is_int(v) or isinstance(v, float)) and v > 0):
            raise ConfigError(f"{where}{key} is {v!r}, not a positive number")


def _object(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} is {type(d).__name__}, not a JSON object")
    return d


def _rope_theta(d: dict[str, Any]) -> float:
    """rope_theta from either the old flat key or transformers 5's `rope_parameters`."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    for spec in (params, scaling or {}):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in ("default", None):
            raise ConfigError(f"RoPE type {kind!r} is not supported (only the default rotate-half RoPE)")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def text_config_from_hf(d: dict[str, Any], where: str = "text_config.") -> TextConfig:
    _check_numbers(d, where)
    if "hidden_size" not in d:
        raise ConfigError(f"{where}hidden_size is missing")
    n_heads = d.get("num_attention_heads", 32)
    head_dim = d.get("head_dim") or d["hidden_size"] // n_heads
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    return _pick(
        d, TextConfig,
        head_dim=head_dim,
        num_key_value_heads=d.get("num_key_value_heads") or n_heads,
        rope_theta=_rope_theta(d),
        eos_token_id=eos,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def vision_config_from_hf(d: dict[str, Any], where: str = "vision_config.") -> VisionConfig:
    if "vision_config" in d:  # a full CLIPModel config.json
        d = _object(d["vision_config"], "vision_config")
    _check_numbers(d, where)
    return _pick(d, VisionConfig)


def _model_name(d: dict[str, Any]) -> str:
    """How a config names its model, for messages: its architecture, else its model_type."""
    archs = d.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]
    model_type = f"model_type {d.get('model_type')!r}"
    return f"architecture {', '.join(map(str, archs))} ({model_type})" if archs else model_type


def check_llava15(d: dict[str, Any], vision: dict[str, Any] | None = None) -> None:
    """Refuse, naming it, a config.json of any model other than LLaVA-1.5 (a CLIP tower, a LLaMA
    language model, one image of N visual tokens): the weights of a LLaVA-NeXT, Qwen2-VL or
    Mistral-based checkpoint may load with matching shapes and still compute something else."""
    name = _model_name(d)
    known = (LLAVA_HF_ARCHITECTURE, LIUHAOTIAN_ARCHITECTURE)
    archs = d.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]
    other = [a for a in archs if a not in known]
    if other or d.get("model_type") not in (None, "llava"):
        raise ConfigError(f"{name} is not LLaVA-1.5; twig-jax converts {known[0]} and {known[1]} only")
    if d.get("image_grid_pinpoints") is not None or str(d.get("image_aspect_ratio", "")).startswith("anyres"):
        raise ConfigError(f"{name} has image_grid_pinpoints / image_aspect_ratio "
                          f"{d.get('image_aspect_ratio')!r}: LLaVA-NeXT any-resolution tiling, which twig-jax "
                          f"does not run (LLaVA-1.5 only: one image, N visual tokens)")
    if d.get("mm_patch_merge_type") not in (None, "flat"):
        raise ConfigError(f"{name} has mm_patch_merge_type {d['mm_patch_merge_type']!r}: LLaVA-NeXT patch "
                          f"merging, which twig-jax does not run (LLaVA-1.5 only: 'flat')")
    if d.get("mm_use_im_start_end"):
        raise ConfigError(f"{name} has mm_use_im_start_end: image start / end tokens in the prompt, which "
                          f"LLaVA-1.5 does not use and twig-jax does not build")
    text = d.get("text_config")
    text_type = text.get("model_type") if isinstance(text, dict) else None
    if text_type not in (None,) + SUPPORTED_TEXT_MODEL_TYPES:
        raise ConfigError(f"{name} has a {text_type!r} language model; twig-jax runs LLaMA "
                          f"(text_config.model_type 'llama') only")
    for vd in (d.get("vision_config"), vision):
        if isinstance(vd, dict):
            vision_type = vd.get("model_type")
            if vision_type not in (None,) + SUPPORTED_VISION_MODEL_TYPES:
                raise ConfigError(f"{name} has a {vision_type!r} vision tower; twig-jax runs CLIP "
                                  f"(vision model_type {SUPPORTED_VISION_MODEL_TYPES}) only")


def _feature_layer(value: Any, key: str) -> int | tuple[int, ...]:
    if _is_int(value):
        return value
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
        return tuple(value)
    raise ConfigError(f"{key} is {value!r}, not an integer or a list of integers")


def config_from_hf_dict(d: dict[str, Any], vision: dict[str, Any] | None = None) -> LlavaConfig:
    """LlavaConfig from a parsed HF config.json of either layout.

    `vision` is the CLIP config for the liuhaotian layout (which only names its tower); when
    absent, the tower is assumed to be CLIP ViT-L/14-336 if the name says so. Raises ConfigError
    (one line naming the key) for anything that is not LLaVA-1.5 or that twig-jax cannot represent.
    """
    d = _object(d, "config.json")
    if vision is not None:
        vision = _object(vision, "the CLIP config.json")
    check_llava15(d, vision)
    # liuhaotian checkpoints also say model_type "llava", so the mm_* keys decide first.
    is_liuhaotian = "text_config" not in d and ("mm_vision_tower" in d or "mm_projector_type" in d)
    if not is_liuhaotian and ("text_config" in d or d.get("model_type") == "llava"):
        text_d = dict(_object(d.get("text_config") or {}, "text_config"))
        text_d.setdefault("vocab_size", d.get("vocab_size", 32064))
        # transformers ties the LM head when either the top-level or the text config says so.
        text_d["tie_word_embeddings"] = bool(d.get("tie_word_embeddings")) or bool(text_d.get("tie_word_embeddings"))
        return LlavaConfig(
            vision=vision_config_from_hf(_object(d.get("vision_config") or {}, "vision_config")),
            text=text_config_from_hf(text_d),
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=d.get("multimodal_projector_bias", True),
            vision_feature_layer=_feature_layer(d.get("vision_feature_layer", -2), "vision_feature_layer"),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        ).validate()
    if is_liuhaotian:
        projector = d.get("mm_projector_type", "linear")
        if projector != "mlp2x_gelu":
            raise ConfigError(f"mm_projector_type {projector!r} unsupported (only 'mlp2x_gelu')")
        if vision is None:
            tower = str(d.get("mm_vision_tower", ""))
            if "clip-vit-large-patch14-336" not in tower:
                raise ConfigError(
                    f"liuhaotian layout names vision tower {tower!r}: pass its CLIP config (vision_dir)")
            vision_cfg = VisionConfig(**CLIP_VIT_L_336)
        else:
            vision_cfg = vision_config_from_hf(vision, "the CLIP config's ")
        if d.get("mm_hidden_size") not in (None, vision_cfg.hidden_size):
            raise ConfigError(f"mm_hidden_size {d['mm_hidden_size']} != vision hidden_size {vision_cfg.hidden_size}")
        select = d.get("mm_vision_select_feature", "patch")
        strategies = {"patch": "default", "cls_patch": "full"}
        if select not in strategies:
            raise ConfigError(f"mm_vision_select_feature {select!r} unsupported (have {sorted(strategies)})")
        return LlavaConfig(
            vision=vision_cfg,
            text=text_config_from_hf(d, ""),
            # liuhaotian's LLaVA marks the image in a prompt with -200 and names no id in its config.
            image_token_index=d.get("image_token_index", LIUHAOTIAN_IMAGE_TOKEN_INDEX),
            projector_hidden_act="gelu",
            vision_feature_layer=_feature_layer(d.get("mm_vision_select_layer", -2), "mm_vision_select_layer"),
            vision_feature_select_strategy=strategies[select],
        ).validate()
    raise ConfigError(f"{_model_name(d)}: config.json is neither llava-hf (text_config) nor liuhaotian "
                      f"(mm_vision_tower) layout")


def _read_config_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None


def load_hf_config(model_dir: str, vision_dir: str | None = None) -> LlavaConfig:
    """LlavaConfig from model_dir/config.json (and vision_dir/config.json, the liuhaotian layout's
    CLIP tower). Raises ConfigError naming the file and the problem."""
    path = os.path.join(model_dir, "config.json")
    d = _read_config_json(path)
    vision = None
    if vision_dir is not None:
        vision_path = os.path.join(vision_dir, "config.json")
        vision = _read_config_json(vision_path)
        path = f"{path} (+ {vision_path})"
    try:
        return config_from_hf_dict(d, vision)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (ValueError, TypeError, KeyError) as e:  # a value of the wrong kind that no check above names
        raise ConfigError(f"{path}: unsupported config ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# Presets

PRESET_DIR = os.path.join(REPO, "configs")  # the repository's configs/ (a checkout or an editable install)


def list_presets() -> Sequence[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))


def load_preset(name: str) -> LlavaConfig:
    """A preset from configs/NAME.json (written in llava-hf config.json format)."""
    path = os.path.join(PRESET_DIR, f"{name}.json")
    if not os.path.exists(path):
        raise ConfigError(f"no preset {name!r}; have {list(list_presets())}")
    with open(path) as f:
        return config_from_hf_dict(json.load(f))


def save_config(cfg: LlavaConfig, path: str) -> None:
    with open(path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)


def load_config(path: str) -> LlavaConfig:
    with open(path) as f:
        return LlavaConfig.from_dict(json.load(f))
