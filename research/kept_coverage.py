"""Where the kept visual tokens lie: for TTP (twig), FastV and random at one R, on shapes-world eval
images, the share of objects that keep at least one of their patches, and the share of kept
patches that show object pixels.

    python -m research.kept_coverage --data DIR [--images 40] [--R 16] [--prompt "describe the image ."]
                                  [--model DIR] [--twig DIR] [--out-json FILE]

An object counts as covered when a kept patch lies in its grid cell (the shapes tower gives every
patch of a cell that cell's object, so one kept patch of the cell is enough to read it) and as hit
when a kept patch holds at least --min-pixels saturated (object-coloured) pixels. Random is the
mean over --random-draws draws per image. Scores come from the same prefill the generators use
(TwigGenerator.prune_scores), so this is exactly what TTP and FastV keep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from twig_jax.eval.evaluate import DEFAULT_MODEL, DEFAULT_TWIG


def object_patches(image: np.ndarray, grid: int, min_pixels: int, saturation: int = 60) -> np.ndarray:
    """[grid, grid] bool: patches holding >= min_pixels object pixels. The shapes background is
    grey (low saturation); objects are saturated colours."""
    img = image.astype(np.int32)
    sat = img.max(-1) - img.min(-1)  # [H, W]
    p = img.shape[0] // grid
    counts = (sat > saturation).reshape(grid, p, grid, p).sum((1, 3))
    return counts >= min_pixels


def cell_of_patch(grid: int, cells: int = 3) -> np.ndarray:
    """[grid, grid] int: the 3x3 scene cell each patch lies in (row-major)."""
    per = grid // cells
    r, c = np.divmod(np.arange(grid * grid), grid)
    return ((r // per) * cells + c // per).reshape(grid, grid)


def coverage(kept: np.ndarray, occupied: list[int], obj_patch: np.ndarray, cell_map: np.ndarray) -> dict:
    """kept: [grid, grid] bool. Share of objects with a kept patch in their cell / on their pixels,
    and share of kept patches on object pixels."""
    in_cell = [bool(kept[cell_map == c].any()) for c in occupied]
    on_obj = [bool((kept & obj_patch & (cell_map == c)).any()) for c in occupied]
    n_kept = int(kept.sum())
    return {"objects_covered": float(np.mean(in_cell)), "objects_hit": float(np.mean(on_obj)),
            "kept_on_objects": float((kept & obj_patch).sum() / max(n_kept, 1))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a `twig-jax data shapes` output dir (its eval split)")
    p.add_argument("--images", type=int, default=40, help="first N eval images")
    p.add_argument("--R", type=int, default=16)
    p.add_argument("--prompt", default="describe the image .")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--twig", default=DEFAULT_TWIG)
    p.add_argument("--score-rows", choices=("last", "text"), default=None,
                   help="TTP/FastV query rows (default: the twig's; text: every text row, the paper's equation)")
    p.add_argument("--min-pixels", type=int, default=3)
    p.add_argument("--random-draws", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json")
    args = p.parse_args(argv)

    import dataclasses

    import jax.numpy as jnp
    from PIL import Image

    from twig_jax.convert.llava import load_model
    from twig_jax.data.shapes import POSITIONS
    from twig_jax.eval.evaluate import read_questions
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
    from twig_jax.twig.io import load_twig_any
    from twig_jax.data.preprocess import build_prompt, tokenize_with_image
    from twig_jax.twig.config import baseline_keep_rule
    from twig_jax.decode.generator import TwigGenerator
    from twig_jax.eval.viz import kept_cells, patch_layout

    model = load_model(args.model, dtype=jnp.float32)
    tok = load_tokenizer(args.model)
    proc = image_preprocessor_for(model, args.model)
    twig, _ = load_twig_any(args.twig, model.cfg.text, dtype=jnp.float32)
    cfg = model.cfg
    grid, has_cls = patch_layout(cfg)
    if not 1 <= args.R <= cfg.num_image_tokens:
        p.error(f"--R {args.R}: must be in 1..{cfg.num_image_tokens} (the visual token count)")
    tc = dataclasses.replace(twig.twig_cfg, R=args.R, R_bar=None,
                             score_rows=args.score_rows or twig.twig_cfg.score_rows)
    scored = ("twig", "phead", "fastv") if twig.p_head is not None else ("twig", "fastv")
    gens = {m: TwigGenerator(model, twig if m in ("twig", "phead") else None, baseline_keep_rule(tc, m), method=m,
                             ssd=False)
            for m in scored}
    prompt = tokenize_with_image(tok, build_prompt(args.prompt, "vicuna_v1"), cfg.image_token_index,
                                 cfg.num_image_tokens)
    cell_map = cell_of_patch(grid)
    rng = np.random.default_rng(args.seed)
    image_of = {q.key: q.image for q in read_questions(os.path.join(args.data, "eval", "questions.jsonl"))}
    scenes = {}  # image -> occupied cells
    with open(os.path.join(args.data, "eval", "answers.jsonl")) as f:
        for r in map(json.loads, f):
            scenes.setdefault(image_of[str(r["question_id"])], [POSITIONS.index(o[3]) for o in r["objects"]])
    names = sorted(scenes)[:args.images]
    rows = {m: [] for m in scored + ("random",)}
    for name in names:
        image = Image.open(os.path.join(args.data, "images", name)).convert("RGB")
        obj = object_patches(np.asarray(image), grid, args.min_pixels)
        pixels = proc([image])
        for m, gen in gens.items():
            _, keep = gen.prune_scores([prompt], pixels)
            rows[m].append(coverage(kept_cells(keep[0], grid, has_cls), scenes[name], obj, cell_map))
        draws = []
        for _ in range(args.random_draws):
            kept = np.zeros(grid * grid, bool)
            kept[rng.choice(grid * grid, args.R, replace=False)] = True
            draws.append(coverage(kept.reshape(grid, grid), scenes[name], obj, cell_map))
        rows["random"].append({k: float(np.mean([d[k] for d in draws])) for k in draws[0]})
    result = {"R": args.R, "N": cfg.num_image_tokens, "images": len(names), "prompt": args.prompt,
              "score_rows": tc.score_rows, "K": tc.K,
              "methods": {m: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for m, rs in rows.items()}}
    print(f"R = {args.R} of {cfg.num_image_tokens}, {len(names)} images, prompt {args.prompt!r}, "
          f"score rows {tc.score_rows!r}")
    print("| method | objects with a kept patch in their cell | objects with a kept patch on their pixels | "
          "kept patches on object pixels |\n|---|---|---|---|")
    for m, v in result["methods"].items():
        print(f"| {m} | {100 * v['objects_covered']:.1f}% | {100 * v['objects_hit']:.1f}% | "
              f"{100 * v['kept_on_objects']:.1f}% |")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
