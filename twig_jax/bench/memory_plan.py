"""Per-device memory of a generator on a ("data", "fsdp", "tensor") mesh, planned without allocating.

Parameters are the abstract shapes of the model and the twig (`nnx.eval_shape`) under the rule
table's shardings (parallel/sharding.py); KV-cache groups take the generators' own padded shapes
(decode/buckets.py), group capacities and drafting headroom (decode/prune.py, the decodings'
`extra_slots`), sharded as the generators constrain them: batch on ("data", "fsdp"), kv heads on
"tensor" (`cache_axes`; an axis that does not divide a dimension is dropped). The mesh is an
AbstractMesh, so a plan for 64 devices needs none. Activations are an estimate: the largest buffers
the prefill materialises (attention scores and MLP hidden over the full padded prompt, which the
trunk of every variant sees), assuming batch on ("data", "fsdp") and heads / MLP width on "tensor"
as the weights are split; the total counts the largest of them twice (it and the buffer made from
it, e.g. scores and probabilities, are live together).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from twig_jax.decode.buckets import Batcher, InputError, bucket
from twig_jax.decode.prune import OneTokenDecoding, group_capacities, make_plan
from twig_jax.decode.speculative import ChainDrafter
from twig_jax.decode.tree import TreeDrafter
from twig_jax.decode.variants import Variant
from twig_jax.model.config import LlavaConfig
from twig_jax.model.llava import Llava
from twig_jax.parallel import sharding as shd
from twig_jax.twig.config import TwigConfig, default_pruning, default_trunk_depth, needs_twig
from twig_jax.twig.module import Twig

GIB = 1024 ** 3
DEVICE_BUDGETS_GIB = {"tpu-v5e": 16, "l4": 24, "tpu-v4": 32, "a100-40g": 40, "a100-80g": 80, "h100": 80,
                      "h200": 141}
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def abstract_mesh(spec: str) -> AbstractMesh:
    """The ("data", "fsdp", "tensor") mesh of "data=2,tensor=4" without devices; InputError if malformed."""
    if not spec or not spec.strip():
        raise InputError("--mesh is empty; give AXIS=N entries, e.g. data=2,tensor=4")
    try:
        sizes = shd.parse_mesh(spec)
    except ValueError as e:
        raise InputError(str(e)) from None
    return AbstractMesh(tuple(sizes.get(a, 1) for a in shd.MESH_AXES), shd.MESH_AXES)


def sharded_bytes(shape: tuple[int, ...], dtype, axes: tuple[str | None, ...], mesh: AbstractMesh) -> int:
    """Bytes one device holds of an array with logical `axes` under the rule table."""
    spec = shd.logical_to_spec(axes, shape, mesh)
    return math.prod(NamedSharding(mesh, spec).shard_shape(shape)) * np.dtype(dtype).itemsize


def state_bytes(state, mesh: AbstractMesh) -> int:
    """Per-device bytes of an (abstract) parameter tree placed by `param_shardings`, as the generators place it."""
    leaves = jax.tree.leaves(state)
    shardings = jax.tree.leaves(shd.param_shardings(state, mesh))
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, shardings))


def cache_group_bytes(cfg: LlavaConfig, layers: int, batch: int, capacity: int, dtype, mesh: AbstractMesh) -> int:
    """One KV-cache group: keys [L, B, Hkv, Dh, S], values [L, B, Hkv, S, Dh] and lengths [B] int32."""
    tc = cfg.text
    k = (layers, batch, tc.num_key_value_heads, tc.head_dim, capacity)
    v = (layers, batch, tc.num_key_value_heads, capacity, tc.head_dim)
    return (sharded_bytes(k, dtype, shd.cache_axes(5, True), mesh)
            + sharded_bytes(v, dtype, shd.cache_axes(5, False), mesh)
            + sharded_bytes((batch,), np.int32, ("batch",), mesh))


def default_twig_config(cfg: LlavaConfig, variant: Variant, **given) -> TwigConfig:
    """The TwigConfig a plan assumes: K = 2, T = 3 (fewer where the model is shallower), a trained
    twig's default pruning budget (twig.config.default_pruning), the variant's keep rule and draft
    shape; `given` (K, T, Kf, R) overrides."""
    L, N = cfg.text.num_hidden_layers, cfg.num_image_tokens
    k = given.get("K") or default_trunk_depth(L)
    t = given.get("T") or max(1, min(3, L - k))
    budget = default_pruning(L, N, k)
    budget.update({f: given[f] for f in ("Kf", "R") if given.get(f) is not None})
    tc = TwigConfig(K=k, T=t, p_head=variant.method == "phead", select=variant.select, spec=variant.spec, **budget)
    return tc.validate(L, N)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one generator setting (the sizes of every part, and what they add up to)."""

    variant: str
    mesh: dict[str, int]  # axis -> size
    dtype: str
    batch: int  # padded: the batch bucket
    prompt: int  # padded prompt length
    new_tokens: int  # the new-token bucket
    params: int  # base model
    twig_params: int  # 0 when the variant runs no twig
    kv: dict[str, int]  # cache group -> bytes ("cache" for plain; "trunk", "twig", "mid", "tail" pruned)
    prefill_only: tuple[str, ...]  # groups the decode drops (the twig's, when the twig only scores)
    activations: dict[str, int]  # the prefill's largest buffers

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def kv_total(self) -> int:
        return sum(self.kv.values())

    @property
    def activation_peak(self) -> int:
        return 2 * max(self.activations.values())

    @property
    def total(self) -> int:
        return self.params + self.twig_params + self.kv_total + self.activation_peak

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), prefill_only=list(self.prefill_only), devices=self.devices,
                    kv_total=self.kv_total, activation_peak=self.activation_peak, total=self.total)


