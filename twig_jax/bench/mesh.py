"""Decoding on device meshes beside one device: compile time, per-device memory, tokens identical.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        twig-jax bench-mesh --meshes data=8,data=2+tensor=4 --out bench_results/mesh.json

Each (variant, mesh) builds its generator on the random-weight model of a preset (or the bundled
shapes model with --bundle), times the first call (compilation + run) and a second call (run), and
reads the per-device bytes of its weights and KV caches from the arrays' shardings. On simulated
CPU devices (they share the host's cores) the run times say little; compile time, memory and
"tokens equal to one device" are the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Sequence

import numpy as np

from twig_jax.files import write_json_atomic


def _log(msg: str) -> None:
    print(f"[bench-mesh {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(call) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def bench_one(make, prompts, pixels, new_tokens: int) -> dict:
    """First and second call of the generator `make()` builds, with its per-device bytes."""
    from twig_jax.decode.placement import per_device_bytes

    gen = make()
    first, out = timed(lambda: gen.generate(prompts, pixels, max_new_tokens=new_tokens))
    second, _ = timed(lambda: gen.generate(prompts, pixels, max_new_tokens=new_tokens))
    caches, _ = gen.prefill_only(prompts, pixels, new_tokens)
    return {"tokens": out.tokens, "compile_s": max(first - second, 0.0), "run_s": second,
            "param_bytes_per_device": per_device_bytes((gen.state, gen.twig_state, gen.layer_weights)),
            "cache_bytes_per_device": per_device_bytes(caches)}


def bench_mesh(model, twig, prompts, pixels, meshes: Sequence[str | None], variants: Sequence[str],
               new_tokens: int = 16) -> list[dict]:
    """One row per (variant, mesh); mesh None is the single-device reference the others are compared to."""
    from twig_jax.decode.generator import Generator, TwigGenerator
    from twig_jax.decode.variants import parse_variant
    from twig_jax.parallel.sharding import make_mesh

    rows = []
    for name in variants:
        v = parse_variant(name)
        reference = None
        for spec in meshes:
            mesh = None if spec is None else make_mesh(spec)
            if name == "plain":
                def make():
                    return Generator(model, mesh=mesh)
            else:
                tc = dataclasses.replace(twig.twig_cfg, spec=v.spec,
                                         **({} if v.method == "none" else {"select": v.select}))

                def make():
                    return TwigGenerator(model, twig, tc, v.method, v.ssd, mesh=mesh)
            _log(f"{name} on {spec or 'one device'} ...")
            row = bench_one(make, prompts, pixels, new_tokens)
            tokens = row.pop("tokens")
            reference = tokens if spec is None else reference
            row.update(variant=name, mesh=spec or "one device", tokens_equal_one_device=tokens == reference)
            _log(f"  compile {row['compile_s']:.1f} s, params {row['param_bytes_per_device'] / 2**20:.2f} MiB/device, "
                 f"KV {row['cache_bytes_per_device'] / 2**20:.3f} MiB/device, tokens equal: "
                 f"{row['tokens_equal_one_device']}")
            rows.append(row)
    return rows


def markdown(rows: Sequence[dict]) -> str:
    out = ["| variant | mesh | compile s | params MiB / device | KV MiB / device | tokens = one device |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['mesh']} | {r['compile_s']:.1f} | {r['param_bytes_per_device'] / 2**20:.2f} "
                   f"| {r['cache_bytes_per_device'] / 2**20:.3f} | {'yes' if r['tokens_equal_one_device'] else 'NO'} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    import jax

    from twig_jax.bench.methods import make_prompts, random_model

    p = argparse.ArgumentParser(prog="twig-jax bench-mesh", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="shapes-llava", help="preset with random weights (configs/NAME.json)")
    p.add_argument("--meshes", default="data=8,data=2+tensor=4,fsdp=2+tensor=4,data=2+fsdp=2+tensor=2",
                   help="comma-separated meshes, axes joined by '+' (data=2+tensor=4)")
    p.add_argument("--variants", default="plain,twig+ssd,phead+tree")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", default="bench_results/mesh.json")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and not args.force:
        p.error(f"--out {args.out} exists (--force replaces it)")
    from flax import nnx

    from twig_jax.model.config import load_preset
    from twig_jax.model.llava import Llava
    from twig_jax.twig.config import TwigConfig, default_pruning
    from twig_jax.twig.module import init_twig_from_base
    from twig_jax.twig.phead import with_p_head

    cfg = load_preset(args.config)
    model = random_model(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    L, N = cfg.text.num_hidden_layers, cfg.num_image_tokens
    twig = with_p_head(init_twig_from_base(model, TwigConfig(K=1, T=1, **default_pruning(L, N, 1))), seed=1)
    prompts, pixels = make_prompts(cfg, args.batch, 24, 0)
    meshes = [None] + [m.replace("+", ",") for m in args.meshes.split(",") if m]
    rows = bench_mesh(model, twig, prompts, np.asarray(pixels), meshes, args.variants.split(","), args.new_tokens)
    res = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["twig-jax bench-mesh", *(argv or sys.argv[1:])]),
           "config": args.config, "batch": args.batch, "new_tokens": args.new_tokens,
           "devices": [str(d) for d in jax.devices()], "rows": rows}
    write_json_atomic(args.out, res)
    print(markdown(rows))
    return 0 if all(r["tokens_equal_one_device"] for r in rows) else 1
