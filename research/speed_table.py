"""End-to-end speed of TwigVLM on the bundled shapes model: FastV, TTP, SSD, TTP + SSD (TTP with its
top-R keep-set and with the coverage keep-set, ttp.cover_visual; and the TwigVLM++ P-head with and
without SSD, when the twig has one, with the twig config's keep-set rule) against plain decoding,
on descriptions (long answers), at batch 1 and batch 8.

    python -m research.speed_table [--model DIR] [--twig DIR] [--R 16] [--images N] [--repeats 3]
                                [--out-json F] [--out-md F]

Speed = generated tokens / (prefill + decode time) of `generate()` on preprocessed inputs (image
decoding excluded, the same for every method), summed over the batches of a pass. Every variant
is compiled by a warm-up pass first; then passes run round-robin over the variants `--repeats`
times and the median pass counts, so a noisy machine slows every variant alike. The ratio column
is speed / plain decoding's speed in the same run. "plain" is `generate.Generator` (the fast
per-layer decoder, no pruning); "ssd" drafts with the twig but keeps every visual token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from twig_jax.bench.timing import median_pass, run_pass, timed_passes  # noqa: F401 (re-exported for research scripts)
from twig_jax.decode.variants import parse_variant

# decode/variants.py names; the bundled setting is the P-head with its coverage keep-set
VARIANTS = ("plain", "fastv", "twig", "ssd", "twig+ssd", "twig+tree", "twig-cover", "twig-cover+ssd",
            "phead-cover", "phead-cover+ssd", "phead-cover+tree")


def table_order(name: str) -> tuple:
    """Rows in VARIANTS' order; a variant without drafting just before its +ssd twin."""
    v = parse_variant(name)
    base = dataclasses.replace(v, ssd=False, spec="chain").name
    return (VARIANTS.index(base) if base in VARIANTS else len(VARIANTS), base, v.ssd)


def lossless_reference(name: str) -> str | None:
    """The variant an SSD variant must match token for token (itself without drafting)."""
    v = parse_variant(name)
    return dataclasses.replace(v, ssd=False, spec="chain").name if v.ssd else None


def description_inputs(pipe, questions, images_dir: str, n: int):
    """Token prompts and pixels of the first n description questions.  # prompts, [n, 3, H, W]"""
    desc = [q for q in questions if q.category == "description"][:n]
    if len(desc) < n:
        raise ValueError(f"only {len(desc)} description questions in the question file, need {n}")
    prompts = pipe.encode([q.text for q in desc])
    pixels = pipe.image_processor([os.path.join(images_dir, q.image) for q in desc])
    return prompts, pixels


def load_model_and_twig(model_dir: str, twig_dir: str, dtype: str = "float32"):
    """The model (weights cast to `dtype` on load, as the demo and the eval run it), its tokenizer,
    the twig and its config, and a Pipeline for encoding inputs."""
    import jax.numpy as jnp

    from twig_jax.convert.llava import load_model
    from twig_jax.pipeline import Pipeline, image_preprocessor_for, load_tokenizer
    from twig_jax.twig.io import load_twig_any

    model = load_model(model_dir, dtype=jnp.dtype(dtype))
    tokenizer = load_tokenizer(model_dir)
    twig, twig_cfg = load_twig_any(twig_dir, model.cfg.text, dtype=model.text.embed[...].dtype)
    return model, tokenizer, twig, twig_cfg, Pipeline(model, tokenizer, image_preprocessor_for(model, model_dir))


def description_batch(pipe, data_dir: str | None, n: int):
    """description_inputs from a shapes dataset dir, or (None) from seed 0's eval split in a temp dir."""
    import tempfile

    from twig_jax.eval.evaluate import read_questions

    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:
            from twig_jax.data.shapes import generate_dataset

            data_dir = tmp
            generate_dataset(tmp, 0, n, seed=0)
        questions = read_questions(os.path.join(data_dir, "eval", "questions.jsonl"))
        return description_inputs(pipe, questions, os.path.join(data_dir, "images"), n)


