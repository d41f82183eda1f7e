"""Memory and communication of the pruned (TTP) prefill with the prompt split over "sequence" shards.

`hlo_comm_bytes` reads the bytes each device receives per call from a compiled program's HLO text
(ring algorithms), `prefill_cost` compiles `prune.ttp_prefill` as `TwigGenerator.prefill_only`
runs it on a mesh, from abstract weights (nothing allocated), and reports per-device memory (XLA
temp, KV-cache groups, weights) and communication, with the keep rule's own share
(`keep_sharded.comm_bytes`). `main` tabulates it over shard counts, keep rules and methods on a
long prompt (llava-mini with a 672 px image: 2304 visual tokens) on 8 simulated CPU devices:

    python -m research.shard_cost [--shards 1,2,4,8] [--rules exact,local] [--methods twig,phead] \\
        [--image-size 672] [--batch 8] [--text 40] [--out-json F] [--out-md F] [--force]

With --batch 8 (the default) the mesh is "data=8" for S = 1 and "data=8/S,sequence=S" for S > 1:
the same 8 prompts on the same 8 devices for every S, each device holding rows (or slices of
rows) of them; with --batch 1 a batch cannot split over "data", so the mesh is "sequence=S" on
the first S devices (S = 1: one device). research/shard_prune.py measures the accuracy side.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
MIB = 2 ** 20

# bytes per element of HLO primitive types (sub-byte types round up: a bound, not a layout)
_ITEMSIZE = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
             "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
             "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


# ----------------------------------------------------------------------------------------------
# HLO collectives


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program."""

    kind: str  # one of COLLECTIVES
    name: str  # the instruction's name
    computation: str  # the computation it sits in
    result_bytes: int  # M: the bytes of its result on one device (an async -start op's result part)
    group_size: int  # G: devices in its replica group (collective-permute: 1 sender per target)
    executions: int  # times one call runs it (trip counts of the while loops around it)
    op_name: str = ""  # the JAX operation it came from (its metadata), "" without

    @property
    def received(self) -> float:
        """Bytes one device receives per execution, ring algorithms: all-gather and all-to-all
        (G - 1) / G M, all-reduce 2 (G - 1) / G M (reduce-scatter, then all-gather), reduce-scatter
        (G - 1) M (M is one device's share of the reduced operand), collective-permute M."""
        g, m = self.group_size, self.result_bytes
        return {"all-gather": (g - 1) / g * m, "all-to-all": (g - 1) / g * m, "all-reduce": 2 * (g - 1) / g * m,
                "reduce-scatter": (g - 1) * m, "collective-permute": m}[self.kind]


