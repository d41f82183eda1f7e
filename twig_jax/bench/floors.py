"""Hardware floors for the LLaVA benchmark: measured memory bandwidth and matmul rate, and the
bytes / FLOPs a decode step and a prefill must move / compute.

  decode floor  = bytes read per decode step / bandwidth
                  (text decoder layer weights + final norm + LM head -- not the embedding table,
                  of which a step reads B rows -- plus the whole KV cache at the capacity used:
                  the decode step attends over every slot of the cache, masked or not)
  prefill floor = prefill FLOPs / matmul rate
                  (vision tower blocks actually run + patch embedding + projector + decoder over
                  the padded prompt, attention counted dense [T x T] as computed, and the LM head
                  for one row per sequence)

Both floors are lower bounds for a dense, unpruned implementation on this machine: a decode step
cannot run faster than it takes to stream its weights and cache once, and a prefill cannot run
faster than its matmuls at the best measured matmul rate.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from twig_jax.model.config import LlavaConfig


def _best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(megabytes: int = 512, repeats: int = 7) -> dict:
    """Memory bandwidth from a jitted elementwise copy of a float32 array (x + 1: one read, one
    write of every byte); bytes read + written / time, best of `repeats`."""
    n = megabytes * 2**20 // 4
    x = jnp.arange(n, dtype=jnp.float32)
    fn = jax.jit(lambda a: a + 1.0)
    t = _best_time(fn, x, repeats=repeats)
    moved = 2 * n * 4
    del x
    return {"bytes_per_s": moved / t, "array_mb": megabytes, "best_s": t, "repeats": repeats}


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 7) -> dict:
    """Streaming read bandwidth from a jitted sum of a float32 array (reads every byte once,
    writes nothing): bytes read / time, best of `repeats`. A decode step is read-dominated, so
    this is the tighter (higher) bandwidth; the copy figure also pays for writes."""
    n = megabytes * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    fn = jax.jit(jnp.sum)
    t = _best_time(fn, x, repeats=repeats)
    del x
    return {"bytes_per_s": n * 4 / t, "array_mb": megabytes, "best_s": t, "repeats": repeats}


def measure_matmul(sizes=(2048, 4096), dtype=jnp.float32, repeats: int = 5) -> dict:
    """Matmul rate from jitted [n, n] @ [n, n] products: 2 n^3 / time, best over sizes and repeats."""
    fn = jax.jit(lambda a, b: a @ b)
    per_size = {}
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(0))
        a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
        # fewer repeats for the big one: it is slow on a few cores
        t = _best_time(fn, a, b, repeats=repeats if n <= 2048 else max(2, repeats // 2))
        per_size[n] = 2 * n**3 / t
    return {"flops_per_s": max(per_size.values()), "per_size": per_size, "dtype": jnp.dtype(dtype).name}


def decode_step_bytes(cfg: LlavaConfig, batch: int, capacity: int, itemsize: int) -> dict:
    """Bytes a decode step must read: decoder layer weights, final norm, LM head, KV cache."""
    tc = cfg.text
    d, i = tc.hidden_size, tc.intermediate_size
    hq, hkv = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    per_layer = 2 * d + d * hq + 2 * d * hkv + hq * d + 3 * d * i
    if tc.attention_bias:
        per_layer += hq + 2 * hkv + d
    if tc.mlp_bias:
        per_layer += 2 * i + d
    layers = tc.num_hidden_layers * per_layer
    head = d * tc.vocab_size  # tied or not, the head is a [D, V] read
    params = (layers + d + head) * itemsize
    kv = 2 * tc.num_hidden_layers * batch * tc.num_key_value_heads * capacity * tc.head_dim * itemsize
    return {"param_bytes": params, "kv_bytes": kv, "total_bytes": params + kv,
            "layer_params": layers, "head_params": head}


def prefill_flops(cfg: LlavaConfig, batch: int, prompt_len: int, with_image: bool = True) -> dict:
    """FLOPs of one prefill over a padded prompt of prompt_len tokens (2 per multiply-add)."""
    out = {}
    if with_image:
        v = cfg.vision
        p = v.num_patches + 1  # + CLS
        dv, iv = v.hidden_size, v.intermediate_size
        blocks = max(cfg.feature_layers)  # blocks past the selected layer do not run
        patch = 2 * v.num_patches * (v.num_channels * v.patch_size**2) * dv
        per_block = 2 * p * (4 * dv * dv + 2 * dv * iv) + 2 * 2 * p * p * dv  # linears + QK^T, PV
        out["vision"] = batch * (patch + blocks * per_block)
        n_img = cfg.num_image_tokens
        out["projector"] = batch * 2 * n_img * (cfg.projector_in_dim * cfg.text.hidden_size + cfg.text.hidden_size**2)
    tc = cfg.text
    d, i, t = tc.hidden_size, tc.intermediate_size, prompt_len
    hq, hkv = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    linears = 2 * t * (d * hq + 2 * d * hkv + hq * d + 3 * d * i)
    attn = 2 * 2 * t * t * hq  # scores and weighted sum, dense over the padded prompt
    out["decoder_linears"] = batch * tc.num_hidden_layers * linears
    out["decoder_attention"] = batch * tc.num_hidden_layers * attn
    out["lm_head"] = batch * 2 * d * tc.vocab_size
    out["total"] = sum(out.values())
    return out


def measure_floors(dtype=jnp.float32, bandwidth_mb: int = 512) -> dict:
    return {"bandwidth": measure_bandwidth(bandwidth_mb), "read_bandwidth": measure_read_bandwidth(bandwidth_mb),
            "matmul": measure_matmul(dtype=dtype)}
