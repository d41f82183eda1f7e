"""Per-device memory of the TTP prefill with the prompt split over the mesh's "sequence" axis.

Compiles `prune.ttp_prefill` for one prompt of thousands of visual tokens (llava-mini with a larger
image: --image-size 672 gives 2304 visual tokens) on 8 simulated CPU devices, from abstract
weights (nothing allocated), for meshes "data=8" (a batch of 1 splits over nothing: every device
holds the whole prompt) and "sequence=S", and prints XLA's temporary bytes per device and the
all-gathers of the compiled program with the bytes each device receives per prefill, and the
temporary bytes of the vision tower alone (it runs whole on every device: the prompt is split after
it). The program returns the logits and the kept set only, so its caches count as temporaries;
research/shard_cost.py compiles the prefill as the generator runs it (caches as outputs) and
tabulates memory and communication over keep rules and methods.

    python -m research.sequence_prefill_memory [--image-size 672] [--text 40] [--shards 2,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=672)
    p.add_argument("--text", type=int, default=40, help="text tokens after the image")
    p.add_argument("--shards", default="2,4,8")
    p.add_argument("--R", type=int, default=256)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from research.shard_cost import MIB, hlo_collectives, hlo_comm_bytes, long_prompt_config, vision_temp
    from twig_jax.decode.prune import make_plan, ttp_prefill
    from twig_jax.model.llava import Llava
    from twig_jax.parallel.sharding import make_mesh
    from twig_jax.twig.config import TwigConfig
    from twig_jax.twig.module import Twig

    cfg = long_prompt_config(args.image_size)
    n = cfg.num_image_tokens
    s = 1 + n + args.text
    tcfg = TwigConfig(K=2, T=3, Kf=8, R=args.R)
    plan = make_plan(cfg, tcfg, "twig")
    graph, state = nnx.split(nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0))))
    twig_graph, twig_state = nnx.split(nnx.eval_shape(lambda: Twig(cfg.text, tcfg, rngs=nnx.Rngs(0))))
    v = cfg.vision
    inputs = (jax.ShapeDtypeStruct((1, s), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32),
              jax.ShapeDtypeStruct((1, v.num_channels, v.image_size, v.image_size), jnp.float32))

    def prefill(state, twig_state, tokens, lengths, pixels):
        pre = ttp_prefill(nnx.merge(graph, state), nnx.merge(twig_graph, twig_state), plan, tokens, lengths,
                          pixels, extra=64)
        return pre.logits, pre.keep

    print(json.dumps({"vision_tower_alone_temp_MiB": round(vision_temp(cfg, mesh_spec="data=8", batch=1) / MIB, 1)}),
          flush=True)
    rows = []
    for spec in ["data=8"] + [f"data={8 // int(k)},sequence={k}" for k in args.shards.split(",")]:
        t = time.perf_counter()
        with jax.set_mesh(make_mesh(spec)):
            compiled = jax.jit(prefill).lower(state, twig_state, *inputs).compile()
        mem = compiled.memory_analysis()
        hlo = compiled.as_text()
        rows.append({"mesh": spec, "prompt": s, "visual": n, "temp_MiB": round(mem.temp_size_in_bytes / MIB, 1),
                     "all_gathers": sum(c.kind == "all-gather" for c in hlo_collectives(hlo, 8)),
                     "comm_MiB": round(hlo_comm_bytes(hlo, 8)["total"] / MIB, 2),
                     "compile_s": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
