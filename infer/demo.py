"""The main job: batch inference on the bundled demo set.

    python -m infer.demo [--model DIR] [--questions FILE] [--images DIR] [--max-new-tokens N]

With --model, runs a converted or Hugging Face LLaVA checkpoint directory. Without it, the trained
demo model does not exist yet, so a small randomly initialised LLaVA (and a word-level tokenizer)
is built in place: the answers are random words, but every stage runs for real (image pipeline,
prompt template, placeholder expansion, batched prefill, one compiled decode loop).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

DEMO_WORDS = (
    "a an the is are of in on to and yes no what which where how many colour color shape image "
    "describe there circle square triangle red blue green yellow small large left right top bottom "
    "center above below chat between curious human artificial intelligence assistant gives helpful "
    "detailed polite answers human's questions user . , ? : ' s"
).split()


def random_demo_model(seed: int = 0):
    """A small random LLaVA and a matching word-level tokenizer, built in a temp dir."""
    from flax import nnx
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from twig_jax.config import LlavaConfig, TextConfig, VisionConfig
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


def read_questions(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                if "image" not in row or "text" not in row:
                    raise ValueError(f"{path}:{i + 1}: each line needs 'image' and 'text' keys, got {sorted(row)}")
                rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="converted or HF LLaVA dir (default: a random demo model built in place)")
    p.add_argument("--questions", default=os.path.join(ASSETS, "demo_questions.jsonl"),
                   help="LLaVA question file: JSONL of {question_id, image, text}")
    p.add_argument("--images", default=ASSETS, help="folder the question file's images are relative to")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--answers", help="write LLaVA-style answer JSONL here")
    args = p.parse_args(argv)

    from twig_jax.pipeline import Pipeline, image_preprocessor_for, load_tokenizer

    t0 = time.perf_counter()
    if args.model:
        import jax.numpy as jnp

        from twig_jax.convert import load_model

        model = load_model(args.model, dtype=getattr(jnp, args.dtype))
        tokenizer = load_tokenizer(args.model)
        pipe = Pipeline(model, tokenizer, image_preprocessor_for(model, args.model))
        print(f"loaded {args.model}", file=sys.stderr)
    else:
        model, tokenizer = random_demo_model()
        pipe = Pipeline(model, tokenizer)
        print("no --model given: using a randomly initialised demo LLaVA (answers are random words)",
              file=sys.stderr)
    load_s = time.perf_counter() - t0

    rows = read_questions(args.questions)
    images = [os.path.join(args.images, r["image"]) for r in rows]
    questions = [r["text"] for r in rows]
    # First call compiles; the second one shows the steady-state speed of the compiled loop.
    t0 = time.perf_counter()
    pipe.answer(images, questions, max_new_tokens=args.max_new_tokens)
    compile_s = time.perf_counter() - t0
    answers, stats = pipe.answer(images, questions, max_new_tokens=args.max_new_tokens)

    for r, a in zip(rows, answers):
        print(f"[{r.get('question_id', '')}] {r['image']}: {a.question!r}\n    -> {a.text!r} "
              f"({len(a.tokens)} tokens, prompt {a.prompt_tokens})")
    print(f"batch {len(rows)}: {stats['generated_tokens']} tokens in {stats['seconds']:.3f} s = "
          f"{stats['tokens_per_s']:.1f} tokens/s (load {load_s:.1f} s, first call incl. compile {compile_s:.1f} s)")
    if args.answers:
        with open(args.answers, "w") as f:
            for r, a in zip(rows, answers):
                f.write(json.dumps({"question_id": r.get("question_id"), "prompt": r["text"], "text": a.text,
                                    "model_id": args.model or "random-demo"}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
