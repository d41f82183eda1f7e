"""Twig checkpoints: the MILVLG/twigvlm safetensors format and an orbax format.

MILVLG format (docs/design.md, "The twig"): PyTorch-layout keys for T layers, the twig norm and the D-head:
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight     [out, in]   (ours: [in, out])
    model.layers.{i}.mlp.{gate,up,down}_proj.weight      [out, in]
    model.layers.{i}.input_layernorm.weight              [D]
    model.layers.{i}.post_attention_layernorm.weight     [D]
    model.norm.weight                                    [D]
    lm_head.weight                                       [V, D]      (ours: [D, V])
(+ `self_attn.{q,k,v,o}_proj.bias` / `mlp.*_proj.bias` when the text config has biases.)

orbax format: a directory holding `twig_config.json` (TwigConfig + the TextConfig the twig was
built for) and `params/` (the twig's nnx.State via StandardCheckpointer). By convention it sits
beside a converted base (`<base_dir>/twig/`), but any directory works.
"""

from __future__ import annotations

import dataclasses
import json
import os
import numpy as np


import jax
import jax.numpy as jnp
from flax import nnx

from twig_jax.model.config import TextConfig
from twig_jax.parallel import sharding as shd
from twig_jax.twig.module import Twig
from twig_jax.twig.config import TwigConfig

TWIG_CONFIG_FILE = "twig_config.json"
TWIG_PARAMS_DIR = "params"
MILVLG_FILE = "model.safetensors"  # the MILVLG export inside a twig directory
TRAINING_RECORD_FILE = "training.json"  # how the twig or model in a directory was trained
# Everything a directory of ours may hold: the twig, its MILVLG export, its training record and the
# logs twig-jax train-phead writes beside it. A directory with anything else is not replaced
# without force.
TWIG_DIR_ENTRIES = frozenset({TWIG_CONFIG_FILE, TWIG_PARAMS_DIR, MILVLG_FILE, TRAINING_RECORD_FILE,
                              "rl_log.jsonl", "rl_eval.jsonl", "rl_config.json"})

# our DecoderLayers name -> (PyTorch key suffix, transposed)
_LAYER_KEYS = {
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
    "attn_norm": ("input_layernorm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "bo": ("self_attn.o_proj.bias", False),
    "b_gate": ("mlp.gate_proj.bias", False),
    "b_up": ("mlp.up_proj.bias", False),
    "b_down": ("mlp.down_proj.bias", False),
}


class TwigFormatError(ValueError):
    """A twig checkpoint that does not match the expected keys / shapes."""


def twig_to_milvlg(twig: Twig) -> dict[str, np.ndarray]:
    """The twig as a {MILVLG key: array in PyTorch layout} dict."""
    out = {}
    for name, stacked in twig.layers.weights().items():
        suffix, transpose = _LAYER_KEYS[name]
        for i in range(stacked.shape[0]):
            a = stacked[i]
            out[f"model.layers.{i}.{suffix}"] = a.T if transpose else a
    out["model.norm.weight"] = twig.norm.get_value()
    out["lm_head.weight"] = twig.head.get_value().T  # [V, D]
    return out


def expected_milvlg_shapes(text_cfg: TextConfig, T: int) -> dict[str, tuple[int, ...]]:
    """Key -> PyTorch-layout shape of a twig with T layers for text_cfg."""
    abstract = nnx.eval_shape(lambda: Twig(text_cfg, TwigConfig(K=1, T=T, Kf=T + 1, R=1), rngs=nnx.Rngs(0)))
    out = {}
    for name, stacked in nnx.to_pure_dict(nnx.state(abstract.layers)).items():
        suffix, transpose = _LAYER_KEYS[name]
        shape = tuple(stacked.shape[1:])
        for i in range(T):
            out[f"model.layers.{i}.{suffix}"] = shape[::-1] if transpose else shape
    out["model.norm.weight"] = (text_cfg.hidden_size,)
    out["lm_head.weight"] = (text_cfg.vocab_size, text_cfg.hidden_size)
    return out


def is_twig_export(path: str) -> bool:
    """Whether `path` is MILVLG safetensors written by export_milvlg (its metadata has a twig_config)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return "twig_config" in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - not safetensors at all (or unreadable): not ours
        return False


def _model_files(directory: str, keep: str) -> list[str]:
    """Entries of `directory` that make it a model checkpoint (a Hugging Face or converted config,
    a converted-model marker, a sharded-weights index), other than `keep`."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if n != keep and (
        n in ("config.json", "twig_jax.json") or n.endswith(".index.json")))


