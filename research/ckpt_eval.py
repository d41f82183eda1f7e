"""Score training checkpoints on the shapes eval split: short-answer EM by question kind and
description F1, greedy, unpruned.

    python -m research.ckpt_eval --base W/init --ckpt-dir W/run/ck --steps 250,500 --data W/data \
        [--short 300] [--descriptions 20] [--out-json F]

--base is the model dir the run started from (it gives the architecture, the frozen modules and
the tokenizer); each step's parameters come from the run's orbax checkpoint. A model dir (a run's
--out) is scored with --steps final, or with `twig-jax eval`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys


def kind_table(records: dict, answers_path: str) -> dict[str, tuple[int, int]]:
    """{kind: (correct, asked)} over the short questions in `records` {question_id: text}."""
    from twig_jax.eval.evaluate import exact_match

    out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    with open(answers_path) as f:
        for line in f:
            a = json.loads(line)
            key = str(a["question_id"])
            if a["category"] != "short" or key not in records:
                continue
            out[a["kind"]][0] += exact_match(records[key], a["answer"])
            out[a["kind"]][1] += 1
    return {k: tuple(v) for k, v in sorted(out.items())}


def select_questions(questions, n_short: int, n_desc: int):
    """The first n_short short questions and n_desc descriptions, in file order."""
    shorts = [q for q in questions if q.category == "short"][:n_short]
    descs = [q for q in questions if q.category == "description"][:n_desc]
    keep = {q.key for q in shorts + descs}
    return [q for q in questions if q.key in keep]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.ckpt_eval", description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="model dir the run started from (or a model dir with --steps final)")
    p.add_argument("--ckpt-dir", help="the run's --ckpt-dir")
    p.add_argument("--steps", default=None, help="comma-separated steps (default: the latest); 'final': --base itself")
    p.add_argument("--data", required=True, help="shapes data dir (eval/questions.jsonl, eval/answers.jsonl, images/)")
    p.add_argument("--short", type=int, default=300, help="first N short questions")
    p.add_argument("--descriptions", type=int, default=20, help="first N descriptions")
    p.add_argument("--freeze", default="vision",
                   help="the run's --freeze (comma-separated; '' when it trained everything)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--out-json", default=None)
    p.add_argument("--export-dir", default=None, help="also write each step's model dir to EXPORT_DIR/step_N "
                                                     "(a --base for the next training stage)")
    p.add_argument("--no-score", action="store_true", help="with --export-dir: export only")
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from twig_jax.convert.llava import load_model
    from twig_jax.eval.evaluate import EvalConfig, attach_categories, read_answers, read_questions, run_eval
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer

    qpath = os.path.join(args.data, "eval", "questions.jsonl")
    apath = os.path.join(args.data, "eval", "answers.jsonl")
    answers = read_answers(apath)
    questions = select_questions(attach_categories(read_questions(qpath), answers, qpath, apath),
                                 args.short, args.descriptions)
    subset = {q.key: answers[q.key] for q in questions}
    base = load_model(args.base, dtype=jnp.float32)
    tok, improc = load_tokenizer(args.base), image_preprocessor_for(base, args.base)
    cfg = EvalConfig(batch_size=args.batch)
    cache: dict = {}

    def score(model, label):
        recs, m = run_eval(model, tok, questions, cfg, images_dir=os.path.join(args.data, "images"),
                           image_processor=improc, answers=subset, image_cache=cache)
        kinds = kind_table({r["question_id"]: r["text"] for r in recs}, apath)
        s, d = m["short"], m["description"]
        line = " ".join(f"{k} {c}/{n}" for k, (c, n) in kinds.items())
        print(f"{label}: short EM {s['correct']}/{s['n']} = {s['em']:.1%}  description F1 {d['f1']:.3f} "
              f"(n={d['n']}) | {line}", flush=True)
        return {"short_em": s["em"], "short_n": s["n"], "description_f1": d["f1"], "description_n": d["n"],
                "kinds": kinds}

    results = {}
    if args.steps == "final" or not args.ckpt_dir:
        results["final"] = score(base, args.base)
    else:
        from twig_jax.train.trainer import checkpoint_models

        steps = [int(x) for x in args.steps.split(",")] if args.steps else None
        try:
            models = checkpoint_models(base, args.ckpt_dir, steps, tuple(n for n in args.freeze.split(',') if n))
        except FileNotFoundError as e:  # a step that was never saved: say which ones exist
            print(f"ckpt_eval: error: {e}", file=sys.stderr)
            return 2
        for step, model in models:
            if args.export_dir:
                from twig_jax.convert.llava import save_converted_model

                d = save_converted_model(model, os.path.join(args.export_dir, f"step_{step}"), tok,
                                         preprocessor_from=args.base)
                print(f"step {step}: model dir {d}", flush=True)
            if not args.no_score:
                results[step] = score(model, f"step {step}")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
