"""The main job: batch inference with the bundled shapes-world LLaVA + twig (TTP + SSD) on the
bundled demo set, with answers, reference answers and speed against plain decoding.

    twig-jax demo [--bundle DIR] [--model DIR [--twig DIR [--K N]]] [--questions FILE --images DIR
                         [--answers FILE]] [--R N] [--Kf N] [--max-new-tokens N] [--dtype float32|bfloat16]
                         [--out FILE]

By default it loads infer/assets/shapes-llava (base + twig, see research/scripts/bundle_shapes.py) and
answers infer/assets/demo (8 eval images of the shapes world, seed 0: a short question and
"describe the image ." each). Every configuration first runs a warm-up call per question category
(it compiles); then the timed calls run round-robin over the configurations `--repeats` times
(default 3, so a drifting machine load slows each alike) and each category's median call counts.
It prints each question, the TTP + SSD answer (and the
plain one where it differs), the reference answer when known, accuracy, and speed: tokens/s of
TTP + SSD vs plain decoding (generated tokens / (prefill + decode time)), SSD acceptance rate and
mean tokens per round.

--model DIR runs any converted or Hugging Face LLaVA dir instead, with plain decoding only unless
--twig DIR is given. Without --model and without a bundle, a randomly initialised shapes-llava
with a copy-initialised twig stands in (the answers are then meaningless; it says so loudly).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


from twig_jax.assets import BUNDLE_DIR as BUNDLE
from twig_jax.cli.mesh_args import add_mesh_args, mesh_from_args
from twig_jax.assets import DEMO_DIR

DEMO_IMAGES = os.path.join(DEMO_DIR, "images")

DEMO_WORDS = (
    "a an the is are of in on to and yes no what which where how many colour color shape image "
    "describe there circle square triangle red blue green yellow small large left right top bottom "
    "center above below chat between curious human artificial intelligence assistant gives helpful "
    "detailed polite answers human's questions user . , ? : ' s"
).split()


def random_demo_model(seed: int = 0):
    """A small random LLaVA and a matching word-level tokenizer (tests and research.demo_data use it)."""
    from flax import nnx
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from twig_jax.model.config import LlavaConfig, TextConfig, VisionConfig
    from twig_jax.model.llava import Llava

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(DEMO_WORDS)) + ["<image>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                            image_size=112, patch_size=14),
        text=TextConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=1024,
                        bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_index=vocab["<image>"],
    )
    model = Llava(cfg, rngs=nnx.Rngs(seed))
    # Larger random text weights, so that the random answers vary instead of echoing one token.
    for name, w in model.text.layers.weights().items():
        if w.ndim == 3:
            getattr(model.text.layers, name).set_value(w * 4.0)
    return model, tokenizer


def random_shapes_model(seed: int = 0):
    """Stand-in when no bundle exists: a random shapes-llava (the bundled architecture), the
    shapes-world tokenizer and a twig initialised from base layers 2..3 (K=2, T=2, Kf=6, R=16)."""
    from flax import nnx

    from twig_jax.model.config import load_preset
    from twig_jax.data.shapes import build_tokenizer
    from twig_jax.model.llava import Llava
    from twig_jax.twig.config import TwigConfig
    from twig_jax.twig.module import init_twig_from_base

    model = Llava(load_preset("shapes-llava"), rngs=nnx.Rngs(seed))
    twig = init_twig_from_base(model, TwigConfig(K=2, T=2, Kf=6, R=16))
    return model, build_tokenizer(), twig


def load_questions(questions_path: str, answers_path: str | None):
    """(questions with a category each, {key: Reference} or None). Categories (any: a LLaVA
    question file's) come from the question file, else the answer file, else "all"."""
    import dataclasses

    from twig_jax.eval.evaluate import read_answers, read_questions

    questions = read_questions(questions_path, known_categories=None)
    refs = read_answers(answers_path, known_categories=None) if answers_path else None
    out = []
    for q in questions:
        cat = q.category or (refs[q.key].category if refs and q.key in refs else None) or "all"
        out.append(dataclasses.replace(q, category=cat))
    return out, refs


def _rel(path: str) -> str:
    """path relative to the working directory when under it, else as given."""
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


def _twig_desc(tc, n_visual: int) -> str:
    return (f"K={tc.K}, T={tc.T}, Kf={tc.Kf}, R={tc.R} of {n_visual} visual tokens "
            f"({100 * (1 - tc.R / n_visual):.1f}% pruned), draft_len={tc.draft_len}, theta={tc.theta}")


def _sum_stats(stats: dict) -> dict:
    s = {k: sum(st.get(k, 0) or 0 for st in stats.values()) for k in ("seconds", "generated_tokens", "rounds",
                                                                       "drafted", "accepted")}
    s["tokens_per_s"] = s["generated_tokens"] / max(s["seconds"], 1e-9)
    if s["rounds"]:
        s["acceptance_rate"] = s["accepted"] / s["drafted"] if s["drafted"] else float("nan")
        # tokens emitted by rounds (all but each row's first, which the prefill gives) per round
        n_rows = sum(st.get("rows", 0) for st in stats.values())
        s["mean_tokens_per_round"] = (s["generated_tokens"] - n_rows) / s["rounds"]
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="twig-jax demo", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=BUNDLE, help="bundled model dir: base/ + twig/ (default %(default)s)")
    p.add_argument("--model", help="converted or HF LLaVA dir instead of the bundle (plain decoding unless --twig)")
    p.add_argument("--twig", help="twig checkpoint for --model (orbax dir or MILVLG safetensors): TTP + SSD")
    p.add_argument("--K", type=int, help="trunk depth of a --twig without a TwigConfig (an official MILVLG one; it "
                                         "needs --R too)")
    p.add_argument("--questions", help="LLaVA question file: JSONL of {question_id, image, text[, category]} "
                                       "(default: the bundled demo set)")
    p.add_argument("--images", help="folder the question file's images are relative to")
    p.add_argument("--answers", help="reference answers JSONL {question_id, answer, category} (optional)")
    p.add_argument("--R", type=int, help="kept visual tokens (default: the twig's)")
    p.add_argument("--Kf", type=int, help="FinalWipe layer (default: the twig's)")
    p.add_argument("--spec", choices=["chain", "tree"], help="SSD draft shape (default: the twig's)")
    p.add_argument("--tree-width", type=int, help="tree drafting: children per expanded node (E; default: the twig's)")
    p.add_argument("--tree-depth", type=int, help="tree drafting: levels below the root (D; default: the twig's)")
    p.add_argument("--tree-nodes", type=int, help="tree drafting: nodes verified per round (N; default: the twig's)")
    p.add_argument("--max-new-tokens", type=int,
                   help="for every category (default: 16 for short answers, 128 for descriptions, 128 otherwise)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (weights are cast on load; default %(default)s)")
    p.add_argument("--out", help="write the TTP + SSD (or plain) answers as LLaVA answer JSONL here")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls per configuration; each category's median counts (default %(default)s)")
    add_mesh_args(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: give at least one timed call")
    if args.twig and not args.model:
        p.error("--twig goes with --model (the bundle brings its own twig)")
    if args.K is not None and not args.twig:
        p.error("--K goes with --twig (the trunk depth of a twig checkpoint without a TwigConfig)")
    if args.questions is None:
        if args.images or args.answers:
            p.error("--images/--answers go with --questions")
        args.questions = os.path.join(DEMO_DIR, "questions.jsonl")
        args.images = DEMO_IMAGES
        args.answers = os.path.join(DEMO_DIR, "answers.jsonl")
    elif args.images is None:
        args.images = os.path.dirname(os.path.abspath(args.questions))
    from twig_jax.eval.evaluate import check_images

    questions, refs = load_questions(args.questions, args.answers)  # checked before any model loads
    check_images(questions, args.images, args.questions)

    import jax.numpy as jnp

    from twig_jax.bench.timing import median_pass
    from twig_jax.eval.evaluate import accuracy_of, run_questions
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
    from twig_jax.twig.io import load_twig_any
    from twig_jax.decode.generator import make_generator

    mesh = mesh_from_args(args)
    t0 = time.perf_counter()
    dtype = jnp.dtype(args.dtype)
    if args.model:
        from twig_jax.convert.llava import load_model

        model = load_model(args.model, dtype=dtype, mesh=mesh)
        tokenizer, processor = load_tokenizer(args.model), image_preprocessor_for(model, args.model)
        twig = None
        if args.twig:
            twig = load_twig_any(args.twig, model.cfg.text, dtype=dtype, K=args.K, Kf=args.Kf, R=args.R, mesh=mesh)[0]
        what = args.model + (f" + twig {args.twig}" if twig is not None else " (no --twig: plain decoding only)")
    elif os.path.isdir(os.path.join(args.bundle, "base")):
        from twig_jax.pipeline import load_bundle

        b = load_bundle(args.bundle, dtype=dtype, mesh=mesh)
        model, tokenizer, processor, twig = b.model, b.tokenizer, b.image_processor, b.twig
        what = f"bundled shapes-world LLaVA {_rel(args.bundle)} (run in {args.dtype})"
    else:
        bar = "!" * 100
        print(f"{bar}\n!! NO BUNDLED MODEL at {args.bundle}: using a RANDOMLY INITIALISED shapes-llava and twig.\n"
              f"!! The answers below are random words; every stage still runs for real. Build the bundle with\n"
              f"!!   python research/scripts/bundle_shapes.py --base DIR --twig DIR --measure\n{bar}", file=sys.stderr)
        model, tokenizer, twig = random_shapes_model()
        processor = image_preprocessor_for(model, None)
        what = "RANDOM shapes-llava + random twig (no bundle found)"
    twig_cfg = None
    if twig is not None:
        from twig_jax.twig.config import TwigOverrides, resolve_twig_config

        twig_cfg = resolve_twig_config(model.cfg.text.num_hidden_layers, model.cfg.num_image_tokens,
                                       method="phead" if twig.p_head is not None else "twig", ssd=True,
                                       twig_cfg=twig.twig_cfg, has_p_head=twig.p_head is not None,
                                       overrides=TwigOverrides(K=args.K, Kf=args.Kf, R=args.R, spec=args.spec,
                                                               tree_width=args.tree_width, tree_depth=args.tree_depth,
                                                               tree_nodes=args.tree_nodes))
    elif args.R or args.Kf:
        p.error("--R/--Kf need a twig")
    load_s = time.perf_counter() - t0

    max_new = {c: args.max_new_tokens for c in {q.category for q in questions}} if args.max_new_tokens else {}
    max_new.setdefault("all", 128)
    n_images = len({q.image for q in questions})
    print(f"model: {what}")
    if twig_cfg is not None:
        print(f"twig:  {_twig_desc(twig_cfg, model.cfg.num_image_tokens)}")
    print(f"data:  {len(questions)} questions on {n_images} images ({_rel(args.questions)}); "
          f"load {load_s:.1f} s")

    runs = [("plain", "none", False)]
    if twig is not None:  # TwigVLM++ P-head pruning when the twig has a P-head, else the twig's attention
        runs.insert(0, ("P-head+SSD", "phead", True) if twig.p_head is not None else ("TTP+SSD", "twig", True))
    results, cache, kws = {}, {}, {}
    for label, method, ssd in runs:
        gen = make_generator(model, twig if ssd or method in ("twig", "phead") else None, twig_cfg, method=method,
                             ssd=ssd, mesh=mesh)
        kws[label] = dict(twig=twig, twig_cfg=twig_cfg, method=method, ssd=ssd, max_new_tokens=max_new, generator=gen,
                          image_cache=cache)
        t0 = time.perf_counter()
        run_questions(model, tokenizer, processor, questions, args.images, **kws[label])  # warm-up: compiles
        print(f"{label}: warm-up call (compiles) {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    timed = {label: [] for label in kws}
    for _ in range(args.repeats):  # round-robin, so load drift hits every configuration alike
        for label, kw in kws.items():
            timed[label].append(run_questions(model, tokenizer, processor, questions, args.images, **kw))
    for label, calls in timed.items():
        answers = calls[0][0]  # greedy: every call answers the same
        stats = {cat: dict(median_pass([c[1][cat] for c in calls]), rows=sum(q.category == cat for q in questions))
                 for cat in calls[0][1]}
        results[label] = (answers, stats)
        secs = [sum(st["seconds"] for st in c[1].values()) for c in calls]
        print(f"{label}: timed calls " + ", ".join(f"{x:.2f}" for x in secs) + " s", file=sys.stderr)

    main_label = runs[0][0]
    answers = results[main_label][0]
    print()
    for q in questions:
        a = answers[q.key]
        print(f"[{q.question_id}] {q.image}: {q.text}")
        print(f"    {main_label:8s} {a.text}")
        if main_label != "plain":
            other = results["plain"][0][q.key].text
            print(f"    {'plain':8s} {'(same)' if other == a.text else other}")
        if refs and q.key in refs:
            from twig_jax.eval.evaluate import exact_match, object_score

            r = refs[q.key]
            if r.category == "short":
                mark = "correct" if exact_match(a.text, r.answer) else "WRONG"
            else:
                mark = f"object F1 {object_score(a.text, r.answer).f1:.2f}"
            print(f"    {'reference':8s} {r.answer}   [{mark}]")

    if refs:
        print()
        for label, (ans, _) in results.items():
            acc = accuracy_of(ans, refs)
            f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            print(f"accuracy {label:8s} short exact match {f(acc['short_em'])}, description object F1 "
                  f"{f(acc['description_f1'])}")

    print(f"\nspeed (median of {args.repeats} timed calls per category after a warm-up compile; tokens/s = "
          "generated tokens / (prefill + decode) time):")
    cats = list(dict.fromkeys(q.category for q in questions))
    head = f"  {'category':12s} {'rows':>4s} " + " ".join(f"{lbl + ' tok/s':>14s}" for lbl, _, _ in runs)
    if len(runs) > 1:
        head += f" {'speed-up':>9s} {'acceptance':>10s} {'tokens/round':>12s}"
    print(head)
    for cat in cats + ["all"]:
        per = {lbl: (_sum_stats(results[lbl][1]) if cat == "all" else _sum_stats({cat: results[lbl][1][cat]}))
               for lbl, _, _ in runs}
        rows = sum(q.category == cat for q in questions) if cat != "all" else len(questions)
        line = f"  {cat:12s} {rows:4d} " + " ".join(
            f"{per[lbl]['tokens_per_s']:14.1f}" for lbl, _, _ in runs)
        if len(runs) > 1:
            m, pl = per[main_label], per["plain"]
            line += (f" {m['tokens_per_s'] / max(pl['tokens_per_s'], 1e-9):8.2f}x {m['acceptance_rate']:10.1%} "
                     f"{m['mean_tokens_per_round']:12.2f}")
        print(line)
    if len(runs) > 1:
        tot = {lbl: _sum_stats(results[lbl][1]) for lbl, _, _ in runs}
        print(f"  ({main_label}: {tot[main_label]['generated_tokens']} tokens in {tot[main_label]['seconds']:.2f} s, "
              f"{tot[main_label]['rounds']} draft/verify rounds, {tot[main_label]['accepted']} of "
              f"{tot[main_label]['drafted']} drafted tokens accepted; plain: {tot['plain']['generated_tokens']} "
              f"tokens in {tot['plain']['seconds']:.2f} s)")

    if args.out:
        with open(args.out, "w") as f:
            for q in questions:
                f.write(json.dumps({"question_id": q.question_id, "prompt": q.text, "text": answers[q.key].text,
                                    "model_id": what, "metadata": {"method": main_label}}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
