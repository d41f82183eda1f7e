"""Shared test fixtures: tiny random HF LLaVA checkpoints built locally (nothing is downloaded).

Fixtures (session-scoped, built once per test session):
  hf_llava_mha, hf_llava_gqa -> TinyLlava(dir, model, cfg): a saved llava-hf checkpoint dir
      (safetensors, transformers' default key style), the float32 eager torch model in eval mode,
      and our LlavaConfig read back from the dir with `load_hf_config`.
  tiny_llava -> factory(**make_tiny_hf_llava kwargs) -> TinyLlava, cached per kwargs.
  llava_inputs -> make_llava_inputs (function fixture).
  tiny_liuhaotian -> TinyLiuhaotian(dir, vision_dir, hf): the MHA model's weights in the liuhaotian
      layout as published (no image_token_index, a LLaMA tokenizer without <image>, the CLIP tower
      in its own checkpoint), with the llava-hf oracle it came from.
Helpers (also importable: `from conftest import make_llava_inputs, hf_logits, jax_logits`):
  make_llava_inputs(cfg, batch=2, ...) -> (input_ids int64 [B, S], pixel_values float32 [B, C, H, W]),
      each row with exactly cfg.num_image_tokens image placeholders (one image per row).
  hf_logits(torch_model, input_ids, pixel_values) -> np.ndarray [B, S, V] float32
  jax_logits(llava, input_ids, pixel_values) -> np.ndarray [B, S, V] float32 (jitted forward)
  sharpened_tiny_llava(head_scale) -> twig_jax Llava of the "tiny" preset with 4x query / key
      weights and a head_scale x LM head (peaky attention and next-token distributions)
  (pixel_values may be None for text-only input in both)
Several devices (the pytest process keeps one; a test module runs one subprocess for all its cases):
  start_on_8_devices(code, fast_compile=False) -> Popen of `python -c code` on 8 simulated CPU devices
  finish(proc, timeout) -> its output (asserts exit status 0, showing the output's end otherwise)
  json_from_8_devices("module:function", path) -> the JSON that function(path) wrote on 8 devices
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any, NamedTuple

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_on_8_devices(code: str, *, fast_compile: bool = False) -> subprocess.Popen:
    """`python -c code` from the repository root on 8 simulated CPU devices, stdout and stderr
    together. fast_compile: LLVM at -O0 (the same HLO, about half the compile time)."""
    flags = "--xla_force_host_platform_device_count=8" + (" --xla_backend_optimization_level=0" if fast_compile else "")
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    """The process's output once it exits with status 0."""
    log, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, log[-5000:]
    return log


def json_from_8_devices(function: str, path: str, *, fast_compile: bool = False, timeout: float = 1200) -> Any:
    """Call `function` ("package.module:name", importable from the repository root) with `path` on
    8 simulated devices and return the JSON it wrote there."""
    module, name = function.split(":")
    finish(start_on_8_devices(f"from {module} import {name}; {name}({path!r})", fast_compile=fast_compile), timeout)
    with open(path) as f:
        return json.load(f)

VOCAB = 200
IMAGE_TOKEN = 199
IMAGE_SIZE = 28
PATCH = 7


class TinyLlava(NamedTuple):
    dir: str
    model: Any  # transformers.LlavaForConditionalGeneration (eval, float32, eager attention)
    cfg: Any  # twig_jax.model.config.LlavaConfig


def tiny_hf_configs(*, gqa: bool, vision_feature_layer=-2, select_strategy="default", tie=False):
    """(CLIPVisionConfig, LlamaConfig, LlavaConfig) of the tiny test model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=16, hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=256,
                     rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    n_img = (IMAGE_SIZE // PATCH) ** 2 + (1 if select_strategy == "full" else 0)
    if isinstance(vision_feature_layer, tuple):
        vision_feature_layer = list(vision_feature_layer)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, image_seq_length=n_img,
                      vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=select_strategy,
                      tie_word_embeddings=tie, pad_token_id=0)
    return vc, tc, cfg


def randomize_(model, seed: int) -> None:
    """Re-initialise every parameter with O(1)-scale values so logits are far from 0."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or "layrnorm" in name:  # LayerNorm / RMSNorm
                p.copy_(1.0 + 0.2 * noise if leaf == "weight" else 0.2 * noise)
            elif leaf == "bias":
                p.copy_(0.2 * noise)
            elif "embed" in name or p.ndim == 1:  # token / position / class embeddings
                p.copy_(noise)
            else:  # Linear / conv weights: unit-variance outputs
                p.copy_(noise / math.sqrt(p[0].numel()))


