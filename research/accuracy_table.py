"""Accuracy kept after pruning: twig (TTP), the TwigVLM++ P-head, FastV and random (each with its published top-R
keep-set, and with the coverage keep-set) at 88.9%, 77.8% and 66.7% of the visual tokens pruned
(R = N/9, 2N/9, 3N/9), short answers (exact match) and descriptions (object-level F1) separately,
each relative to the unpruned model.

    python -m research.accuracy_table [--model DIR] [--twig DIR] [--questions FILE --images DIR --answers FILE]
                                   [--data DIR] [--limit N] [--methods twig,fastv,random] [--ninths 1,2,3]
                                   [--Kf KF] [--out-json FILE] [--out-md FILE]

Each kept cell carries a 95% interval from a paired bootstrap over the eval images (research.bootstrap:
the images are drawn with replacement and every run is re-scored on the same draw), and a second
table gives each method's margin over FastV and random at the same R, with its interval.

One unpruned run (method none) and one run per (method, R), all greedy without SSD (greedy SSD is
token-identical to the pruned model's greedy decode, so it cannot change accuracy). FastV and
random prune at the twig's K and Kf. Each (method, R) generator is compiled once (one batch
shape per category) and serves both categories; images are read once for all runs.

Eval data: --questions/--images/--answers, or --data DIR (a `twig-jax data shapes` output:
DIR/eval/{questions,answers}.jsonl, DIR/images), or by default the shapes world's eval split
for --seed/--n-eval, generated into a temporary directory (deterministic per seed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

from twig_jax.decode.variants import parse_variant
from research.bootstrap import difference_interval, image_sums, image_weights, kept_interval
from twig_jax.eval.evaluate import (
    DEFAULT_MODEL, DEFAULT_TWIG, DESCRIPTION, SHORT, EvalConfig, accuracy, attach_categories, build_generator,
    json_safe, read_answers, read_questions, run_eval,
)

PRUNED_NINTHS = (1, 2, 3)  # R = k N / 9 kept: 88.9%, 77.8%, 66.7% pruned
# table rows (decode/variants.py names): top R of the scores (the published methods), a draw from the
# P-head's scores ("-sample"), score-weighted coverage ("-cover"); the FastV and random coverage rows
# are controls for the coverage rule itself
METHODS = ("twig", "phead", "phead-sample", "fastv", "random", "twig-cover", "phead-cover", "fastv-cover",
           "random-cover")
RUN_AS = {name: (parse_variant(name).method, parse_variant(name).select) for name in METHODS}
LABELS = {name: parse_variant(name).label for name in METHODS} | {"none": "unpruned"}


def kept_for(n_visual: int, k: int) -> int:
    return max(1, round(n_visual * k / 9))


def ratio(a: float, b: float) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return float("nan")
    return a / b


def _pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _f3(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


def _ci(ci) -> str:
    if not ci or any(x is None or math.isnan(x) for x in ci):
        return ""
    return f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _signed_ci(d: float, ci) -> str:
    if d is None or math.isnan(d):
        return "-"
    return f"{100 * d:+.1f}" + ("" if not ci or any(math.isnan(x) for x in ci) else
                                f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]")


BASELINES = ("fastv", "random")  # the margin table compares every other row with these


def add_margins(runs: list[dict], run_sums: dict, base_sums, weights) -> None:
    """Set each non-baseline run's "margin": {baseline: {"diff", "ci"}} over the baselines at the same
    R (kept minus the baseline's kept per category), paired on the same bootstrap draws."""
    by_key = {(r["method"], r["ninths"]): r for r in runs}
    for r in runs:
        r["margin"] = {}
        if r["method"] in BASELINES:
            continue
        for b in BASELINES:
            other = by_key.get((b, r["ninths"]))
            if other is None:
                continue
            diff = {c: None if r["kept"][c] is None else r["kept"][c] - other["kept"][c] for c in r["kept"]}
            ci = difference_interval(run_sums[(r["method"], r["ninths"])], run_sums[(b, r["ninths"])], base_sums, weights)
            r["margin"][b] = {"diff": diff, "ci": ci}


def margin_markdown(result: dict) -> str:
    """Each non-baseline row's accuracy kept minus FastV's and random's at the same R (points, 95% CI)."""
    runs = result["runs"]
    cats = [c for c in (SHORT, DESCRIPTION) if result["unpruned"]["accuracy"].get(c) is not None]
    have = [b for b in BASELINES if any(r["method"] == b for r in runs)]
    rows = [r for r in runs if r["method"] not in BASELINES and r.get("margin")]
    if not have or not rows:
        return ""
    cname = {SHORT: "short", DESCRIPTION: "descriptions"}
    head = ["method", "R"] + [f"vs {LABELS[b]}, {cname[c]}" for b in have for c in cats]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for b in have:
            m = r["margin"].get(b)
            for c in cats:
                cells.append("-" if m is None else _signed_ci(m["diff"][c], m["ci"][c]))
        lines.append(f"| {LABELS[r['method']]} | {r['R']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Margin = the row's accuracy kept minus the baseline's at the same R, in points of unpruned "
                 f"accuracy; 95% interval from {result.get('bootstrap', {}).get('replicates', '?')} paired bootstrap "
                 f"draws of the {result.get('bootstrap', {}).get('images', '?')} eval images.")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The issue's table: rows = methods, columns = pruning ratio, per category; cells are
    accuracy kept (method accuracy / unpruned accuracy) with the accuracy itself in brackets."""
    runs, base = result["runs"], result["unpruned"]
    n = result["N"]
    ninths = sorted({r["ninths"] for r in runs})
    r_of = {r["ninths"]: r["R"] for r in runs}
    cats = [c for c in (SHORT, DESCRIPTION) if base["accuracy"].get(c) is not None]
    cname = {SHORT: "short (EM)", DESCRIPTION: "descriptions (F1)"}
    head = ["method"] + [f"{cname[c]}, {100 * (1 - k / 9):.1f}% pruned (R={r_of[k]})" for c in cats for k in ninths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| unpruned (accuracy) | " + " | ".join(
        _pct(base["accuracy"][c]) if c == SHORT else _f3(base["accuracy"][c]) for c in cats for _ in ninths) + " |")
    for m in [m for m in METHODS if any(r["method"] == m for r in runs)]:
        cells = []
        for c in cats:
            for k in ninths:
                r = next((r for r in runs if r["method"] == m and r["ninths"] == k), None)
                if r is None:
                    cells.append("-")
                    continue
                acc = r["accuracy"][c]
                acc_s = _pct(acc) if c == SHORT else _f3(acc)
                cells.append(f"**{_pct(r['kept'][c])}** ({acc_s}){_ci((r.get('kept_ci') or {}).get(c))}")
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    q = result["questions"]
    lines.append("")
    boot = result.get("bootstrap")
    lines.append("Accuracy kept = method accuracy / unpruned accuracy (accuracy in brackets"
                 + (f"; 95% interval in square brackets, {boot['replicates']} paired bootstrap draws of the "
                    f"{boot['images']} eval images" if boot else "") + f"); N = {n} visual tokens, "
                 f"K = {result['K']}, Kf = {result['Kf']} of L = {result['L']}; {q[SHORT]} short questions, "
                 f"{q[DESCRIPTION]} descriptions; greedy, no SSD.")
    return "\n".join(lines)


def eval_files(args, tmp: str) -> tuple[str, str, str]:
    if args.questions or args.answers:
        if not (args.questions and args.answers and args.images):
            raise SystemExit("give --questions, --answers and --images together")
        return args.questions, args.images, args.answers
    if args.data:
        return (os.path.join(args.data, "eval", "questions.jsonl"), os.path.join(args.data, "images"),
                os.path.join(args.data, "eval", "answers.jsonl"))
    from twig_jax.data.shapes import generate_dataset

    print(f"generating the shapes eval split (seed {args.seed}, {args.n_eval} images) in {tmp}", file=sys.stderr)
    generate_dataset(tmp, 0, args.n_eval, args.seed)
    return os.path.join(tmp, "eval", "questions.jsonl"), os.path.join(tmp, "images"), \
        os.path.join(tmp, "eval", "answers.jsonl")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="converted LLaVA dir (default: the bundled shapes LLaVA)")
    p.add_argument("--twig", default=DEFAULT_TWIG, help="twig dir (default: the bundled twig)")
    p.add_argument("--questions")
    p.add_argument("--images")
    p.add_argument("--answers")
    p.add_argument("--data", help="a `twig-jax data shapes` output dir (its eval split)")
    p.add_argument("--seed", type=int, default=0, help="shapes eval split seed (without --questions/--data)")
    p.add_argument("--n-eval", type=int, default=200, help="shapes eval images (without --questions/--data)")
    p.add_argument("--limit", type=int, help="first N questions only")
    p.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)} "
                   "(default: all; the P-head rows only when the twig has a P-head)")
    p.add_argument("--ninths", default=",".join(map(str, PRUNED_NINTHS)),
                   help="comma list of k: runs keep R = k N / 9 visual tokens (default 1,2,3)")
    p.add_argument("--Kf", type=int, default=None, help="FinalWipe layer of every pruned run (default: the twig's; "
                   "the number of layers L: no FinalWipe)")
    p.add_argument("--score-rows", choices=("last", "text"), default=None,
                   help="twig / FastV score query rows of every pruned run (default: the twig's)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-short", type=int, default=16)
    p.add_argument("--max-new-description", type=int, default=128)
    p.add_argument("--out-json", help="write all runs' metrics here")
    p.add_argument("--out-md", help="write the markdown table here")
    p.add_argument("--preds-dir", help="write each run's answer JSONL into this folder")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help="bootstrap replicates over the eval images for the 95%% intervals (0: none)")
    args = p.parse_args(argv)
    methods = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; have {list(METHODS)}")
    try:
        ninths = [int(k) for k in args.ninths.split(",") if k.strip()]
    except ValueError:
        p.error(f"--ninths {args.ninths!r}: give a comma list of integers 1..8")
    if not ninths or any(not 1 <= k <= 8 for k in ninths):
        p.error(f"--ninths {args.ninths!r}: each k must be in 1..8 (R = k N / 9 kept)")
    if args.bootstrap < 0:
        p.error(f"--bootstrap {args.bootstrap}: give a number of replicates >= 0")

    import jax.numpy as jnp

    from twig_jax.convert.llava import load_model
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
    from twig_jax.twig.io import load_twig_any

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shapes_eval_") as tmp:
        qpath, images, apath = eval_files(args, tmp)
        answers = read_answers(apath)
        questions = attach_categories(read_questions(qpath), answers, qpath, apath)
        if args.limit:
            questions = questions[:args.limit]
        keys = {q.key for q in questions}
        answers = {k: v for k, v in answers.items() if k in keys}

        model = load_model(args.model, dtype=jnp.float32)
        tokenizer = load_tokenizer(args.model)
        improc = image_preprocessor_for(model, args.model)
        twig = None
        if args.twig and os.path.exists(args.twig):
            twig, _ = load_twig_any(args.twig, model.cfg.text, dtype=model.text.embed[...].dtype)
        elif any(RUN_AS[m][0] in ("twig", "phead") for m in methods):
            p.error(f"twig dir not found: {args.twig} (give --twig, or leave the twig and P-head rows out of "
                    f"--methods)")
        phead_rows = [m for m in methods if RUN_AS[m][0] == "phead"]
        if phead_rows and (twig is None or getattr(twig, "p_head", None) is None):
            if args.methods:
                p.error(f"--methods {','.join(phead_rows)}: the twig {args.twig} has no P-head (train one: "
                        f"python -m train.prune_rl)")
            methods = [m for m in methods if m not in phead_rows]  # the default list
        L, N = model.cfg.text.num_hidden_layers, model.cfg.num_image_tokens
        max_new = {SHORT: args.max_new_short, DESCRIPTION: args.max_new_description}
        counts = {c: sum(q.category == c for q in questions) for c in (SHORT, DESCRIPTION)}
        bucket = (min(args.batch, max(counts.values())),)
        image_cache: dict = {}
        model_id = os.path.basename(os.path.normpath(args.model))

        def one(name: str, R: int | None):
            method, select = RUN_AS.get(name, ("none", None))
            cfg = EvalConfig(method=method, R=R, Kf=args.Kf if method != "none" else None,
                             score_rows=args.score_rows if method != "none" else None, select=select, ssd=False,
                             batch_size=args.batch, max_new_tokens=max_new)
            gen = build_generator(model, twig, cfg, batch_buckets=bucket)  # compiled once, serves both categories
            out = os.path.join(args.preds_dir, f"{name}_R{R or N}.jsonl") if args.preds_dir else None
            t0 = time.perf_counter()
            records, m = run_eval(model, tokenizer, questions, cfg, images_dir=images, twig=twig,
                                  image_processor=improc, answers=answers, model_id=model_id, out_path=out,
                                  generator=gen, image_cache=image_cache)
            acc = {c: (accuracy(m, c) if counts[c] else None) for c in (SHORT, DESCRIPTION)}
            # records come back in question order: the per-image sums of this run, for the intervals
            sums = image_sums(questions, {q.key: r["text"] for q, r in zip(questions, records)}, answers, image_ids)
            d = acc[DESCRIPTION]
            print(f"{name:>13} R={m['R']:>4}: short EM {_pct(acc[SHORT])}, description F1 "
                  f"{_f3(d)} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
            return m, acc, sums

        if args.Kf is not None and not 1 <= args.Kf <= L:
            p.error(f"--Kf {args.Kf}: the FinalWipe layer must be in 1..{L} (L = {L}: no FinalWipe)")
        image_ids = sorted({q.image for q in questions})
        weights = image_weights(len(image_ids), args.bootstrap) if args.bootstrap else None
        base_m, base_acc, base_sums = one("none", None)
        K = Kf = None
        runs, run_sums = [], {}
        for method in methods:
            for k in ninths:
                R = kept_for(N, k)
                m, acc, sums = one(method, R)
                K, Kf = m["K"], m["Kf"]
                kept = {c: (ratio(acc[c], base_acc[c]) if acc[c] is not None else None) for c in acc}
                runs.append({"method": method, "ninths": k, "R": R, "pruned_fraction": 1 - R / N, "K": m["K"],
                             "Kf": m["Kf"], "score_rows": m.get("score_rows"), "accuracy": acc, "kept": kept, "metrics": m,
                             "kept_ci": kept_interval(sums, base_sums, weights) if weights is not None else None})
                run_sums[(method, k)] = sums
        if weights is not None:
            add_margins(runs, run_sums, base_sums, weights)
    result = {"model": args.model, "twig": args.twig if twig is not None else None, "L": L, "N": N, "K": K, "Kf": Kf,
              "questions": counts, "unpruned": {"accuracy": base_acc, "metrics": base_m}, "runs": runs,
              "seconds": time.perf_counter() - t_all,
              "bootstrap": {"replicates": args.bootstrap, "images": len(image_ids), "seed": 0} if args.bootstrap else None}
    md = markdown(result)
    margins = margin_markdown(result)
    if margins:
        md += "\n\n" + margins
    result["markdown"] = md
    print(md)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(json_safe(result), f, indent=2)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
