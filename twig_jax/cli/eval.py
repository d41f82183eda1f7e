"""`twig-jax eval`: answer a LLaVA question file and score what the project can score."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from twig_jax.cli.mesh_args import add_mesh_args, mesh_from_args
from twig_jax.assets import DEFAULT_MODEL, DEFAULT_TWIG  # noqa: F401  (the bundled model, for help texts)
from twig_jax.eval.evaluate import (DEFAULT_MAX_NEW_OTHER, DEFAULT_MAX_NEW_TOKENS, DESCRIPTION, SHORT, EvalConfig,
                                    EvalFileError, attach_categories, check_images, json_safe, metrics_table,
                                    read_answers, read_predictions, read_questions, resolve_twig_config, run_eval,
                                    score)


def eval_main(argv=None) -> int:
    """`twig-jax eval` (see cli/main.py): answer a LLaVA question file, and score the answers of
    the categories this module can score when references are given."""
    import argparse

    from twig_jax.cli.twig_args import unused_settings
    from twig_jax.twig.config import SELECT_RULES, TwigConfigError

    p = argparse.ArgumentParser(prog="twig-jax eval",
                                description="Answer a LLaVA question file (any categories) and score what it can: "
                                            "exact match for short answers, object-level P/R/F1 for shapes-world "
                                            "descriptions.")
    p.add_argument("--questions", required=True, help="question JSONL {question_id, image, text[, category]}")
    p.add_argument("--images", required=True, help="folder the question file's image paths are relative to")
    p.add_argument("--answers", help="reference JSONL {question_id, answer[, category]}; without it the questions "
                                     "are answered (--out) and not scored")
    p.add_argument("--model", help="converted or HF LLaVA dir that answers the questions (the bundled one: "
                                   f"{DEFAULT_MODEL})")
    p.add_argument("--twig", help="twig checkpoint (orbax dir or MILVLG safetensors); gives the K/Kf/R defaults "
                                  "of every method (default: the bundled twig when --model is the bundled model)")
    p.add_argument("--no-twig", action="store_true", help="do not load the bundled twig by default")
    p.add_argument("--method", choices=["none", "twig", "phead", "fastv", "random"],
                   help="visual token pruning (default: none)")
    p.add_argument("--R", type=int, help="kept visual tokens (default: the twig's)")
    p.add_argument("--K", type=int, help="trunk depth / FastV scoring layer (default: the twig's, else 2)")
    p.add_argument("--Kf", type=int, help="FinalWipe layer (default: the twig's, else 3/4 of the depth)")
    p.add_argument("--select", choices=list(SELECT_RULES),
                   help="keep-set from the pruning scores: top R (the paper), score-weighted coverage "
                        "(ttp.cover_visual), or a Gumbel-top-R draw from the P-head's scores (the policy its "
                        "RL trains); default: the twig's for twig / phead, top for fastv / random")
    p.add_argument("--score-rows", choices=["last", "text"],
                   help="pruning-score query rows: the last prompt token (the released code) or every text "
                        "token (the paper's equation); default: the twig's, else last")
    p.add_argument("--ssd", action=argparse.BooleanOptionalAction, default=False,
                   help="self-speculative decoding (needs --twig; greedy answers are unchanged)")
    p.add_argument("--spec", choices=["chain", "tree"], help="SSD draft shape (default: the twig's)")
    p.add_argument("--tree-width", type=int, help="tree drafting: children per expanded node (E; default: the twig's)")
    p.add_argument("--tree-depth", type=int, help="tree drafting: levels below the root (D; default: the twig's)")
    p.add_argument("--tree-nodes", type=int, help="tree drafting: nodes verified per round (N; default: the twig's)")
    p.add_argument("--batch", type=int, default=16, help="questions per generate call")
    p.add_argument("--max-new-short", type=int, default=DEFAULT_MAX_NEW_TOKENS[SHORT])
    p.add_argument("--max-new-description", type=int, default=DEFAULT_MAX_NEW_TOKENS[DESCRIPTION])
    p.add_argument("--max-new-other", type=int, default=DEFAULT_MAX_NEW_OTHER,
                   help="new tokens for any other category (LLaVA-Bench's conv / detail / complex ...) and for "
                        "questions without one (default %(default)s)")
    p.add_argument("--limit", type=int, help="first N questions only")
    p.add_argument("--out", help="write the answers (LLaVA answer JSONL) here")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--metrics-json", help="write the metrics here")
    p.add_argument("--predictions", help="score this existing answer JSONL instead of running a model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_mesh_args(p)
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    for flag in ("max_new_short", "max_new_description", "max_new_other"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.predictions:
        if not args.answers:
            p.error("--predictions scores an answer file against references: give --answers FILE")
        running = [flag for flag, v in (("--twig", args.twig), ("--method", args.method), ("--R", args.R),
                                        ("--K", args.K), ("--Kf", args.Kf), ("--select", args.select),
                                        ("--score-rows", args.score_rows), ("--ssd", args.ssd), ("--out", args.out))
                   if v]
        if running:
            p.error(f"--predictions scores an existing answer file; {', '.join(running)} configure a model run")
    else:
        if not args.model:
            p.error("--model DIR is required: the model that answers the questions (or --predictions FILE to score "
                    "an answer file)")
        if not args.answers and not args.out:
            p.error("without --answers nothing is scored: give --out FILE for the answers (and --answers FILE to "
                    "score them)")
        if args.force and not args.out:
            p.error("--force replaces --out: give --out FILE")
        if args.out and os.path.exists(args.out) and not args.force:
            p.error(f"--out {args.out} exists: --force replaces it")
        if args.twig and args.no_twig:
            p.error("--twig loads a twig and --no-twig loads none: give one")
        if args.R is not None and (args.method or "none") == "none":
            p.error("--R is the kept visual token count of a pruning method: give --method twig, fastv or random")
        given = {k: getattr(args, k) for k in ("K", "Kf", "R", "score_rows", "select") if getattr(args, k) is not None}
        problem = unused_settings(given, method=args.method or "none", ssd=args.ssd, twig_given=bool(args.twig))
        if problem:
            p.error(problem)
    try:
        questions = read_questions(args.questions, known_categories=None)
        answers = read_answers(args.answers, known_categories=None) if args.answers else None
        if answers is not None:
            questions = attach_categories(questions, answers, args.questions, args.answers)
        if args.limit:
            questions = questions[:args.limit]
        if not args.predictions:
            check_images(questions, args.images, args.questions)
    except EvalFileError as e:
        p.error(str(e))
    # each reference scored under its question's category (either file may give it)
    subset = None if answers is None else {q.key: dataclasses.replace(answers[q.key], category=q.category)
                                           for q in questions}

    if args.predictions:
        try:
            preds = read_predictions(args.predictions)
            # answers to questions past --limit are left out; answers to no question stay, and are an error
            metrics = score({k: v for k, v in preds.items() if k in subset or k not in answers}, subset,
                            require_all=True)
        except EvalFileError as e:
            p.error(str(e))
        metrics["predictions"] = args.predictions
    else:
        import jax.numpy as jnp

        from twig_jax.convert.llava import load_model
        from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
        from twig_jax.twig.io import load_twig_any

        if not os.path.exists(args.model):
            p.error(f"model dir not found: {args.model}")
        mesh = mesh_from_args(args)
        model = load_model(args.model, dtype=getattr(jnp, args.dtype), mesh=mesh)
        method = args.method or "none"
        twig = None
        if args.twig is None and not args.no_twig and os.path.abspath(args.model) == DEFAULT_MODEL \
                and os.path.isdir(DEFAULT_TWIG):
            args.twig = DEFAULT_TWIG
        if args.twig:
            # an official MILVLG checkpoint takes K and the budget from the flags; SSD alone prunes nothing
            budget = model.cfg.num_image_tokens if method == "none" else args.R
            twig, _ = load_twig_any(args.twig, model.cfg.text, dtype=model.text.embed[...].dtype, K=args.K,
                                    Kf=args.Kf, R=budget, mesh=mesh)
        cfg = EvalConfig(method=method, R=args.R, K=args.K, Kf=args.Kf, score_rows=args.score_rows,
                         select=args.select, ssd=args.ssd, spec=args.spec, tree_width=args.tree_width,
                         tree_depth=args.tree_depth, tree_nodes=args.tree_nodes, batch_size=args.batch,
                         max_new_tokens={SHORT: args.max_new_short, DESCRIPTION: args.max_new_description},
                         max_new_other=args.max_new_other)
        try:
            resolve_twig_config(model, twig, cfg)
        except TwigConfigError as e:
            p.error(str(e))
        _, metrics = run_eval(model, load_tokenizer(args.model), questions, cfg, images_dir=args.images, twig=twig,
                              image_processor=image_preprocessor_for(model, args.model), answers=subset,
                              model_id=os.path.basename(os.path.normpath(args.model)), out_path=args.out,
                              log=sys.stderr, mesh=mesh)
    print(metrics_table(metrics))
    if args.metrics_json:
        with open(args.metrics_json, "w") as f:
            json.dump(json_safe(metrics), f, indent=2)
    return 0