def export_milvlg(twig: Twig, path: str, *, dtype=None, overwrite: bool = False, force: bool = False) -> str:
    """Write the twig as MILVLG safetensors (`path` is a file, or a dir -> dir/model.safetensors).

    The file is written beside its target and renamed over it, so a failed export leaves what was
    there. An existing twig export is replaced only with `overwrite`; any other existing file, or a
    target in a directory that holds a model's weights or config, only with `force`.
    """
    import tempfile

    from safetensors.flax import save_file

    if os.path.isdir(path):
        path = os.path.join(path, MILVLG_FILE)
    path = os.path.realpath(path)
    parent, name = os.path.split(path)
    if os.path.exists(path) and not force:
        if not is_twig_export(path):
            raise TwigFormatError(f"{path} exists and is not a twig export: refusing to replace it (force=True "
                                  "replaces it)")
        if not overwrite:
            raise TwigFormatError(f"{path} already holds a twig export (pass overwrite=True)")
    foreign = _model_files(parent, name)
    if foreign and not force:
        raise TwigFormatError(f"{parent} holds a model ({', '.join(foreign[:4])}): refusing to write {name} into it "
                              "(force=True writes it)")
    tensors = {k: jnp.asarray(v if dtype is None else v.astype(dtype)) for k, v in twig_to_milvlg(twig).items()}
    meta = {"format": "pt", "twig_config": json.dumps(dataclasses.asdict(twig.twig_cfg))}
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _read_safetensors(path: str) -> dict[str, jax.Array]:
    from safetensors.flax import load_file

    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise TwigFormatError(f"{path}: no .safetensors files")
        out = {}
        for f in files:
            out.update(load_file(os.path.join(path, f)))
        return out
    if not os.path.isfile(path):
        raise TwigFormatError(f"{path}: no such twig checkpoint")
    return load_file(path)


def import_milvlg(path: str, text_cfg: TextConfig, twig_cfg: TwigConfig, *, dtype=jnp.float32,
                  strict: bool = False) -> Twig:
    """A Twig from MILVLG safetensors. Missing or misshaped keys raise TwigFormatError listing
    them all; unexpected keys are an error only when `strict` (released checkpoints may carry
    extra heads)."""
    tensors = _read_safetensors(path)
    want = expected_milvlg_shapes(text_cfg, twig_cfg.T)
    missing = sorted(k for k in want if k not in tensors)
    bad = sorted(f"{k}: got {tuple(tensors[k].shape)}, expected {want[k]}" for k in want
                 if k in tensors and tuple(tensors[k].shape) != want[k])
    extra = sorted(k for k in tensors if k not in want)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if bad:
        problems.append(f"misshaped keys ({len(bad)}): {bad}")
    if strict and extra:
        problems.append(f"unexpected keys ({len(extra)}): {extra}")
    if problems:
        raise TwigFormatError(f"{path}: not a twig with T={twig_cfg.T} for this base: " + "; ".join(problems))
    if twig_cfg.p_head:
        raise TwigFormatError(f"{path}: MILVLG safetensors hold no P-head; load with p_head=False and add one "
                              "(twig_jax.twig.phead.with_p_head) to train it")
    twig = nnx.eval_shape(lambda: Twig(text_cfg, twig_cfg, rngs=nnx.Rngs(0), dtype=dtype))
    for name, (suffix, transpose) in _LAYER_KEYS.items():
        if not hasattr(twig.layers, name):
            continue
        mats = [tensors[f"model.layers.{i}.{suffix}"] for i in range(twig_cfg.T)]
        stacked = jnp.stack([m.T if transpose else m for m in mats]).astype(dtype)
        getattr(twig.layers, name).set_value(stacked)
    twig.norm.set_value(jnp.asarray(tensors["model.norm.weight"], dtype))
    twig.head.set_value(jnp.asarray(tensors["lm_head.weight"]).T.astype(dtype))
    return twig