def _split_top(text: str) -> list[str]:
    """The comma-separated items of text at bracket depth 0."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [s.strip() for s in items if s.strip()]


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape: an array "f32[2,8]{1,0}" or a (nested) tuple of them."""
    return sum(_ITEMSIZE.get(t, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in re.findall(r"\b([a-z]\w*)\[([\d,]*)\]", shape))


def _result_part(shape: str, opcode: str) -> str:
    """The part of a result shape a collective delivers: async all-gather-start and
    collective-permute-start return (operands, results, ...); every other op its results."""
    if opcode in ("all-gather-start", "collective-permute-start") and shape.startswith("("):
        return _split_top(shape[1:-1])[1]
    return shape


def _group_size(attrs: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len(m[1].split(","))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)  # iota form: [groups, size]<=[devices]
    if m:
        return int(m[1].split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)  # mesh['a'=4,'b'=2] {'b'}
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m[1])}
        return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m[2]))
    return num_devices  # replica_groups={} or none: every device


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLEES = re.compile(r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")


def _instruction(line: str) -> tuple[str, str, str, str] | None:
    """(name, result shape, opcode, rest) of an HLO instruction line, or None."""
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # a tuple shape: up to its closing parenthesis
        depth = 0
        for i, c in enumerate(rest):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    return (m[1], shape, op[1], rest) if op else None


def hlo_collectives(hlo_text: str, num_devices: int) -> list[Collective]:
    """Every collective of a compiled program's HLO text (`compiled.as_text()`), the SPMD-
    partitioned per-device module: shapes are one device's. num_devices: the group size of a
    collective whose replica_groups are empty (all devices).

    Async pairs count once, at their `-start` op (its result part); `-done` ops are skipped.
    A collective inside a while loop's body counts the loop's `known_trip_count` times (XLA's
    backend config; once when it has none), nested loops multiply; both branches of a
    conditional count once each, an upper bound."""
    comps: dict[str, list[tuple[str, str, str, str]]] = {}
    order: list[str] = []
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header[1]
            comps[current], entry = [], current if line.startswith("ENTRY") else entry
            order.append(current)
            continue
        inst = _instruction(line) if current else None
        if inst:
            comps[current].append(inst)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    # Callees are printed before their callers: walk from ENTRY backwards, passing run counts down.
    runs = {c: 0 for c in order}
    runs[entry] = 1
    for comp in reversed(order):
        for _, _, opcode, rest in comps[comp]:
            trips = 1
            if opcode == "while":
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                trips = int(m[1]) if m else 1
            callees = _CALLEES.findall(rest)
            branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
            if branches:
                callees += [b.strip().lstrip("%") for b in branches[1].split(",")]
            for callee in callees:
                if callee in runs:
                    runs[callee] += runs[comp] * trips
    out = []
    for comp in order:
        for name, shape, opcode, rest in comps[comp]:
            kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
            if kind not in COLLECTIVES or runs[comp] == 0:
                continue
            out.append(Collective(kind=kind, name=name, computation=comp,
                                  result_bytes=_shape_bytes(_result_part(shape, opcode)),
                                  group_size=1 if kind == "collective-permute" else _group_size(rest, num_devices),
                                  executions=runs[comp], op_name=op[1] if (op := _OP_NAME.search(rest)) else ""))
    return out


def hlo_comm_bytes(hlo_text: str, num_devices: int) -> dict[str, int]:
    """Bytes each device receives per call of a compiled program, by collective kind and "total"
    (see hlo_collectives for async ops and loops, Collective.received for the ring formulas).
    hlo_text: `compiled.as_text()`; num_devices: the mesh's device count."""
    out = dict.fromkeys(COLLECTIVES, 0.0)
    for c in hlo_collectives(hlo_text, num_devices):
        out[c.kind] += c.received * c.executions
    out = {k: round(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------
# The prefill's cost


def long_prompt_config(image_size: int = 672, preset: str = "llava-mini"):
    """`preset` with a larger image: (image_size / patch)^2 visual tokens (672 px on llava-mini:
    2304), and max_position_embeddings raised to a power of two with room for 1024 more tokens."""
    from twig_jax.model.config import load_preset

    base = load_preset(preset)
    cfg = dataclasses.replace(base, vision=dataclasses.replace(base.vision, image_size=image_size))
    room = 2 ** math.ceil(math.log2(cfg.num_image_tokens + 1024))
    return dataclasses.replace(cfg, text=dataclasses.replace(
        cfg.text, max_position_embeddings=max(cfg.text.max_position_embeddings, room)))


def long_prompt_twig_config(cfg, method: str):
    """K = 2, T = 3 (fewer where the model is shallower), the default FinalWipe depth
    (twig.config.default_pruning) and R = N / 9 (research/shard_prune.py's --ninths 1) rounded
    down to a multiple of 8, so that every S in 1, 2, 4, 8 divides it (the local rule keeps R / S
    per shard); a P-head for "phead"."""
    from twig_jax.twig.config import TwigConfig, default_pruning

    L, N = cfg.text.num_hidden_layers, cfg.num_image_tokens
    return TwigConfig(K=2, T=max(1, min(3, L - 2)), Kf=default_pruning(L, N, 2)["Kf"], R=max(8, N // 9 // 8 * 8),
                      p_head=method == "phead").validate(L, N)


def _abstract_params(tree, mesh):
    """An abstract parameter tree with the rule table's shardings, as the generators place it."""
    import jax

    from twig_jax.parallel.sharding import param_shardings

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        param_shardings(tree, mesh))


def _sharded_bytes(info, sharding) -> int:  # one device's bytes of an array with `sharding`
    return math.prod(sharding.shard_shape(tuple(info.shape))) * np.dtype(info.dtype).itemsize


def _tree_bytes(infos, shardings) -> int:
    import jax

    return sum(_sharded_bytes(i, s) for i, s in zip(jax.tree.leaves(infos), jax.tree.leaves(shardings)))


def prefill_cost(cfg, twig_cfg, method: str, *, mesh_spec: str, batch: int, prompt_len: int, dtype="float32",
                 new_tokens: int = 128, devices=None) -> dict:
    """Per-device cost of one TTP prefill of `batch` prompts of `prompt_len` tokens (N image
    placeholders included) on the mesh `mesh_spec` (`make_mesh`, over `devices`, all by default).

    Compiled as `TwigGenerator(..., ssd=True, mesh=...).prefill_only` runs it (chain drafting:
    the twig runs and keeps its cache whatever the method): the stacked weights
    placed by the rule table, prompts with their batch on ("data", "fsdp"), chain-drafting
    headroom after `new_tokens` (the prompt is not rounded to a bucket), under `jax.set_mesh`;
    the weights are abstract (`nnx.eval_shape`), so nothing is allocated. Bytes are one
    device's, the largest: "temp" (XLA's temporaries: activations), "kv" per cache group and in
    total (the compiled outputs' shardings), "weights" (model and twig, the inputs' shardings),
    "xla_output" / "xla_arguments" (memory_analysis, the same with logits / inputs), "comm"
    (hlo_comm_bytes of the compiled program) and "keep_comm" (the keep rule's share,
    keep_sharded.comm_bytes; 0 unsharded and for the local rule), "collectives" (each one of
    hlo_collectives: kind, result bytes, group size, executions, op name) and "compile_s"."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from twig_jax.decode.placement import Placement
    from twig_jax.decode.prune import make_plan, ttp_prefill
    from twig_jax.decode.speculative import ssd_extra_slots
    from twig_jax.model.llava import Llava
    from twig_jax.parallel.sharding import batch_sharding, make_mesh, replicated
    from twig_jax.twig.keep_sharded import comm_bytes
    from twig_jax.twig.module import Twig

    mesh = make_mesh(mesh_spec, devices)
    plan = make_plan(cfg, twig_cfg, method)
    dt = jnp.dtype(dtype)
    graph, state = nnx.split(nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0), dtype=dt)))
    twig_graph, twig_state = nnx.split(nnx.eval_shape(lambda: Twig(cfg.text, twig_cfg, rngs=nnx.Rngs(0), dtype=dt)))

    def rows(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape), shape[0]))

    v = cfg.vision
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (_abstract_params(state, mesh), _abstract_params(twig_state, mesh), rows((batch, prompt_len), jnp.int32), rows((batch,), jnp.int32),
            rows((batch, v.num_channels, v.image_size, v.image_size), jnp.float32),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh)))

    def prefill(state, twig_state, tokens, lengths, pixel_values, key):  # TwigGenerator._prefill_only_impl
        pre = ttp_prefill(nnx.merge(graph, state), nnx.merge(twig_graph, twig_state), plan, tokens, lengths,
                          pixel_values, extra=ssd_extra_slots(plan, new_tokens), key=key)
        return pre.caches, Placement.constrain_rows(pre.logits)

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = jax.jit(prefill).lower(*args)
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    caches_info, caches_sharding = lowered.out_info[0], compiled.output_shardings[0]
    kv = {g: _tree_bytes(c, caches_sharding.groups()[g]) for g, c in caches_info.groups().items()}
    in_shardings = compiled.input_shardings[0]
    hlo = compiled.as_text()
    s = mesh.shape["sequence"]
    keep = 0
    if s > 1 and plan.shard_keep == "exact":  # its shard_map holds every row: b is the whole batch
        keep = comm_bytes(batch, plan.N, plan.R, s, jnp.float32, feature_dim=cfg.text.hidden_size,
                          heads=cfg.text.num_attention_heads)[plan.keep_rule]
    return {
        "method": method, "rule": plan.shard_keep, "mesh": mesh_spec, "shards": s, "devices": mesh.size,
        "batch": batch, "prompt": prompt_len, "visual": plan.N, "R": plan.R, "K": plan.K, "T": plan.T,
        "Kf": plan.Kf, "dtype": dt.name,
        "temp": int(mem.temp_size_in_bytes), "kv": kv, "kv_total": sum(kv.values()),
        "weights": {"model": _tree_bytes(state, in_shardings[0]), "twig": _tree_bytes(twig_state, in_shardings[1])},
        "xla_output": int(mem.output_size_in_bytes), "xla_arguments": int(mem.argument_size_in_bytes),
        "comm": hlo_comm_bytes(hlo, mesh.size), "keep_comm": keep,
        "collectives": [{"kind": c.kind, "result_bytes": c.result_bytes, "group": c.group_size,
                         "executions": c.executions, "op": c.op_name} for c in hlo_collectives(hlo, mesh.size)],
        "compile_s": round(compile_s, 2),
    }


def vision_temp(cfg, *, mesh_spec: str, batch: int, dtype="float32", devices=None) -> int:
    """XLA temp bytes per device of the vision tower and projector alone (they run whole on every
    row: the prompt is split after them), compiled as in prefill_cost."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from twig_jax.model.llava import Llava
    from twig_jax.parallel.sharding import batch_sharding, make_mesh

    mesh = make_mesh(mesh_spec, devices)
    graph, state = nnx.split(nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype))))
    state = _abstract_params(state, mesh)
    v = cfg.vision
    shape = (batch, v.num_channels, v.image_size, v.image_size)
    pixels = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding(mesh, 4, batch))
    with jax.set_mesh(mesh):
        compiled = jax.jit(lambda st, px: nnx.merge(graph, st).image_features(px)).lower(state, pixels).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