def measure_speed(model, tokenizer, twig, twig_cfg, prompts, pixels, *, batches=(1, 8), repeats: int = 3,
                  max_new_tokens: int = 128, variants=tuple(VARIANTS), log=print) -> list[dict]:
    """Rows of the speed table, one per (batch, variant); plain decoding is the reference."""
    from twig_jax.decode.generator import make_generator

    eos_ids = (tokenizer.eos_token_id,)
    gens = {}
    for name in variants:
        v = parse_variant(name)
        cfg = dataclasses.replace(twig_cfg, spec=v.spec, **({} if v.method == "none" else {"select": v.select}))
        gens[name] = make_generator(model, twig, cfg, method=v.method, ssd=v.ssd)
    rows = []
    for batch in batches:
        if len(prompts) % batch:
            raise ValueError(f"{len(prompts)} inputs is not a multiple of batch {batch}")
        passes = timed_passes(gens, prompts, pixels, batch, repeats, max_new_tokens, eos_ids)
        plain_tokens = None
        for name in gens:
            ps = passes[name]
            med = median_pass(ps)
            speed = med["tokens"] / med["seconds"]
            row = dict(batch=batch, variant=name, seconds=med["seconds"], tokens=med["tokens"],
                       tokens_per_s=speed, all_seconds=[p["seconds"] for p in ps])
            if med["rounds"]:
                row.update(acceptance_rate=med["accepted"] / max(med["drafted"], 1),
                           mean_tokens_per_round=med["emitted"] / med["rounds"], rounds=med["rounds"])
            if name == "plain":
                plain_tokens, plain_speed = med["outputs"], speed
            rows.append(row)
        # Greedy SSD is lossless: it must reproduce its non-speculative counterpart token for token.
        outs = {name: passes[name][0]["outputs"] for name in gens}
        for spec in outs:
            ref = lossless_reference(spec)
            if ref in outs:
                same = outs[spec] == outs[ref]
                next(r for r in rows if r["batch"] == batch and r["variant"] == spec)["same_tokens_as_" + ref] = same
                if not same:
                    log(f"WARNING: batch {batch}: {spec} tokens differ from {ref}")
        for row in rows:
            if row["batch"] == batch:
                row["speedup"] = row["tokens_per_s"] / plain_speed
        if plain_tokens is not None:
            log(f"batch {batch}: " + ", ".join(f"{r['variant']} {r['speedup']:.2f}x" for r in rows
                                                if r["batch"] == batch))
    return rows


