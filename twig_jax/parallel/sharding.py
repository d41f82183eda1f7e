"""One device mesh ("data", "fsdp", "sequence", "tensor") and ONE table of logical-axis rules (docs/design.md,
"Sharding").

Every array is described by logical axis names ("batch", "embed", "heads", ...); LOGICAL_AXIS_RULES
maps each logical name to mesh axes. Parameter logical axes come from PARAM_AXES, matched on the
parameter's path ("text/layers/wq"). A mesh axis is dropped from a dimension when the dimension is
not divisible by it or the axis is already used by an earlier dimension, so every model (down to
the tiny test presets) gets a valid sharding from the same table.

"sequence" is the mesh axis of a sequence-sharded prefill (decode/prune.py): size 1 everywhere
else, so training and decoding ignore it.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
TRAINING_AXES = ("data", "fsdp", "tensor")  # parse_mesh always reports these; "sequence" when named


class MeshError(ValueError):
    """A mesh that cannot be built: a bad spec, or one that does not match the devices."""

# logical axis -> mesh axis / axes (None = replicated). The single source of truth.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "sequence": "sequence",  # a prompt's length during a sequence-sharded prefill (decode/prune.py)
    "act_embed": None,
    "act_vocab": "tensor",
    "act_heads": "tensor",  # attention heads of activations
    # KV caches ([L, B, Hkv, Dh, S] keys, [L, B, Hkv, S, Dh] values): batch as above, kv heads on "tensor"
    "kv_heads": "tensor",
    "head_dim": None,
    # parameters
    "layers": None,  # stacked layer axis: scanned over, never split
    "embed": "fsdp",  # model width: ZeRO-3 style parameter sharding
    "heads": "tensor",  # flattened query heads (H * Dh)
    "kv": "tensor",  # flattened key/value heads (Hkv * Dh)
    "mlp": "tensor",  # MLP hidden width
    "vocab": "tensor",
    "norm": None,  # norm scales / small vectors
    "patch": None,  # flattened patch pixels, positions
}

# parameter path pattern (fnmatch, "/"-joined) -> logical axes; first match wins.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    ("*layers/wq", ("layers", "embed", "heads")),
    ("*layers/wk", ("layers", "embed", "kv")),
    ("*layers/wv", ("layers", "embed", "kv")),
    ("*layers/wo", ("layers", "heads", "embed")),
    ("*layers/bq", ("layers", "heads")),
    ("*layers/bk", ("layers", "kv")),
    ("*layers/bv", ("layers", "kv")),
    ("*layers/bo", ("layers", "norm")),
    ("*layers/w_gate", ("layers", "embed", "mlp")),
    ("*layers/w_up", ("layers", "embed", "mlp")),
    ("*layers/w_down", ("layers", "mlp", "embed")),
    ("*layers/b_gate", ("layers", "mlp")),
    ("*layers/b_up", ("layers", "mlp")),
    ("*layers/*", ("layers", "norm")),
    ("*blocks/w[qkv]", ("layers", "embed", "heads")),
    ("*blocks/wo", ("layers", "heads", "embed")),
    ("*blocks/w_fc1", ("layers", "embed", "mlp")),
    ("*blocks/w_fc2", ("layers", "mlp", "embed")),
    ("*blocks/b_fc1", ("layers", "mlp")),
    ("*blocks/*", ("layers", "norm")),
    ("*vision/patch_embed", ("patch", "embed")),
    ("*vision/pos_embed", ("patch", "embed")),
    ("*projector/w1", ("patch", "embed")),
    ("*projector/w2", ("mlp", "embed")),
    ("*text/embed", ("vocab", "embed")),
    ("*lm_head", ("embed", "vocab")),
    ("*head", ("embed", "vocab")),
)

BATCH_AXES = ("batch",)

# A sequence-sharded prefill's activations: batch as everywhere, the prompt's length on "sequence".
SEQUENCE_ACT_AXES = ("batch", "sequence", "act_embed")

# KV-cache logical axes: keys are stored transposed ([..., Dh, S]); a per-layer buffer drops "layers".
CACHE_KEY_AXES = ("layers", "batch", "kv_heads", "head_dim", "length")
CACHE_VALUE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


def cache_axes(ndim: int, keys: bool) -> tuple[str | None, ...]:
    """Logical axes of a key (keys=True) or value cache buffer: stacked (5-d) or one layer's (4-d)."""
    axes = CACHE_KEY_AXES if keys else CACHE_VALUE_AXES
    if ndim not in (4, 5):
        raise ValueError(f"a KV-cache buffer is 4-d or 5-d, got {ndim}-d")
    return axes[5 - ndim:]


