"""Tree drafting against chain drafting on the bundled model's descriptions, over tree shapes.

    python -m research.tree_sweep [--model DIR] [--twig DIR] [--images 8] [--batch 1] [--methods twig,phead]
        [--shapes 2x3x6,4x5x20,8x5x40] [--temperature 0] [--repeats 1] [--out-json F]

For each pruning method (the twig's attention "twig", the weaker draft regime; the bundled P-head
"phead" with its coverage keep-set) it runs plain decoding, chain SSD (draft_len = each tree depth,
theta as the twig's) and every tree shape ExDxN, in one process on the same weights, and reports per
row: tokens per target pass (the mean accepted length that EAGLE-2 and TwigVLM++ report), its
ratio to chain's at the same depth, speed against plain decoding, and one round's cost in plain
decode steps. Greedy rows are also checked token for token against plain pruned decoding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from research.speed_table import description_batch, load_model_and_twig
from twig_jax.assets import DEFAULT_MODEL, DEFAULT_TWIG
from twig_jax.bench.timing import median_pass, timed_passes


def parse_shape(text: str) -> tuple[int, int, int]:
    e, d, n = (int(x) for x in text.lower().split("x"))
    return e, d, n


def sweep(model, tokenizer, twig, twig_cfg, prompts, pixels, *, methods, shapes, batch: int, repeats: int,
          sampling, max_new_tokens: int = 128, log=print) -> list[dict]:
    from twig_jax.decode.generator import Generator, TwigGenerator

    eos_ids = (tokenizer.eos_token_id,)
    rows = []
    plain = Generator(model)
    for method in methods:
        select = twig_cfg.select if method == "phead" else "top"
        base_cfg = dataclasses.replace(twig_cfg, select=select)
        gens = {"plain": plain,
                "pruned": TwigGenerator(model, twig, base_cfg, method=method, ssd=False,
                                        layer_weights=plain.layer_weights)}
        for depth in sorted({d for _, d, _ in shapes}):
            gens[f"chain d{depth}"] = TwigGenerator(model, twig, dataclasses.replace(base_cfg, draft_len=depth),
                                                    method=method, ssd=True, layer_weights=plain.layer_weights)
        for e, d, n in shapes:
            cfg = dataclasses.replace(base_cfg, spec="tree", tree_width=e, tree_depth=d, tree_nodes=n)
            gens[f"tree {e}x{d}x{n}"] = TwigGenerator(model, twig, cfg, method=method, ssd=True,
                                                      layer_weights=plain.layer_weights)
        passes = timed_passes(gens, prompts, pixels, batch, repeats, max_new_tokens, eos_ids,
                              None if sampling.greedy else sampling)
        med = {name: median_pass(p) for name, p in passes.items()}
        plain_speed = med["plain"]["tokens"] / med["plain"]["seconds"]
        step_s = med["plain"]["seconds"] / max(med["plain"]["tokens"], 1)
        for name, r in med.items():
            if name == "plain":
                continue
            row = dict(method=method, decoding=name, tokens=r["tokens"], seconds=r["seconds"],
                       speed_vs_plain=r["tokens"] / r["seconds"] / plain_speed)
            if r["rounds"]:
                n_rows = len(prompts)
                row.update(rounds=r["rounds"], tokens_per_target_pass=r["tokens"] / (r["rounds"] + n_rows),
                           accepted=r["accepted"], verified_or_drafted=r["drafted"],
                           round_in_plain_steps=(r["seconds"] / r["rounds"]) / step_s)
            if sampling.greedy:
                row["same_tokens_as_pruned"] = r["outputs"] == med["pruned"]["outputs"]
            rows.append(row)
        for row in rows:
            if row["method"] == method and row["decoding"].startswith("tree"):
                depth = int(row["decoding"].split("x")[1])
                chain = next(c for c in rows if c["method"] == method and c["decoding"] == f"chain d{depth}")
                row["vs_chain_tokens_per_pass"] = row["tokens_per_target_pass"] / chain["tokens_per_target_pass"]
                row["vs_chain_speed"] = row["speed_vs_plain"] / chain["speed_vs_plain"]
        log(f"{method}: done")
    return rows


def table(rows: list[dict]) -> str:
    out = ["| method | decoding | speed vs plain | tokens / target pass | vs chain (same depth) | round, plain steps |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        tpp = r.get("tokens_per_target_pass")
        out.append(f"| {r['method']} | {r['decoding']} | {r['speed_vs_plain']:.2f}x | "
                   f"{'-' if tpp is None else f'{tpp:.2f}'} | "
                   f"{r['vs_chain_tokens_per_pass']:.2f}x / {r['vs_chain_speed']:.2f}x | "
                   if "vs_chain_tokens_per_pass" in r else
                   f"| {r['method']} | {r['decoding']} | {r['speed_vs_plain']:.2f}x | "
                   f"{'-' if tpp is None else f'{tpp:.2f}'} | - | ")
        out[-1] += (f"{r['round_in_plain_steps']:.1f} |" if "round_in_plain_steps" in r else "- |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.tree_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--twig", default=DEFAULT_TWIG)
    p.add_argument("--data", default=None, help="shapes data dir (default: seed 0's eval split, generated)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", default="twig,phead")
    p.add_argument("--shapes", default="2x3x6,4x5x20,8x5x40", help="tree shapes ExDxN, comma-separated")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out-json", default=None)
    args = p.parse_args(argv)

    from twig_jax.decode.sampling import SamplingConfig

    shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    model, tokenizer, twig, twig_cfg, pipe = load_model_and_twig(args.model, args.twig)
    prompts, pixels = description_batch(pipe, args.data, args.images)
    sampling = SamplingConfig(temperature=args.temperature)
    rows = sweep(model, tokenizer, twig, twig_cfg, prompts, pixels, methods=args.methods.split(","), shapes=shapes,
                 batch=args.batch, repeats=args.repeats, sampling=sampling,
                 log=lambda s: print(s, file=sys.stderr))
    print(table(rows))
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"rows": [{k: v for k, v in r.items()} for r in rows], "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