# ----------------------------------------------------------------------------------------------
# orbax format


def holds_only_twig(directory: str) -> bool:
    """Whether `directory` holds a twig of ours (twig_config.json) and nothing but TWIG_DIR_ENTRIES."""
    if not os.path.isdir(directory) or not os.path.isfile(os.path.join(directory, TWIG_CONFIG_FILE)):
        return False
    return set(os.listdir(directory)) <= TWIG_DIR_ENTRIES


def check_replaceable(directory: str, *, overwrite: bool, force: bool, holds_ours=holds_only_twig,
                      what: str = "a twig") -> None:
    """TwigFormatError unless `directory` may be written: absent or empty; holding `what` of ours
    (holds_ours) and `overwrite`; or anything else and `force`."""
    if not os.path.lexists(directory) or (os.path.isdir(directory) and not os.listdir(directory)):
        return
    if holds_ours(directory):
        if not overwrite:
            raise TwigFormatError(f"{directory} already holds {what} (pass overwrite=True)")
        return
    if not force:
        entries = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise TwigFormatError(f"{directory} holds {shown or 'a file'}, not {what} of ours: refusing to replace it "
                              "(force replaces it)")


def replace_with_staged(directory: str, write) -> str:
    """Atomically replace `directory` with what write(staging_dir) puts in a new sibling directory:
    the old one is renamed aside and removed only once the new one is in place, so a failed or
    interrupted write leaves the old one as it was."""
    import shutil
    import tempfile

    directory = os.path.realpath(directory)
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        write(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(directory):
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rename(directory, os.path.join(old, name))
    try:
        os.rename(stage, directory)
    except BaseException:
        if old is not None:
            os.rename(os.path.join(old, name), directory)
            os.rmdir(old)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def write_twig_files(twig: Twig, directory: str) -> None:
    """params/ (orbax) and twig_config.json into an existing, empty `directory`."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(os.path.abspath(directory), TWIG_PARAMS_DIR), nnx.state(twig))
        ckptr.wait_until_finished()
    dtype = jnp.dtype(twig.norm.get_value().dtype).name
    with open(os.path.join(directory, TWIG_CONFIG_FILE), "w") as f:
        json.dump({"twig": dataclasses.asdict(twig.twig_cfg), "text": dataclasses.asdict(twig.text_cfg),
                   "dtype": dtype}, f, indent=2)


def save_twig(twig: Twig, directory: str, *, overwrite: bool = False, force: bool = False, milvlg: bool = False,
              extra_files: dict[str, str] | None = None) -> str:
    """Save a twig (params via orbax + TwigConfig/TextConfig JSON) as `directory`.

    The twig is written into a new sibling directory that then replaces `directory` in one rename,
    so a failed save leaves what was there. An existing twig directory of ours (holds_only_twig) is
    replaced only with `overwrite`; a directory holding anything else only with `force`.
    milvlg: also write the MILVLG export (model.safetensors); extra_files: {name: text} written
    beside the twig (logs, a training record)."""
    directory = os.path.realpath(directory)
    check_replaceable(directory, overwrite=overwrite, force=force)

    def write(stage):
        write_twig_files(twig, stage)
        if milvlg:
            export_milvlg(twig, os.path.join(stage, MILVLG_FILE))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(stage, name), "w") as f:
                f.write(text)

    return replace_with_staged(directory, write)


def load_twig(directory: str, text_cfg: TextConfig | None = None, dtype=None, mesh=None) -> Twig:
    """Load a twig saved by save_twig; if text_cfg (the base's) is given it must match. mesh:
    restore straight into the shards the rule table gives."""
    import orbax.checkpoint as ocp

    cfg_path = os.path.join(directory, TWIG_CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise TwigFormatError(f"{directory}: no {TWIG_CONFIG_FILE}")
    with open(cfg_path) as f:
        d = json.load(f)
    twig_cfg = TwigConfig(**d["twig"])
    saved_text = TextConfig(**d["text"])
    if text_cfg is not None and text_cfg != saved_text:
        diff = {k: (getattr(saved_text, k), getattr(text_cfg, k)) for k in saved_text.__dataclass_fields__
                if getattr(saved_text, k) != getattr(text_cfg, k)}
        raise TwigFormatError(f"{directory}: twig was built for a different base (field: (twig, base)): {diff}")
    dt = jnp.dtype(d.get("dtype", "float32")) if dtype is None else jnp.dtype(dtype)
    abstract = nnx.eval_shape(lambda: Twig(saved_text, twig_cfg, rngs=nnx.Rngs(0), dtype=dt))
    graphdef, abstract_state = nnx.split(abstract)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
                          shd.load_shardings(abstract_state, mesh))
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(os.path.abspath(directory), TWIG_PARAMS_DIR), target)
    return nnx.merge(graphdef, state)


__all__ = ["TwigFormatError", "twig_to_milvlg", "expected_milvlg_shapes", "export_milvlg", "import_milvlg",
           "save_twig", "load_twig"]


def load_twig_any(path: str, text_cfg, dtype=None, *, K: int | None = None, Kf: int | None = None,
                  R: int | None = None, R_bar: float | None = None, mesh=None):
    """(Twig, TwigConfig) from an orbax twig dir (save_twig), MILVLG safetensors written by
    export_milvlg (its metadata carries the TwigConfig), or an official MILVLG checkpoint (bare
    safetensors, no TwigConfig): T is read from its keys, K and R or R_bar must be given, and Kf
    defaults to 3/4 of the base depth. K, Kf, R and R_bar are read only for such a checkpoint."""
    import re

    from twig_jax.twig.config import TwigConfig
    from twig_jax.twig.io import TWIG_CONFIG_FILE, TwigFormatError, import_milvlg, load_twig

    if not os.path.exists(path):
        raise TwigFormatError(f"{path}: no such twig checkpoint (file or directory)")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, TWIG_CONFIG_FILE)):
        twig = load_twig(path, text_cfg, dtype=dtype, mesh=mesh)
        return twig, twig.twig_cfg
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise TwigFormatError(f"{path}: neither an orbax twig dir ({TWIG_CONFIG_FILE}) nor MILVLG safetensors")
    from safetensors import safe_open

    keys: set[str] = set()
    meta: dict = {}
    for i, file in enumerate(files):
        try:
            with safe_open(file, framework="numpy") as f:
                if i == 0:
                    meta = f.metadata() or {}
                keys.update(f.keys())
        except Exception as e:  # safetensors has its own error type for a file it cannot parse
            raise TwigFormatError(f"{file}: not a safetensors file ({e})") from e
    where = files[0] if len(files) == 1 else path
    if "twig_config" in meta:
        twig_cfg = TwigConfig(**json.loads(meta["twig_config"]))
    else:
        layers = {int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))}
        if not layers:
            raise TwigFormatError(f"{where}: no model.layers.* keys: not a MILVLG twig checkpoint")
        T = max(layers) + 1
        missing = ([] if K is not None else ["K (the base layer it grows on; --K)"]) + \
            ([] if R is not None or R_bar is not None else ["R or R_bar (kept visual tokens; --R or --R-bar)"])
        if missing:
            raise TwigFormatError(f"{where}: a MILVLG twig without a TwigConfig (T={T}, read from its keys): "
                                  f"give {' and '.join(missing)}")
        L = text_cfg.num_hidden_layers
        twig_cfg = TwigConfig(K=K, T=T, Kf=max(K + 1, round(0.75 * L)) if Kf is None else Kf, R=R, R_bar=R_bar)
    import jax.numpy as jnp

    twig = import_milvlg(path, text_cfg, twig_cfg, dtype=jnp.float32 if dtype is None else dtype)
    if mesh is not None:
        state = nnx.state(twig)
        nnx.update(twig, jax.tree.map(jax.device_put, state, shd.param_shardings(state, mesh)))
    return twig, twig_cfg