def prefill_activations(cfg: LlavaConfig, batch: int, prompt: int, dtype, mesh: AbstractMesh) -> dict[str, int]:
    tc, vc = cfg.text, cfg.vision
    p = vc.num_patches + 1  # the tower's tokens: patches and the class token
    return {
        "mlp hidden [B,S,I]": sharded_bytes((batch, prompt, tc.intermediate_size), dtype,
                                            ("batch", "length", "mlp"), mesh),
        "attention scores [B,H,S,S] f32": sharded_bytes((batch, tc.num_attention_heads, prompt, prompt), np.float32,
                                                        ("batch", "act_heads", "length", None), mesh),
        "vision scores [B,Hv,P,P] f32": sharded_bytes((batch, vc.num_attention_heads, p, p), np.float32,
                                                      ("batch", "act_heads", "length", None), mesh),
        "logits [B,V] f32": sharded_bytes((batch, tc.vocab_size), np.float32, ("batch", None), mesh),
    }


def plan_memory(cfg: LlavaConfig, mesh_spec: str, batch: int, prompt_len: int, new_tokens: int, variant: Variant,
                dtype: str = "bfloat16", twig_cfg: TwigConfig | None = None) -> MemoryPlan:
    """The plan of `variant` for `batch` prompts of `prompt_len` tokens (N image placeholders
    included) and `new_tokens` new tokens on the mesh `mesh_spec`. InputError for a bad mesh or
    shapes the generators refuse; TwigConfigError for a bad twig setting."""
    mesh = abstract_mesh(mesh_spec)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch < 1 or batch % rows:
        raise InputError(f"batch {batch} does not split over the mesh's data x fsdp = {rows} devices; give a "
                         f"multiple of {rows}")
    n = cfg.num_image_tokens
    if prompt_len <= n:
        raise InputError(f"prompt length {prompt_len} must exceed the {n} image tokens (a prompt holds the image "
                         "and some text)")
    if new_tokens < 1:
        raise InputError(f"new tokens must be >= 1, got {new_tokens}")
    batcher = Batcher(cfg, batch_multiple=rows)
    if prompt_len + new_tokens > batcher.max_cache_len:
        raise InputError(f"prompt {prompt_len} + {new_tokens} new tokens exceed the cache capacity "
                         f"{batcher.max_cache_len} (max_position_embeddings)")
    b = bucket(batch, batcher.batch_buckets, "batch size")
    s = batcher.prompt_bucket(prompt_len, with_image=True)
    new = bucket(new_tokens, batcher.new_token_buckets, "new tokens")
    dt = DTYPES[dtype]
    params = state_bytes(nnx.split(nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0), dtype=dt)))[1], mesh)
    twig_params, prefill_only = 0, ()
    if variant.method == "none" and not variant.ssd:  # Generator: one group of all L layers
        capacity = min(s + new, max(s, batcher.max_cache_len))
        kv = {"cache": cache_group_bytes(cfg, cfg.text.num_hidden_layers, b, capacity, dt, mesh)}
    else:  # TwigGenerator: the four TTP groups
        twig_cfg = twig_cfg or default_twig_config(cfg, variant)
        plan = make_plan(cfg, twig_cfg, variant.method)
        decoding = (OneTokenDecoding() if not variant.ssd else
                    TreeDrafter(twig_cfg.tree_shape) if variant.spec == "tree" else ChainDrafter())
        caps = group_capacities(plan, s, decoding.extra_slots(plan, new))
        layers = {"trunk": plan.K, "twig": plan.T, "mid": plan.Kf - plan.K, "tail": plan.L - plan.Kf}
        if not (decoding.uses_twig or plan.scorer.reads_twig):
            del layers["twig"]
        elif not decoding.uses_twig:
            prefill_only = ("twig",)
        kv = {g: cache_group_bytes(cfg, n_layers, b, caps[g], dt, mesh) for g, n_layers in layers.items()}
        if variant.ssd or needs_twig(variant.method):
            twig = nnx.eval_shape(lambda: Twig(cfg.text, twig_cfg, rngs=nnx.Rngs(0), dtype=dt))
            twig_params = state_bytes(nnx.split(twig)[1], mesh)
    return MemoryPlan(variant=variant.name, mesh=dict(mesh.shape), dtype=dtype, batch=b, prompt=s, new_tokens=new,
                      params=params, twig_params=twig_params, kv=kv, prefill_only=prefill_only,
                      activations=prefill_activations(cfg, b, s, dt, mesh))
