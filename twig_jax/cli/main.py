"""`twig-jax` command line: thin commands over the library (`twig-jax --help` lists them)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable
import json
import os
import sys

from twig_jax.twig.config import METHODS, SELECT_RULES


def _add_twig_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TwigVLM (hyper-parameters default to the twig checkpoint's TwigConfig)")
    g.add_argument("--twig", help="twig checkpoint: orbax dir (twig_io.save_twig) or MILVLG safetensors")
    g.add_argument("--method", choices=list(METHODS),
                   help="visual token pruning (default: twig with --twig, else none)")
    g.add_argument("--ssd", action=argparse.BooleanOptionalAction, default=None,
                   help="self-speculative decoding (default: on with --twig; needs a twig)")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--R", type=int, help="kept visual tokens")
    b.add_argument("--R-bar", dest="R_bar", type=float, help="average visual tokens per layer (paper's budget)")
    g.add_argument("--K", type=int, help="trunk depth: the twig grows on base layer K (FastV scores layer K-1)")
    g.add_argument("--T", type=int, help="twig layers (must match the twig checkpoint)")
    g.add_argument("--Kf", type=int, help="FinalWipe: base layers Kf..L-1 see text only")
    g.add_argument("--draft-len", type=int, help="most tokens drafted per SSD round (delta)")
    g.add_argument("--theta", type=float, help="stop drafting when the draft's top probability is below this")
    g.add_argument("--score-rows", choices=["last", "text"], help="attention rows that score visual tokens")
    g.add_argument("--select", choices=list(SELECT_RULES),
                   help="keep-set from the scores: top R (the paper), score-weighted coverage of the visual "
                        "tokens, or a Gumbel-top-R draw (the P-head only: its RL's policy); default: the "
                        "twig's for twig / phead, top for fastv / random")


def _twig_setup(p: argparse.ArgumentParser, args, model):
    """(twig or None, TwigConfig or None) from --twig and the override flags; p.error on misuse
    (twig.config.resolve_twig_config decides what a run uses)."""
    from twig_jax.twig.config import TwigConfigError, TwigOverrides, resolve_twig_config
    from twig_jax.twig.io import load_twig_any

    L, N = model.cfg.text.num_hidden_layers, model.cfg.num_image_tokens
    over = TwigOverrides(**{k: getattr(args, k) for k in ("K", "T", "Kf", "R", "R_bar", "draft_len", "theta",
                                                          "score_rows", "select") if getattr(args, k, None) is not None})
    twig = None
    if args.twig:
        twig, _ = load_twig_any(args.twig, model.cfg.text, dtype=model.text.embed[...].dtype)
    method = args.method or (("phead" if twig.p_head is not None else "twig") if twig is not None else "none")
    ssd = (twig is not None) if args.ssd is None else args.ssd
    try:
        twig_cfg = resolve_twig_config(L, N, method=method, ssd=ssd, twig_cfg=None if twig is None else twig.twig_cfg,
                                       has_p_head=twig is not None and twig.p_head is not None, overrides=over)
    except TwigConfigError as e:
        p.error(f"{e} (this model: L={L} layers, N={N} visual tokens)")
    if twig is not None and twig_cfg is not None and twig_cfg != twig.twig_cfg:
        twig.twig_cfg = twig_cfg
    return twig, twig_cfg


def _read_rows(p, args) -> list[dict]:
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
                rows.append(dict(r, image_path=os.path.join(args.images, r["image"]), question=q))
        if not rows:
            p.error(f"{args.jsonl}: no questions")
        return rows
    if args.image and args.prompt:
        return [dict(image=args.image, image_path=args.image, question=args.prompt)]
    p.error("give --image and --prompt, or --jsonl")


def _generate(argv) -> int:
    p = argparse.ArgumentParser(prog="twig-jax generate", description="Answer (image, question) pairs.")
    p.add_argument("--model", required=True, help="converted or Hugging Face LLaVA directory")
    p.add_argument("--vision-dir", help="CLIP checkpoint dir (liuhaotian layout only)")
    p.add_argument("--image", help="image path (single question mode)")
    p.add_argument("--prompt", help="question text (single question mode)")
    p.add_argument("--jsonl", help="batch input: JSONL of {image, question} (or LLaVA's {question_id, image, text})")
    p.add_argument("--images", default="", help="folder that --jsonl image paths are relative to")
    p.add_argument("--out", help="write answers JSONL here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call (--jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--stream", action="store_true",
                   help="print one answer as it is generated, drafted-and-accepted tokens highlighted")
    p.add_argument("--no-color", action="store_true", help="with --stream: [..] markers instead of ANSI colour")
    p.add_argument("--warmup", action="store_true",
                   help="run the first batch once untimed first (else its timing includes compilation)")
    _add_twig_args(p)
    args = p.parse_args(argv)
    if args.ssd and not args.twig:
        p.error("--ssd needs --twig: self-speculative decoding drafts with the twig (give --twig DIR, or --no-ssd)")
    if args.method in ("twig", "phead") and not args.twig:
        p.error(f"--method {args.method} (TTP) needs --twig DIR; without a twig use --method fastv, random or none")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    rows = _read_rows(p, args)
    if args.stream and len(rows) != 1:
        p.error(f"--stream answers a single question; got {len(rows)}")

    import jax.numpy as jnp

    from twig_jax.convert.llava import load_model
    from twig_jax.pipeline import Pipeline, image_preprocessor_for, load_tokenizer
    from twig_jax.decode.generator import make_generator
    from twig_jax.decode.sampling import SamplingConfig

    model = load_model(args.model, dtype=getattr(jnp, args.dtype), vision_dir=args.vision_dir)
    twig, twig_cfg = _twig_setup(p, args, model)
    gen = make_generator(model, twig, twig_cfg, args.method, args.ssd, force_twig_generator=args.stream)
    pipe = Pipeline(model, load_tokenizer(args.model), image_preprocessor_for(model, args.model), generator=gen)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)

    if args.stream:
        from twig_jax.decode.stream import StreamPrinter

        printer = StreamPrinter(pipe.tokenizer, color=False if args.no_color else None)
        ans, stats = pipe.stream(rows[0]["image_path"], rows[0]["question"], max_new_tokens=args.max_new_tokens,
                                 sampling=sampling, seed=args.seed, on_chunk=printer)
        printer.finish()
        if getattr(gen, "ssd", False):
            print(printer.legend(), file=sys.stderr)
        stats.pop("per_row", None)
        print(json.dumps(stats), file=sys.stderr)
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(_record(rows[0], ans)) + "\n")
        return 0

    if args.warmup:
        chunk = rows[:args.batch_size]
        pipe.answer([r["image_path"] for r in chunk], [r["question"] for r in chunk],
                    max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    out = open(args.out, "w") if args.out else sys.stdout
    all_stats = []
    seen_sizes = {len(rows[:args.batch_size])} if args.warmup else set()  # a new batch shape compiles
    try:
        for i in range(0, len(rows), args.batch_size):
            chunk = rows[i:i + args.batch_size]
            answers, stats = pipe.answer([r["image_path"] for r in chunk], [r["question"] for r in chunk],
                                         max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
            for r, a in zip(chunk, answers):
                rec = _record(r, a)
                rec["stats"]["batch_seconds"] = stats["seconds"]
                rec["stats"]["batch_size"] = len(chunk)
                rec["stats"]["includes_compile"] = len(chunk) not in seen_sizes
                out.write(json.dumps(rec) + "\n")
            out.flush()
            seen_sizes.add(len(chunk))
            stats.pop("per_row", None)
            stats["questions"] = len(chunk)
            all_stats.append(stats)
    finally:
        if args.out:
            out.close()
    print(json.dumps(_merge_stats(all_stats)), file=sys.stderr)
    return 0


def _record(row: dict, ans) -> dict:
    rec = {k: v for k, v in row.items() if k not in ("question", "image_path")}
    rec.update(prompt=ans.question, text=ans.text, num_tokens=len(ans.tokens), stats=dict(ans.stats))
    return rec


def _merge_stats(all_stats: list[dict]) -> dict:
    """Batch statistics summed over the --batch-size chunks."""
    if len(all_stats) == 1:
        return all_stats[0]
    out = dict(all_stats[0])
    for k in ("seconds", "generated_tokens", "rounds", "drafted", "accepted", "questions"):
        if k in out:
            out[k] = sum(s[k] for s in all_stats)
    out["tokens_per_s"] = out["generated_tokens"] / max(out["seconds"], 1e-9)
    if "drafted" in out:
        nan = float("nan")
        out["acceptance_rate"] = out["accepted"] / out["drafted"] if out["drafted"] else nan
        out["mean_accepted_per_round"] = out["accepted"] / out["rounds"] if out["rounds"] else nan
        emitted = out["generated_tokens"] - out["questions"]  # the first token of each comes from prefill
        out["mean_tokens_per_round"] = emitted / out["rounds"] if out["rounds"] else nan
    out["batches"] = len(all_stats)
    return out


def _prune_viz(argv) -> int:
    p = argparse.ArgumentParser(prog="twig-jax prune-viz",
                                description="Picture which visual tokens TTP (twig) and FastV keep.")
    p.add_argument("--model", required=True, help="converted or Hugging Face LLaVA directory")
    p.add_argument("--vision-dir", help="CLIP checkpoint dir (liuhaotian layout only)")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    _add_twig_args(p)
    args = p.parse_args(argv)
    if args.R is None and args.R_bar is None and not args.twig:
        p.error("give --R (or --R-bar): the kept visual token count")

    import jax.numpy as jnp

    from twig_jax.convert.llava import load_model
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
    from twig_jax.eval.viz import prune_picture

    model = load_model(args.model, dtype=getattr(jnp, args.dtype), vision_dir=args.vision_dir)
    args.method = args.method or ("twig" if args.twig else "fastv")
    twig, twig_cfg = _twig_setup(p, args, model)
    info = prune_picture(model, load_tokenizer(args.model), args.image, args.prompt, args.out, twig_cfg,
                         twig=twig, image_processor=image_preprocessor_for(model, args.model))
    print(json.dumps(info))
    return 0


def _bench_twig(argv) -> int:
    from twig_jax.bench.methods import main

    return main(argv) or 0


def _convert(argv) -> int:
    from twig_jax.convert.llava import convert_main

    return convert_main(argv) or 0


def _demo(argv) -> int:
    from twig_jax.cli.demo import main

    return main(argv)


def _bench(argv) -> int:
    if any(a == "--methods" or a.startswith("--methods=") for a in argv):
        return _bench_twig(argv)  # TwigVLM methods on the same weights (twig_jax/bench/methods.py)
    from twig_jax.bench.hf import main

    return main(argv) or 0


def _train(argv) -> int:
    from twig_jax.cli.train import main

    return main(argv) or 0


def _eval(argv) -> int:
    from twig_jax.eval.evaluate import eval_main

    return eval_main(argv)


def _data(argv) -> int:
    if not argv or argv[0] != "shapes":
        print("usage: twig-jax data shapes --out DIR --n N [--n-eval M] [--seed S]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from twig_jax.data.shapes import main

    return main(argv[1:])


def _train_phead(argv) -> int:
    from twig_jax.train.prune_rl import main

    return main(argv) or 0


@dataclasses.dataclass(frozen=True)
class Command:
    run: Callable[[list[str]], int]
    summary: str  # one line for `twig-jax --help`


COMMANDS = {
    "convert": Command(_convert, "convert a Hugging Face LLaVA-1.5 checkpoint into a twig_jax model directory"),
    "generate": Command(_generate, "answer questions about images: plain, pruned (TTP, P-head, FastV, random), SSD"),
    "eval": Command(_eval, "answer a LLaVA question file and score it (exact match, object F1)"),
    "demo": Command(_demo, "the bundled shapes-world LLaVA + twig on the bundled demo set, against plain decoding"),
    "train": Command(_train, "train a twig (self-distillation from the frozen base) or the whole model"),
    "train-phead": Command(_train_phead, "train a twig's P-head (attention distillation, then REINFORCE)"),
    "bench": Command(_bench, "decode speed against Hugging Face transformers on the same weights"),
    "bench-twig": Command(_bench_twig, "TwigVLM methods side by side: plain, FastV, TTP, SSD, TTP+SSD, P-head"),
    "prune-viz": Command(_prune_viz, "picture which visual tokens a pruning method keeps"),
    "data": Command(_data, "generate the shapes-world data set (images, questions, answers)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: twig-jax COMMAND [args...]   (twig-jax COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"twig-jax: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]].run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