def make_tiny_hf_llava(tmpdir, *, gqa: bool, vision_feature_layer=-2, select_strategy="default", seed=0,
                       tie=False, save: bool = True, **save_kwargs) -> TinyLlava:
    """Build a tiny random `LlavaForConditionalGeneration`, save_pretrained it into `tmpdir`.

    CLIP vision: hidden 32, 3 layers, 4 heads, image 28, patch 7 (16 patches). LLaMA: vocab 200,
    hidden 64, 2 layers, 4 heads, 4 (MHA) or 2 (GQA) kv heads, intermediate 128.
    image_token_index 199. Extra kwargs go to save_pretrained (e.g. max_shard_size).
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    from twig_jax.model.config import load_hf_config

    *_, cfg = tiny_hf_configs(gqa=gqa, vision_feature_layer=vision_feature_layer,
                              select_strategy=select_strategy, tie=tie)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    if tie:
        model.tie_weights()
    model = model.float().eval()
    tmpdir = str(tmpdir)
    if save:
        model.save_pretrained(tmpdir, **save_kwargs)
    return TinyLlava(tmpdir, model, load_hf_config(tmpdir) if save else None)


def make_llava_inputs(cfg, *, batch: int = 2, prefix: int = 3, suffix: int = 5, seed: int = 0):
    """input_ids [B, S] (int64) with exactly cfg.num_image_tokens image tokens per row, at a
    different offset in each row, and pixel_values [B, C, H, W] (float32, CLIP-normalised scale)."""
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    s = prefix + n + suffix + batch
    vocab = cfg.text.vocab_size
    ids = rng.integers(0, vocab - 1, size=(batch, s))
    ids[ids >= cfg.image_token_index] += 1  # never the image token by chance
    for b in range(batch):
        start = prefix + b
        ids[b, start:start + n] = cfg.image_token_index
    v = cfg.vision
    pixels = rng.standard_normal((batch, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return ids.astype(np.int64), pixels


def hf_logits(model, input_ids, pixel_values) -> np.ndarray:
    import torch

    pix = None if pixel_values is None else torch.as_tensor(np.asarray(pixel_values, np.float32))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long), pixel_values=pix)
    return out.logits.float().numpy()


_JIT_FORWARD = None


def jax_logits(llava, input_ids, pixel_values) -> np.ndarray:
    global _JIT_FORWARD
    import jax.numpy as jnp
    from flax import nnx

    if _JIT_FORWARD is None:
        _JIT_FORWARD = nnx.jit(lambda m, t, p: m(t, p))
    pix = None if pixel_values is None else jnp.asarray(np.asarray(pixel_values, np.float32))
    out = _JIT_FORWARD(llava, jnp.asarray(np.asarray(input_ids), jnp.int32), pix)
    return np.asarray(out, np.float32)


def sharpened_tiny_llava(head_scale: float):
    """The "tiny" preset LLaVA (twig_jax, seed 0) with sharpened attention (4x W_q, W_k) and a
    head_scale x LM head, so that greedy choices are decided and draft confidences vary."""
    from flax import nnx

    from twig_jax.model.config import load_preset
    from twig_jax.model.llava import Llava

    model = Llava(load_preset("tiny"), rngs=nnx.Rngs(0))
    model.text.layers.wq[...] = model.text.layers.wq[...] * 4
    model.text.layers.wk[...] = model.text.layers.wk[...] * 4
    model.text.lm_head[...] = model.text.lm_head[...] * head_scale
    return model


def rel_err(a, b) -> float:
    """max|a - b| / max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """Factory: tiny_llava(gqa=..., vision_feature_layer=..., select_strategy=..., seed=..., tie=...)
    -> TinyLlava, built once per distinct kwargs for the whole session. Do not mutate the result."""
    cache: dict = {}

    def make(**kwargs) -> TinyLlava:
        kwargs.setdefault("gqa", False)
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
        if key not in cache:
            name = "hf_" + "_".join(f"{k}{v}" for k, v in key).replace(" ", "").replace(",", "_")
            name = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:80]
            cache[key] = make_tiny_hf_llava(tmp_path_factory.mktemp(name), **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def hf_llava_mha(tiny_llava) -> TinyLlava:
    return tiny_llava(gqa=False)


@pytest.fixture(scope="session")
def hf_llava_gqa(tiny_llava) -> TinyLlava:
    return tiny_llava(gqa=True)


@pytest.fixture(scope="session")
def llava_inputs():
    return make_llava_inputs


# ----------------------------------------------------------------------------------------------
# The original liuhaotian layout, shaped like liuhaotian/llava-v1.5-7b as published


TINY_LLAMA_WORDS = ("what", "is", "in", "the", "image", "USER", "ASSISTANT", "this", "color", "shape", "chat")


class TinyLiuhaotian(NamedTuple):
    dir: str  # LlavaLlamaForCausalLM checkpoint: .bin shards + index, config.json and a LLaMA tokenizer
    vision_dir: str  # the CLIP tower: a CLIPVisionModel checkpoint with its preprocessor_config.json
    hf: TinyLlava  # the llava-hf oracle with the same weights; its vocabulary has one more row, for <image>


def tiny_llama_tokenizer(vocab_size: int):
    """A LLaMA BPE tokenizer (Metaspace, BOS on every call) of exactly `vocab_size` pieces and no
    `<image>` token, as the published liuhaotian tokenizer has none."""
    from transformers import LlamaTokenizer

    pieces = ["<unk>", "<s>", "</s>"] + list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:;'\"()-\n<>/")
    merges = []
    for word in TINY_LLAMA_WORDS:
        cur = "▁"
        for c in word:
            if cur + c not in pieces:
                merges.append((cur, c))
                pieces.append(cur + c)
            cur += c
    letters = "etaoinshrdlcumwfgypbvk"
    for a in letters:  # fill up to vocab_size with letter pairs
        for b in letters:
            if len(pieces) >= vocab_size:
                break
            if a + b not in pieces:
                merges.append((a, b))
                pieces.append(a + b)
    assert len(pieces) == vocab_size and "<image>" not in pieces
    return LlamaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, legacy=False,
                          add_bos_token=True, add_eos_token=False)


