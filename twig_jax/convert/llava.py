"""Hugging Face LLaVA-1.5 checkpoints -> twig_jax `Llava`, and the converted on-disk format.

Source layouts
  * llava-hf `LlavaForConditionalGeneration`, under any of the key-prefix styles transformers
    has written: "new" (`model.vision_tower.[vision_model.]*`, `model.multi_modal_projector.*`,
    `model.language_model.*`, `lm_head.weight`; transformers 4.52 - 4.x, or 5.x with
    `save_original_format=False`) and "old" (`vision_tower.[vision_model.]*`,
    `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`; the hub
    files, and what transformers 5 writes back by default).
  * liuhaotian `LlavaLlamaForCausalLM` (`model.embed_tokens`, `model.layers.{i}.*`, `model.norm`,
    `lm_head`, `model.mm_projector.{0,2}.*`) with the CLIP tower from a separate checkpoint
    (`vision_dir`: a CLIPVisionModel or a full CLIPModel) or, without one, embedded as
    `model.vision_tower.vision_tower.vision_model.*`.
Weight files: `model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
`pytorch_model.bin` and sharded `.bin` with `pytorch_model.bin.index.json`.

Tensors are read lazily, one at a time, straight into a preallocated stacked numpy array of the
target dtype, which then goes to the device; the checkpoint is never held twice in host memory.

Converted format (`convert`): DST/twig_jax.json (marker: format, version, dtype),
DST/config.json (`save_config` format), DST/params (orbax checkpoint of `nnx.state(model)`), and
the tokenizer / processor files copied from the source. It is written to a temporary sibling of
DST and renamed into place, so DST never holds a mix of two checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twig_jax.model.config import ConfigError, LlavaConfig, load_config, load_hf_config, save_config
from twig_jax.model.llava import Llava
from twig_jax.parallel import sharding as shd
from twig_jax.progress import Progress

MARKER_FILE = "twig_jax.json"
MARKER_FORMAT = "twig_jax.llava"
MARKER_VERSION = 1
PARAMS_DIR = "params"

# Copied verbatim from the source checkpoint (and, when absent there, from vision_dir).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "preprocessor_config.json", "processor_config.json", "added_tokens.json", "generation_config.json",
)
TOKENIZER_GLOBS = ("chat_template",)  # chat_template.json, chat_template.jinja, ...

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


class ConversionError(ValueError):
    """A checkpoint that cannot be turned into a twig_jax model (message says what and where)."""


def _first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line: readers (torch, safetensors, orbax) raise multi-line essays."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= limit else line[:limit] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _as_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"unsupported dtype {dtype!r}; use one of {sorted(set(DTYPES))}")
        dtype = DTYPES[dtype]
    dt = jnp.dtype(dtype)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ConversionError(f"unsupported dtype {dt}; use float32 or bfloat16")
    return dt


# ----------------------------------------------------------------------------------------------
# Lazy tensor sources


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:  # numpy has no bf16; reinterpret the bits as ml_dtypes' bfloat16
        return t.contiguous().view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()


class _TensorSource:
    """Every tensor in one checkpoint directory, by key; shapes without reading, data on demand."""

    def __init__(self, directory: str, stack: contextlib.ExitStack):
        self.directory = directory
        self.files = _weight_files(directory)
        self._where: dict[str, tuple[str, Any]] = {}  # key -> (file, handle)
        self.duplicates: list[str] = []
        for path in self.files:
            for key, handle in self._open(path, stack):
                if key in self._where:
                    self.duplicates.append(key)
                else:
                    self._where[key] = (path, handle)

    def _open(self, path: str, stack: contextlib.ExitStack) -> Iterable[tuple[str, Any]]:
        try:
            if path.endswith(".safetensors"):
                from safetensors import safe_open

                f = stack.enter_context(safe_open(path, framework="np"))
                return [(k, ("st", f, path)) for k in f.keys()]
            import torch  # only for .bin checkpoints

            try:
                sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict):
                raise ConversionError(f"{path}: not a state dict ({type(sd).__name__})")
            return [(k, ("pt", sd, path)) for k, v in sd.items() if hasattr(v, "shape")]
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad checkpoint file
            raise ConversionError(f"cannot read weight file {path}: {_first_line(e)}") from e

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        kind, h, _ = self._where[key][1]
        if kind == "st":
            return tuple(h.get_slice(key).get_shape())
        return tuple(h[key].shape)

    def get(self, key: str) -> np.ndarray:
        kind, h, path = self._where[key][1]
        try:
            if kind == "st":
                try:
                    return h.get_tensor(key)
                except (TypeError, ValueError):  # a dtype the numpy framework cannot give
                    from safetensors import safe_open

                    with safe_open(path, framework="pt") as f:
                        return _torch_to_numpy(f.get_tensor(key))
            return _torch_to_numpy(h[key])
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"cannot read tensor {key!r} from {path}: {_first_line(e)}") from e


def _weight_files(directory: str) -> list[str]:
    """The weight files of a HF checkpoint dir, safetensors preferred over .bin."""
    if not os.path.isdir(directory):
        raise ConversionError(f"{directory}: not a directory")
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(directory, index_name)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: unreadable shard index ({e})") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
            if missing:
                raise ConversionError(f"{index} names shard files that are missing: {missing}")
            return [os.path.join(directory, f) for f in files]
        if os.path.exists(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
    for pattern in (r"^model.*\.safetensors$", r"^pytorch_model.*\.bin$"):
        files = sorted(f for f in os.listdir(directory) if re.match(pattern, f))
        if files:
            return [os.path.join(directory, f) for f in files]
    return []


# ----------------------------------------------------------------------------------------------
# Key layouts: full checkpoint key -> (group, local key)
#
# Groups: "vision" (CLIP vision transformer, keys as in CLIPVisionTransformer: embeddings.*,
# pre_layrnorm.*, encoder.layers.*, post_layernorm.*), "projector" (linear_1.*, linear_2.*),
# "text" (LlamaModel: embed_tokens.*, layers.*, norm.*), "head" (weight).

_LLAVA_HF_STYLES = {
    "new": (
        ("model.vision_tower.vision_model.", "vision"), ("model.vision_tower.", "vision"),
        ("model.multi_modal_projector.", "projector"),
        ("model.language_model.", "text"),
        ("lm_head.", "head"),
    ),
    "old": (
        ("vision_tower.vision_model.", "vision"), ("vision_tower.", "vision"),
        ("multi_modal_projector.", "projector"),
        ("language_model.model.", "text"),
        ("language_model.lm_head.", "head"),
    ),
}
_LIUHAOTIAN = (
    ("model.vision_tower.vision_tower.vision_model.", "vision"),
    ("model.vision_tower.vision_tower.", "vision"),
    ("model.mm_projector.", "projector"),
    ("lm_head.", "head"),
    ("model.", "text"),
)
_CLIP = (("vision_model.", "vision"), ("", "vision"))
_CLIP_UNUSED = re.compile(r"^(text_model\.|logit_scale$|visual_projection\.|text_projection\.)")
_LIUHAOTIAN_PROJECTOR = {"0.": "linear_1.", "2.": "linear_2."}


def _detect_llava_hf_style(keys: Sequence[str]) -> str:
    new = sum(any(k.startswith(p) for p, _ in _LLAVA_HF_STYLES["new"]) for k in keys)
    old = sum(any(k.startswith(p) for p, _ in _LLAVA_HF_STYLES["old"]) for k in keys)
    return "new" if new > old else "old"


def _route(key: str, rules) -> tuple[str, str, str] | None:
    """(group, local key, prefix) for the first matching prefix rule."""
    for prefix, group in rules:
        if key.startswith(prefix):
            local = key[len(prefix):]
            if group == "projector" and rules is _LIUHAOTIAN:
                for old, new in _LIUHAOTIAN_PROJECTOR.items():
                    if local.startswith(old):
                        local = new + local[len(old):]
                        break
            return group, local, prefix
    return None


# ----------------------------------------------------------------------------------------------
# Parameter plan: model parameter -> checkpoint tensors


@dataclasses.dataclass(frozen=True)
class _Item:
    group: str
    local: str  # key inside the group
    transform: str  # "id" | "T" (Linear weight -> [in, out]) | "conv" (conv kernel -> [C*P*P, D])


def _plan(cfg: LlavaConfig, n_vision: int) -> dict[tuple[str, ...], list[_Item]]:
    """For each model parameter path: the checkpoint tensors, one per stacked slot (or one)."""
    plan: dict[tuple[str, ...], list[_Item]] = {}
    V = "vision"
    plan[("vision", "patch_embed")] = [_Item(V, "embeddings.patch_embedding.weight", "conv")]
    plan[("vision", "class_embed")] = [_Item(V, "embeddings.class_embedding", "id")]
    plan[("vision", "pos_embed")] = [_Item(V, "embeddings.position_embedding.weight", "id")]
    plan[("vision", "pre_ln_scale")] = [_Item(V, "pre_layrnorm.weight", "id")]
    plan[("vision", "pre_ln_bias")] = [_Item(V, "pre_layrnorm.bias", "id")]
    vision_block = {
        "ln1_scale": ("layer_norm1.weight", "id"), "ln1_bias": ("layer_norm1.bias", "id"),
        "wq": ("self_attn.q_proj.weight", "T"), "bq": ("self_attn.q_proj.bias", "id"),
        "wk": ("self_attn.k_proj.weight", "T"), "bk": ("self_attn.k_proj.bias", "id"),
        "wv": ("self_attn.v_proj.weight", "T"), "bv": ("self_attn.v_proj.bias", "id"),
        "wo": ("self_attn.out_proj.weight", "T"), "bo": ("self_attn.out_proj.bias", "id"),
        "ln2_scale": ("layer_norm2.weight", "id"), "ln2_bias": ("layer_norm2.bias", "id"),
        "w_fc1": ("mlp.fc1.weight", "T"), "b_fc1": ("mlp.fc1.bias", "id"),
        "w_fc2": ("mlp.fc2.weight", "T"), "b_fc2": ("mlp.fc2.bias", "id"),
    }
    for name, (local, tr) in vision_block.items():
        plan[("vision", "blocks", name)] = [_Item(V, f"encoder.layers.{i}.{local}", tr) for i in range(n_vision)]

    plan[("projector", "w1")] = [_Item("projector", "linear_1.weight", "T")]
    plan[("projector", "w2")] = [_Item("projector", "linear_2.weight", "T")]
    if cfg.projector_bias:
        plan[("projector", "b1")] = [_Item("projector", "linear_1.bias", "id")]
        plan[("projector", "b2")] = [_Item("projector", "linear_2.bias", "id")]

    tc = cfg.text
    plan[("text", "embed")] = [_Item("text", "embed_tokens.weight", "id")]
    plan[("text", "final_norm")] = [_Item("text", "norm.weight", "id")]
    if not tc.tie_word_embeddings:
        plan[("text", "lm_head")] = [_Item("head", "weight", "T")]
    text_layer = {
        "attn_norm": ("input_layernorm.weight", "id"), "mlp_norm": ("post_attention_layernorm.weight", "id"),
        "wq": ("self_attn.q_proj.weight", "T"), "wk": ("self_attn.k_proj.weight", "T"),
        "wv": ("self_attn.v_proj.weight", "T"), "wo": ("self_attn.o_proj.weight", "T"),
        "w_gate": ("mlp.gate_proj.weight", "T"), "w_up": ("mlp.up_proj.weight", "T"),
        "w_down": ("mlp.down_proj.weight", "T"),
    }
    if tc.attention_bias:
        text_layer.update(bq=("self_attn.q_proj.bias", "id"), bk=("self_attn.k_proj.bias", "id"),
                          bv=("self_attn.v_proj.bias", "id"), bo=("self_attn.o_proj.bias", "id"))
    if tc.mlp_bias:
        text_layer.update(b_gate=("mlp.gate_proj.bias", "id"), b_up=("mlp.up_proj.bias", "id"),
                          b_down=("mlp.down_proj.bias", "id"))
    for name, (local, tr) in text_layer.items():
        plan[("text", "layers", name)] = [
            _Item("text", f"layers.{i}.{local}", tr) for i in range(tc.num_hidden_layers)]
    return plan


def _source_shape(item: _Item, slot_shape: tuple[int, ...], cfg: LlavaConfig) -> tuple[int, ...]:
    """The checkpoint shape that yields a model slice of `slot_shape`."""
    if item.transform == "T":
        return tuple(reversed(slot_shape))
    if item.transform == "conv":
        v = cfg.vision
        return (slot_shape[1], v.num_channels, v.patch_size, v.patch_size)
    return slot_shape


def _apply(item: _Item, x: np.ndarray) -> np.ndarray:
    if item.transform == "T":
        return x.T
    if item.transform == "conv":
        return x.reshape(x.shape[0], -1).T
    return x


def _known_unused(group: str, local: str, cfg: LlavaConfig, n_vision: int) -> bool:
    """Checkpoint tensors the model legitimately does not use."""
    if group == "vision":
        if local.startswith("post_layernorm.") or local == "embeddings.position_ids":
            return True
        m = re.match(r"encoder\.layers\.(\d+)\.", local)
        return bool(m) and int(m.group(1)) >= n_vision  # blocks deeper than the feature layers
    if group == "text":
        return local.endswith("rotary_emb.inv_freq")
    if group == "head":
        return cfg.text.tie_word_embeddings  # a tied head is the embedding
    return False


# ----------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class _Entry:
    source: _TensorSource
    key: str  # full key in the source


def _has_weights(directory: str | None) -> bool:
    return directory is not None and bool(_weight_files(directory))


def load_hf_llava(model_dir: str, vision_dir: str | None = None, dtype=jnp.float32, *,
                  progress: bool = False, mesh=None) -> Llava:
    """A `Llava` with the weights of the HF checkpoint in `model_dir` (llava-hf or liuhaotian).

    `vision_dir`: CLIP checkpoint for the liuhaotian layout (config, and weights if it has any;
    otherwise the tower embedded in the main checkpoint is used).
    Raises ConversionError (one line) naming a config that is not LLaVA-1.5, or listing every
    missing, unexpected and wrongly shaped tensor. progress: a progress line of tensors read on
    stderr (twig_jax.progress). mesh: each parameter goes straight into its shards by the rule
    table (parallel/sharding.py) as it is read; it is never whole on one device.
    """
    dtype = _as_dtype(dtype)
    if is_converted(model_dir):
        raise ConversionError(f"{model_dir} is already a converted twig_jax checkpoint: load it with load_model "
                              f"(--model), there is nothing to convert")
    try:
        cfg = load_hf_config(model_dir, vision_dir)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    n_vision = max(cfg.feature_layers)
    abstract = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0), dtype=dtype))

    with contextlib.ExitStack() as stack:
        main = _TensorSource(model_dir, stack)
        if not main.files:
            raise ConversionError(f"{model_dir}: no weight files (model.safetensors, pytorch_model.bin, ...)")
        hf_cfg = _read_json(os.path.join(model_dir, "config.json"))
        liuhaotian = "text_config" not in hf_cfg and ("mm_vision_tower" in hf_cfg or "mm_projector_type" in hf_cfg)
        # (group, local) -> entry; and every source key with what became of it.
        table: dict[tuple[str, str], _Entry] = {}
        seen: dict[str, str] = {}  # group -> key prefix the checkpoint uses (to name missing keys)
        unexpected: list[str] = [f"{k} (duplicate, in {model_dir})" for k in main.duplicates]

        def add(source: _TensorSource, key: str, routed, use: bool = True):
            if routed is None:
                unexpected.append(key)
                return
            group, local, prefix = routed
            if not use or _known_unused(group, local, cfg, n_vision):
                return
            if (group, local) in table:
                unexpected.append(f"{key} (duplicate of {table[group, local].key})")
                return
            table[group, local] = _Entry(source, key)
            seen.setdefault(group, prefix)

        # vision_dir only means something for the liuhaotian layout (llava-hf embeds its tower).
        vision_from_dir = liuhaotian and _has_weights(vision_dir)
        if liuhaotian:
            rules = _LIUHAOTIAN
            default = dict(vision="model.vision_tower.vision_tower.vision_model.", projector="model.mm_projector.",
                           text="model.", head="lm_head.")
        else:
            rules = _LLAVA_HF_STYLES[_detect_llava_hf_style(main.keys())]
            default = {g: p for p, g in reversed(rules)}  # the first rule of each group
        for key in main.keys():
            routed = _route(key, rules)
            # With a separate CLIP checkpoint, a tower embedded in the main one is ignored.
            add(main, key, routed, use=not (vision_from_dir and routed is not None and routed[0] == "vision"))
        if vision_from_dir:
            clip = _TensorSource(vision_dir, stack)
            unexpected += [f"{k} (duplicate, in {vision_dir})" for k in clip.duplicates]
            default["vision"] = "vision_model."
            for key in clip.keys():
                if not _CLIP_UNUSED.match(key):
                    add(clip, key, _route(key, _CLIP))
        display = {**default, **seen}

        # Check everything against the plan, by shape only, before reading any data.
        plan = _plan(cfg, n_vision)
        params = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
        targets = dict(nnx.to_flat_state(shd.load_shardings(nnx.state(abstract, nnx.Param), mesh)))
        unplanned = sorted(set(params) - set(plan))
        if unplanned:  # a model parameter this converter does not know: a bug here, not in the checkpoint
            raise ConversionError(f"no checkpoint mapping for model parameters {unplanned}")
        missing, bad_shape, consumed = [], [], set()
        for path, items in plan.items():
            shape = tuple(params[path].get_value().shape)
            slot_shape = shape[1:] if _stacked(path) else shape
            for item in items:
                entry = table.get((item.group, item.local))
                if entry is None:
                    missing.append(display.get(item.group, "") + item.local)
                    continue
                consumed.add((item.group, item.local))
                want = _source_shape(item, slot_shape, cfg)
                found = entry.source.shape(entry.key)
                if tuple(found) != tuple(want):
                    bad_shape.append(f"{entry.key}: expected {list(want)}, found {list(found)}")
        unexpected += sorted(table[k].key for k in set(table) - consumed)
        if missing or unexpected or bad_shape:
            where = model_dir + (f" (+ vision {vision_dir})" if vision_dir else "")
            parts = [_listing(title, keys) for title, keys in (
                ("missing keys", missing), ("unexpected keys", unexpected), ("wrongly shaped keys", bad_shape))
                if keys]
            if missing and liuhaotian and any(k.startswith(display["vision"]) for k in missing):
                parts.append("the liuhaotian layout needs the CLIP tower: pass vision_dir (--vision-dir)")
            raise ConversionError(f"checkpoint {where} does not match the model config: " + "; ".join(parts))

        # Read and fill, one model parameter at a time.
        n_tensors = sum(len(items) for items in plan.values())
        with Progress(n_tensors, "tensors", label="convert", enabled=progress) as bar:
            for path, items in plan.items():
                var = params[path]
                shape = tuple(var.get_value().shape)
                buf = np.empty(shape, dtype)
                stacked = _stacked(path)
                for i, item in enumerate(items):
                    entry = table[item.group, item.local]
                    x = _apply(item, entry.source.get(entry.key))
                    if stacked:
                        buf[i] = x
                    else:
                        buf[...] = x
                    del x
                    bar.advance()
                var.set_value(jax.device_put(buf, _leaf(targets[path])))
                del buf
    return abstract


def _listing(title: str, keys: list[str], limit: int = 8) -> str:
    """'N title (k1, k2, ..., and M more)': one line however many keys a wrong layout gives."""
    shown = ", ".join(keys[:limit]) + (f", and {len(keys) - limit} more" if len(keys) > limit else "")
    return f"{len(keys)} {title} ({shown})"


def _stacked(path: tuple[str, ...]) -> bool:
    return path[:2] in (("vision", "blocks"), ("text", "layers"))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable ({e})") from e


# ----------------------------------------------------------------------------------------------
# Converted format


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER_FILE))


def _copy_tokenizer_files(src: str, dst: str, fallback: str | None = None) -> list[str]:
    copied = []
    for directory in (src, fallback):
        if directory is None or not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            if name in TOKENIZER_FILES or name.startswith(TOKENIZER_GLOBS):
                if name in copied or not os.path.isfile(os.path.join(directory, name)):
                    continue
                if directory is fallback and name != "preprocessor_config.json":
                    continue  # only the image processor config comes from the CLIP checkpoint
                shutil.copy2(os.path.join(directory, name), os.path.join(dst, name))
                copied.append(name)
    return copied


def _relation(dst: str, source: str) -> str | None:
    """How the real path dst lies against the real path source: "is", "is inside", "contains" or None."""
    if dst == source:
        return "is"
    if dst.startswith(source.rstrip(os.sep) + os.sep):
        return "is inside"
    if source.startswith(dst.rstrip(os.sep) + os.sep):
        return "contains"
    return None


def _check_destination(dst: str, sources: dict[str, str | None], overwrite: bool) -> None:
    """Refuse, before anything is read, a destination that is or holds a source, that is not a
    directory, or (without overwrite) that holds anything at all."""
    for what, source in sources.items():
        if source is None:
            continue
        relation = _relation(dst, os.path.realpath(source))
        if relation is not None:
            raise ConversionError(f"destination {dst} {relation} the source {what} {source}: "
                                  f"write the converted checkpoint elsewhere")
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise ConversionError(f"destination {dst} exists and is not a directory")
    # The temporary sibling goes into dst's parent: check the nearest existing ancestor now rather
    # than after reading the whole checkpoint.
    ancestor = os.path.dirname(dst)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConversionError(f"cannot create destination {dst}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot create destination {dst}: {ancestor} is not writable")
    if not os.path.isdir(dst):
        return
    try:
        names = sorted(os.listdir(dst))
    except OSError as e:
        raise ConversionError(f"destination {dst}: cannot list it ({e.strerror or e})") from None
    if names and not overwrite:
        if is_converted(dst):
            held = "a converted twig_jax checkpoint"
        else:
            held = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        raise ConversionError(f"destination {dst} is not empty: it already holds {held}; pass --force "
                              f"(overwrite=True) to replace the whole directory")


def _replace_directory(new: str, dst: str) -> None:
    """Put the directory `new` at `dst`, replacing what dst held as a whole: the old directory is
    moved aside, and deleted only once `new` is in place (on failure it is moved back)."""
    if not os.path.lexists(dst) or (os.path.isdir(dst) and not os.listdir(dst)):
        os.rename(new, dst)  # rename replaces an empty directory
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.replaced-", dir=os.path.dirname(dst))
    os.rename(dst, old)
    try:
        os.rename(new, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_converted(model: Llava, directory: str, src: str, vision_dir: str | None, dtype) -> None:
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(directory, PARAMS_DIR), nnx.state(model))
            ckptr.wait_until_finished()
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types
        raise ConversionError(f"writing the parameters to {directory} failed: {_first_line(e)}") from e
    save_config(model.cfg, os.path.join(directory, "config.json"))
    copied = _copy_tokenizer_files(src, directory, vision_dir)
    marker = {
        "format": MARKER_FORMAT, "version": MARKER_VERSION, "dtype": jnp.dtype(dtype).name,
        "source": os.path.abspath(src), "vision_dir": os.path.abspath(vision_dir) if vision_dir else None,
        "copied_files": copied,
    }
    # Written last: a directory without the marker is not a (complete) converted checkpoint.
    with open(os.path.join(directory, MARKER_FILE), "w") as f:
        json.dump(marker, f, indent=2)


def convert(src: str, dst: str, dtype="float32", vision_dir: str | None = None, *, overwrite: bool = False,
            progress: bool = False) -> str:
    """Convert the HF checkpoint `src` into the twig_jax format in `dst`; returns dst.

    dst must be absent or empty unless overwrite, which replaces the whole directory; it may never
    be, hold or lie inside src or vision_dir. The checkpoint is written to a temporary sibling of
    dst and renamed into place, so dst holds either what it held before or the whole converted
    checkpoint, never a mix. progress: a progress line of tensors read on stderr.
    """
    dt = _as_dtype(dtype)
    dst = os.path.realpath(dst)  # a link to a directory: replace the directory it names
    _check_destination(dst, {"checkpoint": src, "CLIP checkpoint (vision_dir)": vision_dir}, overwrite)
    model = load_hf_llava(src, vision_dir, dt, progress=progress)  # a bad source leaves dst as it was
    parent = os.path.dirname(dst)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.converting-", dir=parent)
    except OSError as e:
        raise ConversionError(f"cannot write into {parent} for {dst} ({e.strerror or e})") from None
    try:
        _write_converted(model, tmp, src, vision_dir, dt)
        _replace_directory(tmp, dst)
    except OSError as e:
        raise ConversionError(f"cannot write the converted checkpoint {dst} ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed into place
    return dst


def _leaf(x):
    """The value of a flat-state entry (a Variable or the bare leaf)."""
    return x.get_value() if hasattr(x, "get_value") else x


def _load_converted(path: str, dtype=None, mesh=None) -> Llava:
    marker = _read_json(os.path.join(path, MARKER_FILE))
    if marker.get("format") != MARKER_FORMAT:
        raise ConversionError(f"{path}: {MARKER_FILE} is not a twig_jax checkpoint marker")
    if marker.get("version", 0) > MARKER_VERSION:
        raise ConversionError(f"{path}: checkpoint format version {marker['version']} is newer than supported")
    try:
        cfg = load_config(os.path.join(path, "config.json"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{path}: bad config.json in converted checkpoint ({e})") from e
    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))  # orbax needs an absolute path
    if not os.path.isdir(params_dir):
        raise ConversionError(f"{path}: converted checkpoint has no {PARAMS_DIR}/ directory")
    stored = _as_dtype(marker.get("dtype", "float32"))
    dt = stored if dtype is None else _as_dtype(dtype)
    abstract = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0), dtype=dt))
    graphdef, abstract_state = nnx.split(abstract)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
                          shd.load_shardings(abstract_state, mesh))

    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    try:
        state = ckptr.restore(params_dir, target)
        ckptr.close()
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types on damaged files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConversionError(
            f"{params_dir}: corrupt or incomplete converted checkpoint ({type(e).__name__}: {first[:500]})") from e
    want = {p: (v.shape, v.dtype) for p, v in nnx.to_flat_state(target)}
    got = {p: (tuple(v.get_value().shape), v.get_value().dtype) for p, v in nnx.to_flat_state(state)}
    if want.keys() != got.keys() or any(tuple(want[p][0]) != got[p][0] for p in want):
        bad = sorted(str(p) for p in want if p not in got or tuple(want[p][0]) != got[p][0])
        raise ConversionError(f"{params_dir}: restored parameters do not match config.json: {bad}")
    return nnx.merge(graphdef, state)


def load_model(path: str, dtype=None, vision_dir: str | None = None, mesh=None) -> Llava:
    """A `Llava` from a converted twig_jax dir or a HF checkpoint dir (detected).

    dtype: None keeps the converted dtype (float32 for HF checkpoints). vision_dir only matters
    for HF checkpoints in the liuhaotian layout. mesh: restore every parameter straight into its
    shards by the rule table (orbax with target shardings, or placed as the HF tensors are read).
    """
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such checkpoint directory")
    if is_converted(path):
        return _load_converted(path, dtype, mesh)
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        raise ConversionError(f"{path}: has {PARAMS_DIR}/ but no {MARKER_FILE}: incomplete converted checkpoint")
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_hf_llava(path, vision_dir, jnp.float32 if dtype is None else dtype, mesh=mesh)
    raise ConversionError(f"{path}: neither a converted twig_jax checkpoint nor a HF checkpoint (no config.json)")


# ----------------------------------------------------------------------------------------------
# CLI


def convert_main(argv: Sequence[str] | None = None) -> int:
    """`twig-jax convert SRC DST [--dtype float32|bfloat16] [--vision-dir DIR] [--force]`.

    Exit status 2 with one line on stderr for any input it cannot convert."""
    p = argparse.ArgumentParser(prog="twig-jax convert",
                                description="Convert a HF LLaVA-1.5 checkpoint to the twig_jax format.")
    p.add_argument("src", help="HF checkpoint dir (llava-hf or liuhaotian layout)")
    p.add_argument("dst", help="output dir: absent or empty, or replaced as a whole with --force")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--vision-dir", default=None, help="CLIP checkpoint dir (liuhaotian layout)")
    p.add_argument("--force", action="store_true", help="replace DST, whatever it holds, as a whole")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.dtype, args.vision_dir, overwrite=args.force, progress=True)
    except (ConversionError, ConfigError) as e:
        line = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
        print(f"twig-jax convert: error: {line}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {out} ({args.dtype})")
    return 0


__all__ = ["ConversionError", "load_hf_llava", "convert", "load_model", "convert_main", "is_converted"]


def save_converted_model(model: Llava, directory: str, tokenizer=None, preprocessor_from: str | None = None) -> str:
    """Write an in-memory model as a converted twig_jax checkpoint dir (as `convert.convert` does:
    orbax params/, config.json, the marker written last) plus the tokenizer when given, and the
    image preprocessing (preprocessor_config.json) of the model dir `preprocessor_from` if it has one."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    from twig_jax.model.config import save_config
    from twig_jax.convert.llava import MARKER_FILE, MARKER_FORMAT, MARKER_VERSION, PARAMS_DIR

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_DIR), nnx.state(model))
        ckptr.wait_until_finished()
    save_config(model.cfg, os.path.join(directory, "config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if preprocessor_from is not None:
        pre = os.path.join(preprocessor_from, "preprocessor_config.json")
        if os.path.exists(pre):
            shutil.copy(pre, directory)
    marker = {"format": MARKER_FORMAT, "version": MARKER_VERSION,
              "dtype": jnp.dtype(model.text.embed[...].dtype).name, "source": "in-memory", "vision_dir": None,
              "copied_files": []}
    with open(os.path.join(directory, MARKER_FILE), "w") as f:
        json.dump(marker, f, indent=2)
    return directory
