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
        if not 0 <= self.image_token_index < self.text.vocab_size:
            raise ConfigError(
                f"image_token_index {self.image_token_index} outside the vocabulary (size {self.text.vocab_size})")
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


def _rope_theta(d: dict[str, Any]) -> float:
    """rope_theta from either the old flat key or transformers 5's `rope_parameters`."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    for spec in (params, scaling or {}):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in ("default", None):
            raise ConfigError(f"RoPE type {kind!r} is not supported (only the default rotate-half RoPE)")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def text_config_from_hf(d: dict[str, Any]) -> TextConfig:
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


def vision_config_from_hf(d: dict[str, Any]) -> VisionConfig:
    if "vision_config" in d:  # a full CLIPModel config.json
        d = d["vision_config"]
    return _pick(d, VisionConfig)


def config_from_hf_dict(d: dict[str, Any], vision: dict[str, Any] | None = None) -> LlavaConfig:
    """LlavaConfig from a parsed HF config.json of either layout.

    `vision` is the CLIP config for the liuhaotian layout (which only names its tower); when
    absent, the tower is assumed to be CLIP ViT-L/14-336 if the name says so.
    """
    # liuhaotian checkpoints also say model_type "llava", so the mm_* keys decide first.
    is_liuhaotian = "text_config" not in d and ("mm_vision_tower" in d or "mm_projector_type" in d)
    if not is_liuhaotian and ("text_config" in d or d.get("model_type") == "llava"):
        text_d = dict(d.get("text_config") or {})
        text_d.setdefault("vocab_size", d.get("vocab_size", 32064))
        # transformers ties the LM head when either the top-level or the text config says so.
        text_d["tie_word_embeddings"] = bool(d.get("tie_word_embeddings")) or bool(text_d.get("tie_word_embeddings"))
        layer = d.get("vision_feature_layer", -2)
        return LlavaConfig(
            vision=vision_config_from_hf(d.get("vision_config") or {}),
            text=text_config_from_hf(text_d),
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=d.get("multimodal_projector_bias", True),
            vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
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
            vision_cfg = vision_config_from_hf(vision)
        if d.get("mm_hidden_size") not in (None, vision_cfg.hidden_size):
            raise ConfigError(f"mm_hidden_size {d['mm_hidden_size']} != vision hidden_size {vision_cfg.hidden_size}")
        select = d.get("mm_vision_select_feature", "patch")
        return LlavaConfig(
            vision=vision_cfg,
            text=text_config_from_hf(d),
            # liuhaotian's LLaVA uses -200 in the prompt; converted checkpoints use a real id.
            image_token_index=d.get("image_token_index", 32000),
            projector_hidden_act="gelu",
            vision_feature_layer=d.get("mm_vision_select_layer", -2),
            vision_feature_select_strategy={"patch": "default", "cls_patch": "full"}[select],
        ).validate()
    raise ConfigError("config.json is neither llava-hf (text_config) nor liuhaotian (mm_vision_tower) layout")


def load_hf_config(model_dir: str, vision_dir: str | None = None) -> LlavaConfig:
    with open(os.path.join(model_dir, "config.json")) as f:
        d = json.load(f)
    vision = None
    if vision_dir is not None:
        with open(os.path.join(vision_dir, "config.json")) as f:
            vision = json.load(f)
    return config_from_hf_dict(d, vision)


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
