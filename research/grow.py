"""Transplant a trained shallow language model into a deeper model dir (model growth).

    python -m research.grow --lm W/text-lm --into W/init --out W/init-grown

The shallow LM's embedding, its n decoder layers, final norm and head are copied into the
first n layers of the deeper model from --into (same hidden size, heads and vocabulary); the
deeper model's vision tower and projector are kept. Each extra layer keeps its random q/k/v and
gate/up weights but gets zero attention-output and MLP-down weights, so it adds nothing to the
residual stream at first: the grown model computes exactly the shallow LM's function (the test
checks its logits against the shallow model's), and training then lets the extra layers in.

Placement (`--at`, `--fill`): by default the shallow layers fill the first n positions and the new
layers keep the target's random read weights. `--at 0,4 --fill next` puts shallow layer i at
position at[i] and gives every new layer the read-side weights (norms, q/k/v, gate/up) of the next
trained layer (the last one if none follows), still with zero residual writers. A new layer before
trained layer j then sees exactly j's input and so attends exactly as j does: FastV scoring at such
a layer reads the attention of the layer that actually reads the image, the strongest FastV the
grown model allows; and a trained layer placed after the twig's trunk (K) makes pruning matter.

Why: in the shapes world's text control a 2-layer LM learns content lookup ("what shape is the
purple object ?" -> find "purple", copy the next word) within 750-1250 steps at batch 32 (24k-40k
sequences), while the 8-layer LM stayed at chance in every run tried (up to 16k sequences;
docs/results.md). Growing keeps the lookup circuit
and the 8-layer depth the twig needs (K = 2 trunk, Kf at three quarters).
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
from flax import nnx

# Stacked layer weights that write into the residual stream; zero in a new layer -> identity layer.
RESIDUAL_WRITERS = ("wo", "w_down", "bo", "b_down")


class GrowError(ValueError):
    pass


def _check_compatible(small, big) -> None:
    s, b = small.cfg.text, big.cfg.text
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "rope_theta", "rms_norm_eps", "hidden_act", "attention_bias", "mlp_bias",
              "tie_word_embeddings")
    bad = [f"{f}: {getattr(s, f)} vs {getattr(b, f)}" for f in fields if getattr(s, f) != getattr(b, f)]
    if bad:
        raise GrowError("the shallow LM and the target differ in " + "; ".join(bad))
    if s.num_hidden_layers > b.num_hidden_layers:
        raise GrowError(f"the shallow LM has {s.num_hidden_layers} layers, more than the target's "
                        f"{b.num_hidden_layers}")


def placement(n_small: int, n_big: int, at=None, fill: str = "random") -> tuple[list[int], list[int | None]]:
    """(positions of the shallow layers in big, for each big layer the shallow layer whose read-side
    weights it takes or None for big's own); raises GrowError on a bad placement."""
    try:
        at = list(range(n_small)) if at is None else [int(a) for a in at]
    except ValueError:
        raise GrowError(f"--at {at}: positions must be integers") from None
    if len(at) != n_small:
        raise GrowError(f"--at names {len(at)} positions for {n_small} shallow layers")
    if sorted(set(at)) != at or at[0] < 0 or at[-1] >= n_big:
        raise GrowError(f"--at {at}: positions must be increasing, distinct and within 0..{n_big - 1}")
    if fill not in ("random", "next"):
        raise GrowError(f"fill must be 'random' or 'next', got {fill!r}")
    source: list[int | None] = []
    for pos in range(n_big):
        if pos in at:
            source.append(at.index(pos))
        elif fill == "random":
            source.append(None)
        else:
            later = [i for i, a in enumerate(at) if a > pos]
            source.append(later[0] if later else n_small - 1)
    return at, source


def grow(small, big, image_side: bool = False, at=None, fill: str = "random"):
    """Write small's language model into big (in place) as described above; returns big.

    image_side: small is a trained LLaVA, not a text LM: its vision tower and projector are copied
    too, so that the grown model computes small's function on images as well.
    at: big-model positions of small's layers (default 0..n-1); fill: "random" keeps big's read
    weights in the new layers, "next" copies those of the next trained layer."""
    _check_compatible(small, big)
    at, source = placement(small.cfg.text.num_hidden_layers, big.cfg.text.num_hidden_layers, at, fill)
    if image_side:
        fields = ("vision", "image_token_index", "projector_hidden_act", "projector_bias", "vision_feature_layer",
                  "vision_feature_select_strategy")
        bad = [f for f in fields if getattr(small.cfg, f) != getattr(big.cfg, f)]
        if bad:
            raise GrowError(f"image_side: the two models differ in {', '.join(bad)}")
        nnx.update(big.vision, nnx.state(small.vision))
        nnx.update(big.projector, nnx.state(small.projector))
    st, bt = small.text, big.text
    bt.embed[...] = st.embed[...].astype(bt.embed[...].dtype)
    bt.final_norm[...] = st.final_norm[...].astype(bt.final_norm[...].dtype)
    if bt.lm_head is not None:
        bt.lm_head[...] = st.lm_head[...].astype(bt.lm_head[...].dtype)
    small_w = st.layers.weights()
    for name, param in vars(bt.layers).items():
        if name not in small_w:
            continue
        w, sw = param[...], small_w[name].astype(param[...].dtype)
        rows = []
        for pos, src in enumerate(source):
            if pos in at:
                rows.append(sw[src])
            elif name in RESIDUAL_WRITERS:
                rows.append(jnp.zeros_like(w[pos]))
            else:
                rows.append(w[pos] if src is None else sw[src])
        param[...] = jnp.stack(rows)
    return big


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.grow", description=__doc__.splitlines()[0])
    p.add_argument("--lm", required=True, help="model dir of the trained shallow LM")
    p.add_argument("--into", required=True, help="model dir whose config, vision tower and projector are kept")
    p.add_argument("--out", required=True)
    p.add_argument("--image-side", action="store_true",
                   help="--lm is a trained LLaVA: take its vision tower and projector too (default: --into's)")
    p.add_argument("--at", help="comma-separated positions of the shallow layers in the deeper model (default 0..n-1)")
    p.add_argument("--fill", choices=("random", "next"), default="random",
                   help="read-side weights of the new layers: the target's random ones, or the next trained layer's")
    args = p.parse_args(argv)
    from twig_jax.convert.llava import load_model
    from twig_jax.pipeline import load_tokenizer
    from twig_jax.convert.llava import save_converted_model

    # float32 whatever is stored: the grown model is a training start (float32 masters)
    small, big = load_model(args.lm, dtype=jnp.float32), load_model(args.into, dtype=jnp.float32)
    try:
        at = None if args.at is None else args.at.split(",")
        grow(small, big, image_side=args.image_side, at=at, fill=args.fill)
    except GrowError as e:
        print(f"research.grow: error: {e}", file=sys.stderr)
        return 2
    save_converted_model(big, args.out, load_tokenizer(args.into), preprocessor_from=args.into)
    print(f"grew {small.cfg.text.num_hidden_layers} -> {big.cfg.text.num_hidden_layers} layers into {args.out}"
          + (f" (trained layers at {args.at}, fill {args.fill})" if args.at else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
