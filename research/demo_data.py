"""A small LLaVA-format dataset over the bundled demo images (infer/assets/demo/images), for smoke runs and the training benchmark.

    python -m research.demo_data --out DIR [--n 64] [--answer-words 40]

Writes DIR/data.json (LLaVA instruction format), DIR/images/*.png and DIR/tokenizer/ (the demo
word-level tokenizer). The answers are random demo-vocabulary words: this exercises the training
stack's speed and plumbing, not learning (the shapes world of a later issue does that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

from twig_jax.cli.demo import DEMO_IMAGES, DEMO_WORDS, random_demo_model


def write_demo_data(out: str, n: int = 64, answer_words: int = 40, seed: int = 0) -> str:
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    images = sorted(f for f in os.listdir(DEMO_IMAGES) if f.endswith(".png"))
    for f in images:
        shutil.copy(os.path.join(DEMO_IMAGES, f), os.path.join(out, "images", f))
    _, tokenizer = random_demo_model()
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    rng = np.random.RandomState(seed)
    words = [w for w in DEMO_WORDS if w.isalpha()]
    samples = []
    for i in range(n):
        answer = " ".join(rng.choice(words, size=answer_words))
        samples.append({
            "id": f"demo-{i}",
            "image": images[i % len(images)],
            "conversations": [
                {"from": "human", "value": "<image>\ndescribe the image ."},
                {"from": "gpt", "value": answer},
            ],
        })
    path = os.path.join(out, "data.json")
    with open(path, "w") as f:
        json.dump(samples, f)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--answer-words", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(write_demo_data(args.out, args.n, args.answer_words, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
