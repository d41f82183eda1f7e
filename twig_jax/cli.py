"""`twig-jax` command line: convert, generate, demo, bench, train."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _generate(argv) -> int:
    p = argparse.ArgumentParser(prog="twig-jax generate", description="Answer (image, question) pairs.")
    p.add_argument("--model", required=True, help="converted or Hugging Face LLaVA directory")
    p.add_argument("--vision-dir", help="CLIP checkpoint dir (liuhaotian layout only)")
    p.add_argument("--image", help="image path (single question mode)")
    p.add_argument("--prompt", help="question text (single question mode)")
    p.add_argument("--jsonl", help="batch input: JSONL of {image, question} (or LLaVA's {image, text})")
    p.add_argument("--images", default="", help="folder that --jsonl image paths are relative to")
    p.add_argument("--out", help="write answers JSONL here (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from twig_jax.convert import load_model
    from twig_jax.pipeline import Pipeline, image_preprocessor_for, load_tokenizer
    from twig_jax.sampling import SamplingConfig

    if args.jsonl:
        rows = []
        with open(args.jsonl) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                r = json.loads(line)
                q = r.get("question", r.get("text"))
                if "image" not in r or q is None:
                    p.error(f"{args.jsonl}:{i + 1}: needs 'image' and 'question' (or 'text')")
                rows.append(dict(r, image=os.path.join(args.images, r["image"]), question=q))
    elif args.image and args.prompt:
        rows = [dict(image=args.image, question=args.prompt)]
    else:
        p.error("give --image and --prompt, or --jsonl")
    model = load_model(args.model, dtype=getattr(jnp, args.dtype), vision_dir=args.vision_dir)
    pipe = Pipeline(model, load_tokenizer(args.model), image_preprocessor_for(model, args.model))
    answers, stats = pipe.answer([r["image"] for r in rows], [r["question"] for r in rows],
                                 max_new_tokens=args.max_new_tokens,
                                 sampling=SamplingConfig(args.temperature, args.top_k, args.top_p), seed=args.seed)
    out = open(args.out, "w") if args.out else sys.stdout
    for r, a in zip(rows, answers):
        rec = {k: v for k, v in r.items() if k not in ("question",)}
        rec.update(prompt=a.question, text=a.text, num_tokens=len(a.tokens))
        out.write(json.dumps(rec) + "\n")
    if args.out:
        out.close()
    print(json.dumps(stats), file=sys.stderr)
    return 0


def _convert(argv) -> int:
    from twig_jax.convert import convert_main

    return convert_main(argv) or 0


def _demo(argv) -> int:
    from infer.demo import main

    return main(argv)


def _bench(argv) -> int:
    from infer.bench import main

    return main(argv) or 0


def _train(argv) -> int:
    from train.train import main

    return main(argv) or 0


COMMANDS = {"convert": _convert, "generate": _generate, "demo": _demo, "bench": _bench, "train": _train}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: twig-jax {" + ",".join(COMMANDS) + "} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
