"""Does the model look up the object a short question names? Per base layer, the share of the last
prompt token's visual attention (heads averaged, FastV's score at that layer) that falls on the
grid cell of the object the question asks about, against the share that attention spread evenly
over the scene's objects would give it (occupied-cell attention x 1 / number of objects).

    python -m research.lookup_probe --data DIR [--model DIR] [--kinds position,colour_of] [--n 40]

Questions used (shapes-world eval split): "where is the C S ?" (position) and "what colour is the
[size] S ?" (colour_of), whose object is known from the scene. Equal columns mean the last token
does not single out the asked object at that layer: the answer is not read by content lookup.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from twig_jax.eval.evaluate import DEFAULT_MODEL

KINDS = ("position", "colour_of")


def asked_cells(kind: str, question: str, objects) -> list[int]:
    """Scene cells (0..8) of the object the question names."""
    from twig_jax.data.shapes import POSITIONS, SIZES

    w = question.split()
    if kind == "position":  # where is the C S ?
        colour, shape = w[3], w[4]
        return [POSITIONS.index(o[3]) for o in objects if o[1] == colour and o[2] == shape]
    if kind == "colour_of":  # what colour is the [size] S ?
        shape, size = w[-2], (w[-3] if w[-3] in SIZES else None)
        return [POSITIONS.index(o[3]) for o in objects if o[2] == shape and (size is None or o[0] == size)]
    raise ValueError(f"unknown kind {kind!r}; have {KINDS}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a `twig-jax data shapes` output dir (its eval split)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--n", type=int, default=40, help="questions")
    p.add_argument("--out-json")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        p.error(f"--kinds {args.kinds!r}: choose from {KINDS}")

    import jax.numpy as jnp
    from PIL import Image

    from twig_jax.convert.llava import load_model
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
    from twig_jax.data.preprocess import build_prompt, tokenize_with_image
    from twig_jax.twig.config import TwigConfig
    from twig_jax.decode.generator import TwigGenerator
    from twig_jax.data.shapes import POSITIONS
    from twig_jax.eval.evaluate import read_questions
    from twig_jax.eval.viz import patch_layout
    from research.kept_coverage import cell_of_patch

    model = load_model(args.model, dtype=jnp.float32)
    tok, proc = load_tokenizer(args.model), image_preprocessor_for(model, args.model)
    cfg = model.cfg
    grid, has_cls = patch_layout(cfg)
    n_vis, L = cfg.num_image_tokens, cfg.text.num_hidden_layers
    cell = cell_of_patch(grid).reshape(-1)
    questions = {q.key: q for q in read_questions(os.path.join(args.data, "eval", "questions.jsonl"))}
    items = []
    with open(os.path.join(args.data, "eval", "answers.jsonl")) as f:
        for a in map(json.loads, f):
            if a.get("kind") in kinds and len(items) < args.n:
                q = questions[str(a["question_id"])]
                items.append((q, asked_cells(a["kind"], q.text, a["objects"]),
                              [POSITIONS.index(o[3]) for o in a["objects"]]))
    if not items:
        p.error(f"no {kinds} questions in {args.data}/eval")
    prompts = [tokenize_with_image(tok, build_prompt(q.text, "vicuna_v1"), cfg.image_token_index, n_vis)
               for q, _, _ in items]
    pixels = [proc([Image.open(os.path.join(args.data, "images", q.image)).convert("RGB")]) for q, _, _ in items]
    rows = []
    for K in range(1, L):  # FastV at K scores with base layer K-1's attention
        gen = TwigGenerator(model, None, TwigConfig(K=K, T=1, Kf=L, R=1), method="fastv", ssd=False)
        asked, even = [], []
        for prompt, pv, (_, tgt, occ) in zip(prompts, pixels, items):
            s, _ = gen.prune_scores([prompt], pv)
            s = np.asarray(s[0], np.float64)[int(has_cls):]
            s = s / s.sum()
            asked.append(s[np.isin(cell, tgt)].sum())
            even.append(s[np.isin(cell, occ)].sum() * len(tgt) / len(occ))
        rows.append({"layer": K - 1, "asked_object": float(np.mean(asked)), "even_share": float(np.mean(even))})
    print(f"{len(items)} questions ({', '.join(kinds)}), model {args.model}")
    print("| layer | attention on the asked object's cell | even share over the scene's objects |\n|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['asked_object']:.3f} | {r['even_share']:.3f} |")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"model": args.model, "questions": len(items), "kinds": kinds, "layers": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
