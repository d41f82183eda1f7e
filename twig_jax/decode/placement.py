"""Where a generator's arrays live: one device, or a ("data", "fsdp", "tensor") mesh.

On a mesh, parameters follow the training rule table (parallel/sharding.py: heads, kv heads, MLP
width and vocabulary on "tensor", the model width on "fsdp"), prompts, caches and outputs have
their batch on ("data", "fsdp") and the caches their kv heads on "tensor". The decoding code is the
same on one device and on a mesh: the generator sets the mesh (`jax.set_mesh`) around its compiled
calls, and `constrain_cache` reads it while tracing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from twig_jax.model.cache import KVCache
from twig_jax.parallel import sharding as shd


def constrain_cache(cache: KVCache) -> KVCache:
    """The cache with batch on ("data", "fsdp") and kv heads on "tensor" (no-op without a mesh)."""
    def one(x, keys):
        return shd.context_constraint(x, shd.cache_axes(x.ndim, keys))

    def each(buf, keys):
        return tuple(one(x, keys) for x in buf) if isinstance(buf, tuple) else one(buf, keys)

    return KVCache(each(cache.k, True), each(cache.v, False), shd.context_constraint(cache.lengths, ("batch",)))


@dataclasses.dataclass(frozen=True)
class Placement:
    """One device (mesh None) or a mesh: how parameters and per-row arrays are placed."""

    mesh: Mesh | None = None

    @property
    def batch_multiple(self) -> int:
        """Batch buckets are multiples of this: the mesh's ("data", "fsdp") size."""
        if self.mesh is None:
            return 1
        return math.prod(self.mesh.shape[a] for a in ("data", "fsdp") if a in self.mesh.shape)

    def context(self):
        """The mesh for tracing and running the compiled calls (a no-op context without one)."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def param_shardings(self, state):
        return shd.param_shardings(state, self.mesh)

    def params(self, state):
        """A parameter tree on its shardings by the rule table (unchanged without a mesh)."""
        if self.mesh is None:
            return state
        return jax.tree.map(lambda x, s: x if getattr(x, "sharding", None) == s else jax.device_put(x, s),
                            state, self.param_shardings(state))

    def row_sharding(self, ndim: int, batch: int) -> NamedSharding:
        return shd.batch_sharding(self.mesh, ndim, batch)

    def rows(self, x):
        """A host array with a leading batch axis, on the mesh with its batch on ("data", "fsdp").

        Every process passes the whole array (the same prompts everywhere); each keeps its rows."""
        if self.mesh is None:
            return x
        x = np.asarray(x)
        sharding = self.row_sharding(x.ndim, x.shape[0])
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def replicated_key(self, key):
        """A PRNG key copied to every device of the mesh (unchanged without one)."""
        return key if self.mesh is None else jax.device_put(key, shd.replicated(self.mesh))

    @staticmethod
    def constrain_rows(tree):
        """Inside a trace: every array of `tree` with its leading batch axis on ("data", "fsdp")
        (the outputs' shardings; a no-op without a mesh)."""
        return jax.tree.map(lambda x: x if x.ndim == 0 else
                            shd.context_constraint(x, ("batch",) + (None,) * (x.ndim - 1)), tree)

    @staticmethod
    def to_host(x) -> np.ndarray:
        """A (possibly multi-process) array as one numpy array on every process."""
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)


def per_device_bytes(tree) -> int:
    """The most bytes any one device holds of the arrays in `tree` (from their shardings)."""
    totals: dict = {}
    for x in jax.tree.leaves(tree):
        if not isinstance(x, jax.Array):
            continue
        for shard in x.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values(), default=0)