def parse_mesh(spec: str | None) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}; missing training axes are 1,
    "sequence" is reported when named ("data=2,sequence=4" -> {..., "sequence": 4}; make_mesh
    gives it size 1 otherwise). None / "" -> all devices on "data"."""
    sizes = {a: 1 for a in TRAINING_AXES}
    if not spec:
        sizes["data"] = jax.device_count()
        return sizes
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise MeshError(f"bad mesh entry {part!r} in {spec!r}: expected AXIS=N with AXIS in {MESH_AXES}")
        sizes[name] = int(value)
        if sizes[name] < 1:
            raise MeshError(f"mesh axis {name} must be >= 1, got {sizes[name]}")
    return sizes


def check_training_mesh(sizes) -> None:
    """MeshError for a training mesh with a "sequence" axis above 1 (`sizes`: axis -> size, a
    parse_mesh dict or a Mesh's .shape): that axis splits a pruned prefill's prompt, and training
    would only repeat the same work on its devices."""
    if sizes.get("sequence", 1) > 1:
        raise MeshError(f"sequence={sizes['sequence']}: the sequence axis splits a pruned prefill's prompt; "
                        "training does not use it (lay the devices out over data, fsdp and tensor)")


def make_mesh(spec: str | dict[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """The ("data", "fsdp", "sequence", "tensor") mesh, built with jax.make_mesh (Auto axes: jit
    propagates). Axes not given are 1. "sequence" sits next to "tensor": a sequence-sharded
    prefill gathers keys and values over it in every layer."""
    sizes = parse_mesh(spec) if not isinstance(spec, dict) else spec
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}: expected axes in {MESH_AXES}")
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    n = math.prod(shape)
    avail = len(devices) if devices is not None else jax.device_count()
    if n != avail:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))} needs {n} devices; {avail} available")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, Any] = LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec for an array with logical `axes` and `shape` under `rules`."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        cand = (target,) if isinstance(target, str) else tuple(target)
        keep = []
        size = 1
        for ax in cand:
            n = mesh.shape.get(ax, 1)  # a mesh made elsewhere may lack an axis: it counts as 1
            if ax in used or n == 1 or dim % (size * n):
                continue
            keep.append(ax)
            size *= n
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at `path` ("text/layers/wq"); unknown -> replicated."""
    for pattern, axes in PARAM_AXES:
        if fnmatch.fnmatchcase(path, pattern) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def path_str(keypath) -> str:
    """"text/layers/wq" from a jax key path (nnx Variable `.value` attributes are skipped)."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
    return "/".join(parts)


def param_shardings(tree, mesh: Mesh, prefix: str = ""):
    """A tree of NamedShardings for a parameter tree (nnx.State or nested dict), by path."""
    def one(kp, x):
        path = (prefix + "/" if prefix else "") + path_str(kp)
        shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
        spec = logical_to_spec(param_logical_axes(path, len(shape)), shape, mesh)
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(one, tree)


def load_shardings(tree, mesh: Mesh | None):
    """Where a loader puts each parameter of `tree` (abstract or concrete): its shard by the rule
    table on a mesh, else the first local device."""
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: one, tree)
    return param_shardings(tree, mesh)


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int | None = None) -> NamedSharding:
    """Leading (batch) axis over ("data", "fsdp"), the rest replicated."""
    shape = (batch_size if batch_size is not None else math.prod(mesh.shape.values()),) + (1,) * (ndim - 1)
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), shape, mesh)
    return NamedSharding(mesh, spec)


def batch_shardings(batch, mesh: Mesh):
    return jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x), np.shape(x)[0]), batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def activation_constraint(x: jax.Array, mesh: Mesh | None, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axes (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


def context_constraint(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axes on the mesh set with `jax.set_mesh` (no-op without one).

    Decoding code deep inside a jitted function uses this: the generator sets the mesh around its
    calls, so the same code runs on one device and on a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def sequence_shards(mesh: Mesh | None = None) -> int:
    """Devices a prompt's length splits over in a prefill: the "sequence" axis of `mesh`, else of
    the mesh set with `jax.set_mesh` (1 without one, or without that axis)."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return 1
    return int(mesh.shape.get("sequence", 1))


def shard_to(tree, shardings):
    """device_put a host / single-device tree onto the given shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


__all__ = ["MeshError", "check_training_mesh", "MESH_AXES", "TRAINING_AXES", "SEQUENCE_ACT_AXES", "LOGICAL_AXIS_RULES", "PARAM_AXES",
           "parse_mesh", "make_mesh", "logical_to_spec", "param_logical_axes", "param_shardings",
           "load_shardings", "batch_sharding", "batch_shardings", "replicated", "activation_constraint",
           "context_constraint", "sequence_shards", "shard_to", "path_str", "cache_axes", "CACHE_KEY_AXES",
           "CACHE_VALUE_AXES"]