def make_tiny_liuhaotian(tmpdir, hf: TinyLlava) -> TinyLiuhaotian:
    """Write `hf`'s weights as liuhaotian/llava-v1.5 publishes them: config.json without
    image_token_index, a tokenizer without `<image>` whose size is the config's vocab_size (the
    llava-hf row for <image> dropped), weights in sharded pytorch_model-*.bin files, and the CLIP
    tower named by mm_vision_tower in its own checkpoint."""
    import json

    import torch
    from transformers import CLIPVisionModel

    tmpdir = str(tmpdir)
    model_dir, vision_dir = os.path.join(tmpdir, "llava-v1.5"), os.path.join(tmpdir, "clip")
    os.makedirs(model_dir)
    vocab = hf.cfg.text.vocab_size - 1  # the llava-hf checkpoint's last row is the <image> token it added
    assert hf.cfg.image_token_index == vocab
    sd = {k: v.detach().clone() for k, v in hf.model.state_dict().items()}
    main = {}
    for key, value in sd.items():
        if key.startswith("model.language_model."):
            main["model." + key[len("model.language_model."):]] = value
        elif key.startswith("model.multi_modal_projector.linear_"):
            layer = {"1": "0", "2": "2"}[key[len("model.multi_modal_projector.linear_")]]
            main[f"model.mm_projector.{layer}." + key.rsplit(".", 1)[1]] = value
        elif key == "lm_head.weight":
            main[key] = value
    main["model.embed_tokens.weight"] = main["model.embed_tokens.weight"][:vocab].clone()
    main["lm_head.weight"] = main["lm_head.weight"][:vocab].clone()
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    keys = sorted(main)
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: main[k] for k in keys[i::2]}
        torch.save(part, os.path.join(model_dir, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(model_dir, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)

    tc, vc = hf.model.config.text_config, hf.model.config.vision_config
    config = {  # the keys of liuhaotian/llava-v1.5-7b's config.json, at the tiny model's sizes
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "hidden_act": "silu",
        "hidden_size": tc.hidden_size, "image_aspect_ratio": "pad", "initializer_range": 0.02,
        "intermediate_size": tc.intermediate_size, "max_position_embeddings": tc.max_position_embeddings,
        "mm_hidden_size": vc.hidden_size, "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "tiny/clip-vit-tiny-patch7-28", "model_type": "llava",
        "num_attention_heads": tc.num_attention_heads, "num_hidden_layers": tc.num_hidden_layers,
        "num_key_value_heads": tc.num_key_value_heads, "pad_token_id": 0, "pretraining_tp": 1,
        "rms_norm_eps": tc.rms_norm_eps, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False, "tune_mm_vision_resampler": False, "unfreeze_mm_vision_tower": False,
        "use_cache": True, "use_mm_proj": True, "vocab_size": vocab,
    }
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096}, f)
    tiny_llama_tokenizer(vocab).save_pretrained(model_dir)

    clip = CLIPVisionModel(vc)
    clip.load_state_dict(hf.model.model.vision_tower.state_dict())
    clip.save_pretrained(vision_dir)
    with open(os.path.join(vision_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": IMAGE_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                   "feature_extractor_type": "CLIPFeatureExtractor",
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": IMAGE_SIZE}, f)
    return TinyLiuhaotian(model_dir, vision_dir, hf)


@pytest.fixture(scope="session")
def tiny_liuhaotian(tmp_path_factory, hf_llava_mha) -> TinyLiuhaotian:
    """The MHA tiny model in the liuhaotian layout as published (see make_tiny_liuhaotian)."""
    return make_tiny_liuhaotian(tmp_path_factory.mktemp("liuhaotian"), hf_llava_mha)
