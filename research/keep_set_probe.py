"""Which visual tokens does a pruned model need? Score keep-set rules by the reward the P-head is
trained on: the mean log-probability of the reference answer under the frozen base with only the
kept visual tokens (teacher forced, FinalWipe at Kf), on held-out single-turn examples, split into
long answers (>= 8 answer tokens: descriptions) and short ones.

    python -m research.keep_set_probe --data W/data/train.json --images W/data/images [--R 16]
        [--records 24] [--cells 3] [--out-json F]

Rules: "twig" (TTP: the last twig layer's attention from the last prompt token), "phead" (when the
twig has a P-head: its top R, and "phead-sample", keep-sets drawn from its scores as in RL), the
"-cover" keep-sets of both (select="cover": score-weighted coverage, ttp.cover_visual), base
layer attention top-R from the last prompt row or from every answer row ("base L<l>
last/answer"; where the model looks, as AttnKL would distil it), "random" (mean of 4
draws), and "grid": a fixed, image-independent layout that keeps the patches nearest the centre of
each of cells x cells equal regions, evenly (a coverage control, not a method).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def grid_keep(side: int, cells: int, r: int) -> np.ndarray:  # [r] int
    """r patch indices of a side x side patch grid spread over cells x cells regions: each region's
    patches ordered by distance to the region centre, taken round-robin over the regions."""
    block = side / cells
    per_region = []
    for cy in range(cells):
        for cx in range(cells):
            centre = ((cy + 0.5) * block - 0.5, (cx + 0.5) * block - 0.5)
            pts = [(y, x) for y in range(side) for x in range(side)
                   if int(y // block) == cy and int(x // block) == cx]
            pts.sort(key=lambda p: ((p[0] - centre[0]) ** 2 + (p[1] - centre[1]) ** 2, p))
            per_region.append([y * side + x for y, x in pts])
    out, i = [], 0
    while len(out) < r:
        region = per_region[i % len(per_region)]
        j = i // len(per_region)
        if j < len(region):
            out.append(region[j])
        i += 1
    return np.sort(np.asarray(out, np.int32))


def main(argv=None) -> int:
    from twig_jax.eval.evaluate import DEFAULT_MODEL, DEFAULT_TWIG

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--twig", default=DEFAULT_TWIG)
    p.add_argument("--data", required=True, help="LLaVA instruction JSON; its last --records records are used")
    p.add_argument("--images", required=True)
    p.add_argument("--records", type=int, default=24)
    p.add_argument("--R", type=int, default=16)
    p.add_argument("--cells", type=int, default=3, help="regions per side for the grid control")
    p.add_argument("--layers", default=None, help="base layers whose attention is a rule (default: 0 and K..Kf-1)")
    p.add_argument("--max-len", type=int, default=352)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out-json", default=None)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from twig_jax.train.prune_rl import eval_batches, FrozenModels, single_shard, accumulate, single_turn_records
    from twig_jax.convert.llava import load_model
    from twig_jax.data.llava_data import DataConfig, build_dataset, load_records
    from twig_jax.train.phead_objectives import attention_over_visual, attention_rows
    from twig_jax.twig.phead import p_head_weights
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
    from twig_jax.model.llama import scan_layers
    from twig_jax.twig.io import load_twig
    from twig_jax.eval.viz import patch_layout

    base = load_model(args.model, dtype=jnp.float32)
    twig = load_twig(args.twig, base.cfg.text, dtype=jnp.float32)
    tc, N = twig.twig_cfg, base.cfg.num_image_tokens
    if not 1 <= args.R <= N:
        p.error(f"--R {args.R} must be in [1, {N}] (the visual token count)")
    side, has_cls = patch_layout(base.cfg)
    if has_cls or side * side != N:
        p.error("the grid control needs a square patch grid without a CLS token")
    layers = ([int(x) for x in args.layers.split(",")] if args.layers else
              sorted({0, *range(tc.K, tc.Kf)}))
    recs = single_turn_records(load_records(args.data)[-args.records:])
    cfg = DataConfig(json_path=args.data, image_dir=args.images, max_len=args.max_len, batch_size=1, shuffle=False,
                     num_epochs=1)
    size = base.cfg.vision.image_size
    ds, _ = build_dataset(cfg, load_tokenizer(args.model), image_token_index=base.cfg.image_token_index,
                          num_image_tokens=N, image_preprocessor=image_preprocessor_for(base, args.model),
                          pixel_shape=(base.cfg.vision.num_channels, size, size), records=recs, shard=single_shard())
    batches = eval_batches(list(ds), args.batch)
    fz = FrozenModels(base, twig, tc.Kf)
    grid = jnp.asarray(grid_keep(side, args.cells, args.R))

    p_head = p_head_weights(twig.p_head) if twig.p_head is not None else None

    @jax.jit
    def rules(batch, key):
        pre = fz.prelude(batch)
        x, h_k, h_t, pos, query, img_pos, is_image = pre
        b = x.shape[0]
        out = fz.rule_rewards(p_head, pre, batch, key, args.R)
        out["grid"] = fz.reward(h_k, batch, is_image, jnp.broadcast_to(grid[None], (b, args.R)))
        for layer in layers:
            h_l = scan_layers(fz.tc, fz.base_w, x, pos, 0, layer)
            for rows in ("last", "answer"):
                a = attention_over_visual(fz.tc, fz.base_w, h_l, pos, layer, attention_rows(batch["label_mask"], rows),
                                          img_pos)
                out[f"base L{layer} {rows}"] = fz.reward(h_k, batch, is_image, jax.lax.top_k(a, args.R)[1])
        return out

    acc: dict = {}
    for i, b in enumerate(batches):
        accumulate(acc, rules({k: jnp.asarray(b[k]) for k in ("tokens", "label_mask", "pixel_values")},
                              jax.random.key(i)), b)
    result = {"R": args.R, "N": N, "records": args.records, "cells": args.cells,
              "rules": {k: {c: float(np.mean(v[c])) if v[c] else None for c in v} for k, v in acc.items()},
              "counts": {c: len(next(iter(acc.values()))[c]) for c in ("long", "short")}}
    print(f"R = {args.R} of {N}; mean log-prob of the reference answer (0 = certain); "
          f"{result['counts']['long']} long, {result['counts']['short']} short answers")
    print("| keep rule | long answers | short answers |\n|---|---|---|")
    for k, v in result["rules"].items():
        print(f"| {k} | {v['long']:.3f} | {v['short']:.3f} |")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
