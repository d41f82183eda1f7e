"""Image-prompt padding, side by side: prompts padded to N visual tokens + a text bucket (the default,
generate.TEXT_BUCKETS) against whole-prompt buckets (text_buckets=None, the earlier rule), for plain
decoding and the bundled P-head + SSD, on descriptions, in one run.

    python -m research.padding_ab [--data DIR] [--images 16] [--batches 1,8] [--repeats 5] [--out-json F]

Passes run round-robin over the four generators after a warm-up pass each (speed_table.timed_passes); the
median pass counts.
"""

from __future__ import annotations

import argparse
import json
import sys

PADDINGS = {"text": {}, "whole": {"text_buckets": None}}  # name -> generator keyword arguments


def main(argv=None) -> int:
    from twig_jax.eval.evaluate import DEFAULT_MODEL, DEFAULT_TWIG

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--twig", default=DEFAULT_TWIG)
    p.add_argument("--data", default=None, help="shapes dataset dir (default: seed 0's eval split in a temp dir)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-json", default=None)
    args = p.parse_args(argv)

    from research.speed_table import description_batch, load_model_and_twig
    from twig_jax.bench.timing import median_pass, timed_passes
    from twig_jax.decode.generator import make_generator

    model, tokenizer, twig, twig_cfg, pipe = load_model_and_twig(args.model, args.twig)
    prompts, pixels = description_batch(pipe, args.data, args.images)
    eos = (tokenizer.eos_token_id,)
    method = "phead" if twig.p_head is not None else "twig"
    gens = {}
    for pad, kw in PADDINGS.items():
        gens[("plain", pad)] = make_generator(model, None, None, method="none", ssd=False, **kw)
        gens[(f"{method}+ssd", pad)] = make_generator(model, twig, twig_cfg, method=method, ssd=True, **kw)
    rows = []
    print("| batch | padding | prompt length | plain tokens/s | " + f"{method}+ssd tokens/s | {method}+ssd / plain |")
    print("|---|---|---|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        passes = timed_passes(gens, prompts, pixels, b, args.repeats, 128, eos)
        med = {k: median_pass(v) for k, v in passes.items()}
        for pad in PADDINGS:
            plain, spec = med[("plain", pad)], med[(f"{method}+ssd", pad)]
            s = gens[("plain", pad)].pad_inputs(prompts[:b], pixels[:b], 128)[0].shape[1]
            row = dict(batch=b, padding=pad, prompt_len=int(s), plain_tokens_per_s=plain["tokens"] / plain["seconds"],
                       spec_tokens_per_s=spec["tokens"] / spec["seconds"], method=f"{method}+ssd")
            row["ratio"] = row["spec_tokens_per_s"] / row["plain_tokens_per_s"]
            rows.append(row)
            print(f"| {b} | {pad} | {s} | {row['plain_tokens_per_s']:.0f} | {row['spec_tokens_per_s']:.0f} | "
                  f"{row['ratio']:.2f}x |")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"repeats": args.repeats, "images": args.images, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
