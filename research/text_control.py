"""The text control for the shapes world: the scene given as words instead of an image.

It asks whether the from-scratch language model can learn the lookups that short answers need
("what colour is the circle ?") when question and scene use the same words, with no vision
tower or projector in the way. Sequences are ~100 tokens instead of ~300, so it is the cheap
place to look for a training regime in which the lookup forms.

    python -m research.text_control data --data W/data --out W/text/train.json [--layout L]
    python -m research.text_control init --base W/init --out W/init-mimetic [--scale 2 --noise 0.3]
    twig-jax train --base W/init --train-all --freeze vision --data W/text/train.json \\
        --max-len 192 --on-too-long truncate --batch 8 --steps 1500 --lr 1e-3 --ckpt-dir W/text/ck ...
    python -m research.text_control eval --base W/init --ckpt-dir W/text/ck --steps 250,500 --data W/data \\
        [--layout L] [--n 300]

Layouts (`--layout`, the same for `data` and `eval`):
  scene-first    the scene's description, then the short questions as turns (answers supervised);
  question-first one record per question: the question, then the scene, then the answer;
  lm             the scene and every question and answer as one supervised text (the loss covers
                 every token, as in language-model pretraining).
`eval` scores the first answer token, greedy, on the first N short questions of the eval split
(its scenes are held out), per question kind. `init` writes a copy of a model dir whose language
model attention is initialised mimetically (W_k = W_q plus noise, Trockman & Kolter 2023), so
that at step 0 a token attends to tokens like itself.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys

import numpy as np

LAYOUTS = ("scene-first", "question-first", "lm")
LM_TURN = "go"  # the human turn of an `lm` record: one fixed word, so every real token is in the answer


def _objects(rec):
    from twig_jax.data.shapes import ShapeObject

    return [ShapeObject.from_key(k) for k in rec["objects"]]


def without_image(text: str) -> str:
    """A question with its <image> placeholder removed."""
    from twig_jax.data.preprocess import IMAGE_PLACEHOLDER

    return text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()


def short_turns(rec) -> list[tuple[str, str]]:
    """(question, answer) of a shapes training record, the description turn and <image> left out."""
    from twig_jax.data.shapes import DESCRIBE

    conv = rec["conversations"]
    qa = [(without_image(conv[i]["value"]), conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]
    return [(q, a) for q, a in qa if q != DESCRIBE]


def text_records(records, layout: str, seed: int = 0) -> list[dict]:
    """Shapes training records (with their "objects") -> text-only LLaVA records in `layout`."""
    from twig_jax.data.shapes import describe

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    out = []
    for rec in records:
        if "objects" not in rec:
            raise ValueError(f"record {rec.get('id')!r} has no 'objects' (not a shapes-world record)")
        qa = short_turns(rec)
        if not qa:
            continue
        scene = describe(_objects(rec))
        if layout == "scene-first":
            conv = []
            for j, (q, a) in enumerate(qa):
                conv += [{"from": "human", "value": f"{scene}\n{q}" if j == 0 else q}, {"from": "gpt", "value": a}]
            out.append({"id": rec["id"], "conversations": conv})
        elif layout == "question-first":
            out += [{"id": f"{rec['id']}_{j}", "conversations": [{"from": "human", "value": f"{q}\n{scene}"},
                                                                {"from": "gpt", "value": a}]}
                    for j, (q, a) in enumerate(qa)]
        else:
            text = " ".join([scene] + [f"{q} {a}" for q, a in qa])
            out.append({"id": rec["id"], "conversations": [{"from": "human", "value": LM_TURN},
                                                          {"from": "gpt", "value": text}]})
    if layout == "question-first":
        random.Random(seed).shuffle(out)  # the questions of one scene would otherwise fill a batch
    return out


def eval_prompt(question: str, scene: str, layout: str) -> str:
    """The prompt whose next token is the answer, as `layout` trains it."""
    from twig_jax.data.preprocess import build_prompt

    if layout == "scene-first":
        return build_prompt(f"{scene}\n{question}", with_image=False)
    if layout == "question-first":
        return build_prompt(f"{question}\n{scene}", with_image=False)
    return build_prompt(LM_TURN, with_image=False) + f" {scene} {question}"


def eval_items(data_dir: str, tokenizer, layout: str, n: int):
    """Token prompts, first answer token and kind of the first n short eval questions."""
    from twig_jax.data.shapes import describe

    from twig_jax.eval.evaluate import read_questions

    questions = {q.key: q.text for q in read_questions(os.path.join(data_dir, "eval", "questions.jsonl"))}
    items = []  # the answer file's raw rows: they hold the kind and the scene's objects
    with open(os.path.join(data_dir, "eval", "answers.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["category"] != "short":
                continue
            q = without_image(questions[str(r["question_id"])])
            ids = tokenizer.encode(eval_prompt(q, describe(_objects(r)), layout))
            first = tokenizer.encode(r["answer"], add_special_tokens=False)[0]
            items.append((ids, first, r["kind"]))
            if len(items) == n:
                break
    return items


def first_token_predictions(model, prompts) -> np.ndarray:
    """Greedy next token after each prompt, from one right-padded full forward pass.  # [n]"""
    import jax.numpy as jnp

    lens = np.array([len(p) for p in prompts])
    toks = np.zeros((len(prompts), int(lens.max())), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    logits = model(jnp.asarray(toks))  # [n, S, V]; causal, so the padding after a row changes nothing
    return np.asarray(jnp.argmax(logits[np.arange(len(prompts)), lens - 1], axis=-1))


def score(pred, items) -> dict:
    """{kind: [correct, total]} plus "all"."""
    res = collections.defaultdict(lambda: [0, 0])
    for p, (_, first, kind) in zip(pred, items):
        for k in (kind, "all"):
            res[k][0] += int(p == first)
            res[k][1] += 1
    return dict(res)


def mimetic_init(model, scale: float = 2.0, noise: float = 0.3, seed: int = 0) -> None:
    """In place: W_q *= scale, W_k = W_q + noise * std(W_q) * N(0, 1), every language model layer."""
    import jax.numpy as jnp

    layers = model.text.layers
    wq = np.asarray(layers.wq[...], np.float32) * scale
    if layers.wk[...].shape != wq.shape:
        raise ValueError(f"mimetic init needs W_k shaped like W_q (no GQA): {layers.wk[...].shape} vs {wq.shape}")
    wk = wq + noise * wq.std() * np.random.default_rng(seed).standard_normal(wq.shape).astype(np.float32)
    layers.wq[...] = jnp.asarray(wq, layers.wq[...].dtype)
    layers.wk[...] = jnp.asarray(wk, layers.wk[...].dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the text-only training JSON")
    d.add_argument("--data", required=True, help="shapes dataset dir (train.json with objects)")
    d.add_argument("--out", required=True, help="output JSON")
    d.add_argument("--layout", choices=LAYOUTS, default="scene-first")
    d.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("init", help="copy a model dir with mimetic attention init")
    i.add_argument("--base", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--scale", type=float, default=2.0)
    i.add_argument("--noise", type=float, default=0.3)
    e = sub.add_parser("eval", help="first-answer-token accuracy of training checkpoints, by kind")
    e.add_argument("--base", required=True, help="the --base the run started from")
    e.add_argument("--ckpt-dir", required=True)
    e.add_argument("--steps", default=None, help="comma-separated steps (default: the latest)")
    e.add_argument("--data", required=True, help="shapes dataset dir (eval/ split)")
    e.add_argument("--layout", choices=LAYOUTS, default="scene-first")
    e.add_argument("--n", type=int, default=300)
    e.add_argument("--out-json", default=None)
    args = p.parse_args(argv)

    if args.cmd == "data":
        with open(os.path.join(args.data, "train.json")) as f:
            recs = text_records(json.load(f), args.layout, args.seed)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(recs, f)
        print(f"{len(recs)} {args.layout} records -> {args.out}")
        return 0

    from twig_jax.convert.llava import load_model
    from twig_jax.pipeline import load_tokenizer
    from twig_jax.convert.llava import save_converted_model

    base = load_model(args.base)
    tokenizer = load_tokenizer(args.base)
    if args.cmd == "init":
        mimetic_init(base, args.scale, args.noise)
        save_converted_model(base, args.out, tokenizer)
        print(f"mimetic attention init -> {args.out}")
        return 0

    from twig_jax.train.trainer import checkpoint_models

    items = eval_items(args.data, tokenizer, args.layout, args.n)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    results = {}
    for step, model in checkpoint_models(base, args.ckpt_dir, steps):
        res = score(first_token_predictions(model, [it[0] for it in items]), items)
        results[step] = res
        c, n = res["all"]
        kinds = " ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(res.items()) if k != "all")
        print(f"step {step}: first answer token {c}/{n} = {c / n:.1%} | {kinds}", flush=True)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"layout": args.layout, "n": len(items), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
