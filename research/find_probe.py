"""Has the model learned the one-hop lookup of the find-turn curriculum? Held-out "describe the K ."
turns (`twig_jax.data.shapes.find_questions`), asked as training asks them: after the image's short
eval questions, with their reference answers as history. Per answer field: the key copied from the
question, then the keyed object's size, colour, shape and position.

    python -m research.find_probe --data DIR [--model DIR] [--n 48] [--out-json FILE]

Chance for the position is 1 in 9; for colour it is at most 1 in the scene's colours.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np

from twig_jax.eval.evaluate import DEFAULT_MODEL

FIELDS = ("key", "size", "colour", "shape", "position")


def split_find_answer(text: str, key_len: int) -> dict[str, list[str]]:
    """A key-first find answer "K size colour shape position ." as fields (missing ones empty)."""
    words = [w for w in text.split() if w != "."]
    return {"key": words[:key_len], "size": words[key_len:key_len + 1], "colour": words[key_len + 1:key_len + 2],
            "shape": words[key_len + 2:key_len + 3], "position": words[key_len + 3:key_len + 5]}


def field_hits(prediction: str, reference: str, key_len: int) -> dict[str, bool]:
    """Which fields of a find answer are right. Only the first answer sentence counts (the model
    may run on after it)."""
    got = split_find_answer(prediction.lower().split(".")[0], key_len)
    want = split_find_answer(reference.lower().split(".")[0], key_len)
    return {f: got[f] == want[f] for f in FIELDS}


def find_prompts(questions_path: str, answers_path: str, n: int) -> list[tuple[str, str, str, int]]:
    """(image, prompt text, reference answer, key length) for the first n eval images that have a
    uniquely keyed object; the prompt is the image's short questions with their reference answers
    as earlier turns, then the find question (the template adds the first USER and last ASSISTANT)."""
    from twig_jax.data.shapes import ShapeObject, find_questions
    from twig_jax.eval.evaluate import read_questions

    questions = {q.key: q for q in read_questions(questions_path)}
    by_image: dict[str, list[dict]] = collections.defaultdict(list)
    with open(answers_path) as f:  # the raw rows: they hold the scene's objects
        for r in map(json.loads, f):
            by_image[questions[str(r["question_id"])].image].append(r)
    out = []
    for i, (image, refs) in enumerate(sorted(by_image.items())):
        if len(out) >= n:
            break
        objects = [ShapeObject.from_key(k) for k in refs[0]["objects"]]
        found = find_questions(objects, np.random.default_rng(i), 1)
        if not found:  # every object has a twin
            continue
        question, answer = found[0]
        history = "".join(f"{questions[str(r['question_id'])].text} ASSISTANT: {r['answer']}</s>USER: "
                          for r in refs if r["category"] == "short")
        out.append((image, history + question, answer, len(question.split()) - 3))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a `twig-jax data shapes` output dir (its eval split)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--n", type=int, default=48, help="eval images")
    p.add_argument("--out-json")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n {args.n} must be >= 1")

    from twig_jax.eval import evaluate as ev
    from twig_jax.convert.llava import load_model
    from twig_jax.pipeline import load_tokenizer

    prompts = find_prompts(os.path.join(args.data, "eval", "questions.jsonl"),
                           os.path.join(args.data, "eval", "answers.jsonl"), args.n)
    qs = [ev.Question(f"find_{i}", image, text, ev.SHORT) for i, (image, text, _, _) in enumerate(prompts)]
    model, tok = load_model(args.model), load_tokenizer(args.model)
    records, _ = ev.run_eval(model, tok, qs, ev.EvalConfig(batch_size=16), images_dir=os.path.join(args.data, "images"))
    by_id = {r["question_id"]: r["text"] for r in records}
    hits = collections.Counter()
    for i, (_, _, ref, key_len) in enumerate(prompts):
        for f, ok in field_hits(by_id[f"find_{i}"], ref, key_len).items():
            hits[f] += ok
    result = {"images": len(prompts), **{f: hits[f] for f in FIELDS}}
    print(" | ".join(f"{f} {hits[f]}/{len(prompts)}" for f in FIELDS))
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
