"""`twig-jax plan`: per-device memory of generation on a mesh, computed from shapes alone.

    twig-jax plan --config llava-1.5-7b [llava-1.5-13b DIR ...] --mesh data=8 data=2,tensor=4 ...
                  --batch 8 [32 ...] [--prompt-len 640] [--new-tokens 128] [--variant plain twig ...]
                  [--dtype bfloat16|float32] [--device tpu-v5e h100 ...] [--budget-gib N]
                  [--K N --T N --Kf N --R N] [--json FILE [--force]]

One row per (config, variant, batch, mesh): parameters, twig, KV cache (total and per group),
the prefill's activation estimate and the total, per device, and whether that fits each device
budget. Nothing is allocated (twig_jax/bench/memory_plan.py), so a 64-device plan runs anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys

from twig_jax.files import write_json_atomic

DEFAULT_DEVICES = ("tpu-v5e", "h100")


def resolve_config(name: str):
    """A LlavaConfig from a preset name, a converted twig_jax dir or a Hugging Face dir (config.json)."""
    from twig_jax.convert.llava import is_converted
    from twig_jax.model.config import ConfigError, load_config, load_hf_config, load_preset

    if os.path.isdir(name):
        if is_converted(name):
            try:
                return load_config(os.path.join(name, "config.json"))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{name}: bad config.json in converted checkpoint ({e})") from None
        return load_hf_config(name)
    return load_preset(name)


def mesh_label(mesh: dict[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in mesh.items() if n > 1) or "1 device"


def table(rows: list[dict], budgets: dict[str, float]) -> str:
    """The plans as an aligned text table, sizes in GiB (MiB when every total is under 1 GiB)."""
    unit, scale = ("GiB", 1024 ** 3) if max(r["total"] for r in rows) >= 1024 ** 3 else ("MiB", 1024 ** 2)

    def size(n):
        return f"{n / scale:.2f}"

    head = ["config", "variant", "B", "S", "new", "mesh", "devices", f"params {unit}", "twig", "KV", "KV groups",
            "act", "total"] + [f"{name} ({gib:g} GiB)" for name, gib in budgets.items()]
    body = []
    for r in rows:
        groups = ", ".join(f"{g}{'*' if g in r['prefill_only'] else ''} {size(b)}" for g, b in r["kv"].items())
        body.append([r["config"], r["variant"], str(r["batch"]), str(r["prompt"]), str(r["new_tokens"]),
                     mesh_label(r["mesh"]), str(r["devices"]), size(r["params"]), size(r["twig_params"]),
                     size(r["kv_total"]), groups, size(r["activation_peak"]), size(r["total"])]
                    + ["fits" if f else "no" for f in r["fits"].values()])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"per device, {unit}; act = the prefill's largest buffer, twice (an estimate); "
             "KV counts every group the prefill fills (* = the decode drops it)"]
    return "\n".join(lines + [""] + notes)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twig-jax plan", description="Per-device memory of generation on a mesh, "
                                "from shapes alone (nothing is allocated).")
    p.add_argument("--config", nargs="+", required=True,
                   help="preset name (llava-1.5-7b, llava-1.5-13b, ...), converted dir or Hugging Face dir")
    p.add_argument("--mesh", nargs="+", required=True, help="meshes, e.g. data=8 data=2,tensor=4 fsdp=4,tensor=2")
    p.add_argument("--batch", nargs="+", type=int, default=[8], help="prompts per batch (default 8)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens, the N image tokens included (default N + 64)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    p.add_argument("--variant", nargs="+", default=["plain"],
                   help="METHOD[-RULE][+ssd|+tree], plain, ssd or tree (default plain); e.g. twig twig+ssd")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", nargs="+", help=f"device budgets to check (default {' '.join(DEFAULT_DEVICES)})")
    p.add_argument("--budget-gib", type=float, help="a budget of this many GiB per device")
    for name, what in (("K", "trunk depth (default 2)"), ("T", "twig layers (default 3)"),
                       ("Kf", "FinalWipe layer (default: a trained twig's default budget)"),
                       ("R", "kept visual tokens (default: a trained twig's default budget)")):
        p.add_argument(f"--{name}", type=int, help=f"twig variants: {what}")
    p.add_argument("--json", help="also write the plans to this JSON file")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    from twig_jax.bench.memory_plan import DEVICE_BUDGETS_GIB

    budgets = {}
    for name in args.device or ([] if args.budget_gib else DEFAULT_DEVICES):
        if name not in DEVICE_BUDGETS_GIB:
            p.error(f"--device {name!r} unknown; have {', '.join(DEVICE_BUDGETS_GIB)} (or give --budget-gib N)")
        budgets[name] = DEVICE_BUDGETS_GIB[name]
    if args.budget_gib is not None:
        if args.budget_gib <= 0:
            p.error(f"--budget-gib must be > 0, got {args.budget_gib}")
        budgets["budget"] = args.budget_gib
    if args.json and os.path.exists(args.json) and not args.force:
        p.error(f"--json {args.json} exists; --force replaces it")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: no such directory")

    from twig_jax.bench.memory_plan import default_twig_config, plan_memory
    from twig_jax.decode.variants import parse_variant

    variants = [parse_variant(v) for v in args.variant]
    given = {k: getattr(args, k) for k in ("K", "T", "Kf", "R") if getattr(args, k) is not None}
    rows = []
    for name in args.config:
        cfg = resolve_config(name)
        prompt_len = args.prompt_len if args.prompt_len is not None else cfg.num_image_tokens + 64
        for v in variants:
            twig_cfg = None if v.name == "plain" else default_twig_config(cfg, v, **given)
            for batch in args.batch:
                for mesh in args.mesh:
                    plan = plan_memory(cfg, mesh, batch, prompt_len, args.new_tokens, v, args.dtype, twig_cfg)
                    row = dict(config=os.path.basename(os.path.normpath(name)), **plan.to_dict())
                    row["fits"] = {b: plan.total <= gib * 1024 ** 3 for b, gib in budgets.items()}
                    rows.append(row)
    print(table(rows, budgets))
    if args.json:
        write_json_atomic(args.json, {"budgets_gib": budgets, "plans": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