def make_generator_plan_R(model, twig_cfg) -> int:
    """The kept count R the generators use (R, or R from the R-bar budget)."""
    from twig_jax.decode.prune import make_plan

    return make_plan(model.cfg, twig_cfg, "twig").R


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("| batch | method | tokens | seconds | tokens/s | speed vs plain | acceptance | tokens/round |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        acc = f"{r['acceptance_rate']:.1%}" if "acceptance_rate" in r else "-"
        tpr = f"{r['mean_tokens_per_round']:.2f}" if "mean_tokens_per_round" in r else "-"
        lines.append(f"| {r['batch']} | {r['variant']} | {r['tokens']} | {r['seconds']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | **{r['speedup']:.2f}x** | {acc} | {tpr} |")
    lines.append("")
    lines.append(f"R = {meta['R']} of N = {meta['N']} visual tokens, K = {meta['K']}, Kf = {meta['Kf']}, "
                 f"draft_len = {meta['draft_len']}, theta = {meta['theta']}; {meta['n_inputs']} descriptions, "
                 f"max {meta['max_new_tokens']} new tokens; median of {meta['repeats']} passes; keep-sets: top R, "
                 f"coverage for twig-cover, {meta.get('phead_select', 'top')} for the P-head.")
    return "\n".join(lines)


def main(argv=None) -> int:
    from twig_jax.eval.evaluate import DEFAULT_MODEL, DEFAULT_TWIG

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--twig", default=DEFAULT_TWIG)
    p.add_argument("--data", default=None, help="shapes dataset dir (eval/questions.jsonl + images/); "
                                                "default: the eval split generated for seed 0 in a temp dir")
    p.add_argument("--R", type=int, default=None, help="kept visual tokens (default: the twig's, N/9 when bundled)")
    p.add_argument("--Kf", type=int, default=None, help="FinalWipe layer (default: the twig's; L: no FinalWipe)")
    p.add_argument("--draft-len", type=int, default=None, help="most tokens drafted per SSD round (default: the twig's)")
    p.add_argument("--tree-width", type=int, default=None, help="E of the +tree rows (default: the twig's)")
    p.add_argument("--tree-depth", type=int, default=None, help="D of the +tree rows (default: the twig's)")
    p.add_argument("--tree-nodes", type=int, default=None, help="N of the +tree rows (default: the twig's)")
    p.add_argument("--theta", type=float, default=None,
                   help="stop drafting below this top probability (default: the twig's)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (plain is always run: the reference)")
    p.add_argument("--images", type=int, default=16, help="descriptions per pass (a multiple of 8)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights are cast to this on load (default %(default)s, as the demo and the eval run the bundle)")
    args = p.parse_args(argv)
    from twig_jax.twig.config import TwigConfigError

    asked = [v for v in (args.variants or "").split(",") if v]
    try:
        asked_variants = [parse_variant(v) for v in asked]
    except TwigConfigError as e:
        p.error(f"--variants: {e}")

    model, tokenizer, twig, twig_cfg, pipe = load_model_and_twig(args.model, args.twig, args.dtype)
    if args.R is not None:
        twig_cfg = dataclasses.replace(twig_cfg, R=args.R, R_bar=None)
    if args.Kf is not None:
        twig_cfg = dataclasses.replace(twig_cfg, Kf=args.Kf)
    if args.draft_len is not None:
        twig_cfg = dataclasses.replace(twig_cfg, draft_len=args.draft_len)
    if args.theta is not None:
        twig_cfg = dataclasses.replace(twig_cfg, theta=args.theta)
    for name in ("tree_width", "tree_depth", "tree_nodes"):
        if getattr(args, name) is not None:
            twig_cfg = dataclasses.replace(twig_cfg, **{name: getattr(args, name)})
    try:
        twig_cfg.validate(model.cfg.text.num_hidden_layers, model.cfg.num_image_tokens)
    except TwigConfigError as e:
        p.error(str(e))
    prompts, pixels = description_batch(pipe, args.data, args.images)
    batches = tuple(int(b) for b in args.batches.split(","))
    variants = tuple(v for v in VARIANTS if twig.p_head is not None or parse_variant(v).method != "phead")
    if asked:
        phead = sorted(v.name for v in asked_variants if v.method == "phead")
        if twig.p_head is None and phead:
            p.error(f"--variants {phead}: the twig {args.twig} has no P-head")
        variants = ("plain",) + tuple(sorted(set(asked) - {"plain"}, key=table_order))
    rows = measure_speed(model, tokenizer, twig, twig_cfg, prompts, pixels, batches=batches, repeats=args.repeats,
                         max_new_tokens=args.max_new_tokens, variants=variants,
                         log=lambda s: print(s, file=sys.stderr))
    N = model.cfg.num_image_tokens
    R = make_generator_plan_R(model, twig_cfg)
    meta = dict(model=args.model, twig=args.twig, R=R, N=N, K=twig_cfg.K, Kf=twig_cfg.Kf,
                draft_len=twig_cfg.draft_len, theta=twig_cfg.theta, phead_select=twig_cfg.select, n_inputs=args.images,
                max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    md = markdown(rows, meta)
    print(md)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
