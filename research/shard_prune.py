"""Sharded pruning: accuracy kept when the prompt's visual tokens are split over S devices and the
kept set is chosen across them exactly or shard by shard.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m research.shard_prune \\
        [--methods twig,phead] [--rules exact,local] [--shards 1,2,4,8] [--ninths 1] [--n-eval 100] \\
        [--out-json FILE] [--out-md FILE]

The bundled shapes LLaVA and its twig answer the shapes eval split (generated for --seed) greedily,
unpruned once and then once per (method, keep rule, S): S = 1 on one device, S > 1 on the mesh
data = D / S, sequence = S over the D devices, where the pruned prefill splits the prompt over
"sequence" (decode/prompt_layout.py). The rule "exact" keeps the unsharded keep set (its answers
must equal S = 1's, and the table says whether they do); "local" keeps the top R / S of each shard's
visual tokens without communication. Every run keeps R = k N / 9 visual tokens by the top-R rule
(local has no coverage form). Each row carries accuracy kept against the unpruned model with a 95%
paired bootstrap interval over the images (research.bootstrap), local's margin against exact at
S = 1 with its interval, and the bytes the keep rule communicates per prompt
(twig/keep_sharded.comm_bytes). Memory and communication of the whole prefill on a long prompt:
research/shard_cost.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time

from research.accuracy_table import eval_files, kept_for
from research.bootstrap import difference_interval, image_sums, image_weights, kept_interval
from twig_jax.eval.evaluate import (DEFAULT_MODEL, DEFAULT_TWIG, DESCRIPTION, SHORT, EvalConfig, accuracy,
                                    attach_categories, json_safe, read_answers, read_questions,
                                    resolve_twig_config, run_eval)
from twig_jax.files import write_json_atomic, write_text_atomic

RULES = ("exact", "local")


def mesh_for(shards: int, batch: int):
    """None for S = 1 (one device); else research.shard_cost's layout, data = D / S, sequence = S
    over all D devices."""
    import jax

    from research.shard_cost import mesh_for as layout
    from twig_jax.parallel.sharding import make_mesh, parse_mesh

    if shards == 1:
        return None
    devices = jax.device_count()
    if devices % shards:
        raise SystemExit(f"--shards {shards}: {devices} devices do not split into {shards} (set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count=8 on a CPU)")
    spec, _ = layout(shards, batch, devices)
    return make_mesh(parse_mesh(spec))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def markdown(result: dict) -> str:
    lines = ["| method | rule | S | short EM kept | description F1 kept | local - exact (short / desc.) "
             "| answers = S 1 | keep-rule bytes / prompt |", "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        kept, ci = r["kept"], r.get("kept_ci") or {}
        margin = r.get("margin_vs_exact")
        m = "" if margin is None else (f"{100 * margin['value'][SHORT]:+.1f}{_ci(margin['ci'][SHORT])} / "
                                       f"{100 * margin['value'][DESCRIPTION]:+.1f}{_ci(margin['ci'][DESCRIPTION])}")
        lines.append(f"| {r['method']} | {r['rule']} | {r['shards']} | {_pct(kept[SHORT])}{_ci(ci.get(SHORT))} | "
                     f"{_pct(kept[DESCRIPTION])}{_ci(ci.get(DESCRIPTION))} | {m} | "
                     f"{'yes' if r['same_answers_as_s1'] else 'no'} | {r['keep_comm_bytes']:,} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--twig", default=DEFAULT_TWIG)
    p.add_argument("--questions")
    p.add_argument("--images")
    p.add_argument("--answers")
    p.add_argument("--data", help="a `twig-jax data shapes` output dir (its eval split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=100, help="shapes eval images (without --questions / --data)")
    p.add_argument("--limit", type=int, help="first N questions only")
    p.add_argument("--methods", default="twig,phead")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--shards", default="1,2,4,8")
    p.add_argument("--ninths", type=int, default=1, help="keep R = k N / 9 (1: 88.9%% pruned)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-short", type=int, default=16)
    p.add_argument("--max-new-description", type=int, default=96)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--out-json")
    p.add_argument("--out-md")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    rules = [r for r in args.rules.split(",") if r]
    shards = [int(s) for s in args.shards.split(",") if s]
    if set(rules) - set(RULES):
        p.error(f"--rules {args.rules}: each one of {RULES}")
    if 1 not in shards:
        p.error("--shards must include 1 (the unsharded reference)")
    if args.batch % 8:
        p.error(f"--batch {args.batch}: a multiple of 8, so every mesh's data axis divides it")

    import jax.numpy as jnp

    from twig_jax.convert.llava import load_model
    from twig_jax.decode.generator import make_generator
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
    from twig_jax.twig.config import needs_twig
    from twig_jax.twig.io import load_twig_any
    from twig_jax.twig.keep_sharded import comm_bytes

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shapes_eval_") as tmp:
        qpath, images, apath = eval_files(args, tmp)
        answers = read_answers(apath)
        questions = attach_categories(read_questions(qpath), answers, qpath, apath)[:args.limit]
        answers = {q.key: answers[q.key] for q in questions}
        model = load_model(args.model, dtype=jnp.float32)
        twig, _ = load_twig_any(args.twig, model.cfg.text, dtype=jnp.float32)
        tokenizer, improc = load_tokenizer(args.model), image_preprocessor_for(model, args.model)
        L, N = model.cfg.text.num_hidden_layers, model.cfg.num_image_tokens
        R = kept_for(N, args.ninths)
        max_new = {SHORT: args.max_new_short, DESCRIPTION: args.max_new_description}
        image_ids = sorted({q.image for q in questions})
        weights = image_weights(len(image_ids), args.bootstrap) if args.bootstrap else None
        image_cache: dict = {}

        def one(method: str, rule: str, s: int):
            cfg = EvalConfig(method=method, R=None if method == "none" else R,
                             select=None if method == "none" else "top", batch_size=args.batch,
                             max_new_tokens=max_new)
            tc = resolve_twig_config(model, twig, cfg)
            tc = None if tc is None else dataclasses.replace(tc, shard_keep=rule)
            gen = make_generator(model, twig if needs_twig(method) else None, tc, method=method, ssd=False,
                                 mesh=mesh_for(s, args.batch), batch_buckets=(args.batch,))
            t0 = time.perf_counter()
            records, m = run_eval(model, tokenizer, questions, cfg, images_dir=images, twig=twig, image_processor=improc,
                                  answers=answers, generator=gen, image_cache=image_cache)
            preds = {q.key: r["text"] for q, r in zip(questions, records)}
            acc = {c: accuracy(m, c) for c in (SHORT, DESCRIPTION)}
            print(f"{method:>6} {rule:>5} S={s}: short EM {_pct(acc[SHORT])}, description F1 {acc[DESCRIPTION]:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            return preds, acc, image_sums(questions, preds, answers, image_ids)

        _, base_acc, base_sums = one("none", "exact", 1)
        runs = []
        for method in methods:
            ref_preds, ref_acc, ref_sums = one(method, "exact", 1)
            for rule in rules:
                for s in shards:
                    if s == 1 and rule == "local":
                        continue  # one shard keeps its own top R: the same run as exact
                    preds, acc, sums = (ref_preds, ref_acc, ref_sums) if s == 1 else one(method, rule, s)
                    row = {"method": method, "rule": rule, "shards": s, "R": R, "accuracy": acc,
                           "kept": {c: acc[c] / base_acc[c] if base_acc[c] else None for c in acc},
                           "same_answers_as_s1": preds == ref_preds,
                           "keep_comm_bytes": 0 if s == 1 else comm_bytes(
                               1, N, R, s, jnp.float32, feature_dim=model.cfg.text.hidden_size,
                               heads=model.cfg.text.num_attention_heads)["top" if rule == "exact" else "local"]}
                    if weights is not None:
                        row["kept_ci"] = kept_interval(sums, base_sums, weights)
                        if rule == "local":
                            d = difference_interval(sums, ref_sums, base_sums, weights)
                            value = {c: (acc[c] - ref_acc[c]) / base_acc[c] for c in acc}
                            row["margin_vs_exact"] = {"value": value, "ci": d}
                    runs.append(row)
    result = {"date": time.strftime("%Y-%m-%d"), "command": "python -m research.shard_prune " + " ".join(argv or sys.argv[1:]),
              "model": args.model, "twig": args.twig, "N": N, "R": R, "L": L, "questions": len(questions),
              "images": len(image_ids), "unpruned": base_acc, "runs": runs, "seconds": time.perf_counter() - t_all}
    md = markdown(result)
    print(md)
    if args.out_json:
        write_json_atomic(args.out_json, json_safe(result))
    if args.out_md:
        write_text_atomic(args.out_md, md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