# ----------------------------------------------------------------------------------------------
# The table


def mesh_for(shards: int, batch: int, devices: int = 8) -> tuple[str, int]:
    """(mesh spec, devices used): "data=D" / "data=D/S,sequence=S" over all D devices when the
    batch splits over data = D / S; "sequence=S" on S devices for a batch of 1."""
    if batch == 1:
        return f"sequence={shards}", shards
    if shards == 1:
        return f"data={devices}", devices
    return f"data={devices // shards},sequence={shards}", devices


def markdown(rows: list[dict]) -> str:
    lines = ["| method | rule | S | mesh | temp MiB | vision temp MiB | KV MiB | weights MiB | comm MiB / prefill "
             "| keep rule's KiB | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = sum(r["weights"].values())
        lines.append(f"| {r['method']} | {r['rule']} | {r['shards']} | {r['mesh']} | {r['temp'] / MIB:.1f} | "
                     f"{r['vision_temp'] / MIB:.1f} | {r['kv_total'] / MIB:.1f} | {w / MIB:.1f} | "
                     f"{r['comm']['total'] / MIB:.2f} | {r['keep_comm'] / 1024:.1f} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default="1,2,4,8")
    p.add_argument("--rules", default="exact,local")
    p.add_argument("--methods", default="twig,phead")
    p.add_argument("--image-size", type=int, default=672)
    p.add_argument("--preset", default="llava-mini")
    p.add_argument("--text", type=int, default=40, help="text tokens besides the image (a BOS first)")
    p.add_argument("--batch", type=int, default=8, help="8: data x sequence = 8 devices; 1: sequence=S only")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out-json")
    p.add_argument("--out-md")
    p.add_argument("--force", action="store_true", help="replace existing --out-json / --out-md files")
    args = p.parse_args(argv)
    try:
        shards = [int(s) for s in args.shards.split(",") if s]
    except ValueError:
        p.error(f"--shards {args.shards!r}: comma-separated integers")
    rules = [r for r in args.rules.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]
    if set(rules) - {"exact", "local"}:
        p.error(f"--rules {args.rules!r}: each one of exact, local")
    if any(s < 1 or 8 % s for s in shards):
        p.error(f"--shards {args.shards!r}: each a divisor of the 8 devices")
    if args.batch not in (1, 8):
        p.error(f"--batch {args.batch}: 8 (a row per device) or 1 (sequence=S only)")
    for path in (args.out_json, args.out_md):
        if path and os.path.exists(path) and not args.force:
            p.error(f"{path} exists; pass --force to replace it")

    import jax

    from twig_jax.files import write_json_atomic, write_text_atomic

    if jax.device_count() < 8:
        p.error(f"{jax.device_count()} devices; set XLA_FLAGS=--xla_force_host_platform_device_count=8")
    from twig_jax.model.config import ConfigError
    from twig_jax.twig.config import METHODS, TwigConfigError

    if set(methods) - set(METHODS):
        p.error(f"--methods {args.methods!r}: each one of {', '.join(METHODS)}")
    try:
        cfg = long_prompt_config(args.image_size, args.preset)
        twig_cfgs = {m: long_prompt_twig_config(cfg, m) for m in methods}
    except (ConfigError, TwigConfigError) as e:
        p.error(str(e))
    prompt = 1 + cfg.num_image_tokens + args.text
    vision: dict[str, int] = {}
    rows = []
    for method, twig_cfg in twig_cfgs.items():
        for s in shards:
            for rule in rules if s > 1 else rules[:1]:  # one shard: both rules are the unsharded rule
                spec, n_dev = mesh_for(s, args.batch)
                devices = jax.devices()[:n_dev]
                if spec not in vision:
                    vision[spec] = vision_temp(cfg, mesh_spec=spec, batch=args.batch, dtype=args.dtype,
                                               devices=devices)
                row = prefill_cost(cfg, dataclasses.replace(twig_cfg, shard_keep=rule), method, mesh_spec=spec,
                                   batch=args.batch, prompt_len=prompt, dtype=args.dtype,
                                   new_tokens=args.new_tokens, devices=devices)
                rows.append(dict(row, rule=rule if s > 1 else "-", vision_temp=vision[spec]))
                print(f"{method} {rule} S={s} {spec}: temp {row['temp'] / MIB:.1f} MiB, comm "
                      f"{row['comm']['total'] / MIB:.2f} MiB, compile {row['compile_s']:.1f} s",
                      file=sys.stderr, flush=True)
    md = markdown(rows)
    print(md)
    result = {"date": time.strftime("%Y-%m-%d"),
              "command": "python -m research.shard_cost " + " ".join(sys.argv[1:] if argv is None else argv),
              "preset": args.preset, "image_size": args.image_size, "rows": rows}
    if args.out_json:
        write_json_atomic(args.out_json, result)
    if args.out_md:
        write_text_atomic(args.out_md, md + "\n")
    return 0


if __name__ == "__main__":
    # 8 simulated CPU devices unless the caller set up others (before jax is first imported)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
