"""Pretrain the shapes-llava vision tower on scene labels (the shapes world's stand-in for CLIP).

LLaVA starts from a pretrained CLIP tower; no such tower exists for the shapes world, and
training tower and language model together from random weights leaves the model reading no
image for thousands of steps (measured: after 600 steps of 8 sequences, 43% short-answer exact
match, object F1 0.02 — the language prior). So, as CLIP precedes LLaVA, this stage trains the
tower alone with dense labels: for each of the 9 grid cells, mean-pool its patch tokens and
classify the cell's object colour (or none), shape (or none) and size (or none); and from every
patch token alone, classify which cell the patch lies in and that cell's colour, shape and size.
The per-patch targets make each visual token carry its cell's object and its own grid position,
which is what the language model has to read (a CLIP token likewise describes its surroundings).
The LLaVA is then trained with the training stack, this tower kept frozen as LLaVA keeps its
CLIP tower (`twig-jax train --train-all --freeze vision`; training it along at lr 1e-3 undid the
pretraining: its weights moved by 60-90% in 1000 steps).

    python -m research.pretrain_vision --data DIR --out INIT_DIR [--images 8000] [--steps 400]

writes INIT_DIR: a converted model dir (random language model and projector, this tower) and the
shapes tokenizer, to pass as `twig-jax train --base INIT_DIR --train-all --freeze vision`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

SIZE_CLASSES = ("none", "small", "large")


def cell_labels(objects, grid: int = 3) -> np.ndarray:
    """[9, 3] int: (colour, shape, size) class of each cell, 0 = no object."""
    from twig_jax.data.shapes import COLOURS, POSITIONS, SHAPES

    lab = np.zeros((grid * grid, 3), np.int32)
    for size, colour, shape, pos in objects:
        c = POSITIONS.index(pos)
        lab[c] = (COLOURS.index(colour) + 1, SHAPES.index(shape) + 1, SIZE_CLASSES.index(size))
    return lab


def patch_labels(cell_lab: np.ndarray, patches_per_side: int, grid: int = 3) -> np.ndarray:
    """[n, 9, 3] cell labels -> [n, P, 4] per-patch (cell index, colour, shape, size), P = side^2."""
    per = patches_per_side // grid
    rows, cols = np.divmod(np.arange(patches_per_side * patches_per_side), patches_per_side)
    cell_of_patch = (rows // per) * grid + cols // per  # [P]
    attrs = cell_lab[:, cell_of_patch]  # [n, P, 3]
    cell = np.broadcast_to(cell_of_patch[None, :, None], attrs.shape[:2] + (1,))
    return np.concatenate([cell, attrs], axis=-1).astype(np.int32)


def load_split(data_dir: str, n: int, preprocess, offset: int = 0):
    with open(os.path.join(data_dir, "train.json")) as f:
        records = json.load(f)[offset:offset + n]
    pixels = np.stack([preprocess(os.path.join(data_dir, "images", r["image"]))[0] for r in records])  # [n, 3, H, W]
    labels = np.stack([cell_labels(r["objects"]) for r in records])  # [n, 9, 3]
    return pixels, labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="shapes dataset dir (train.json with 'objects', images/)")
    p.add_argument("--out", required=True, help="write the initial LLaVA here (converted model dir)")
    p.add_argument("--preset", default="shapes-llava")
    p.add_argument("--images", type=int, default=8000, help="training images (held-out: the next 500)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100, help="held-out accuracy every N steps")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from twig_jax.model.config import load_preset
    from twig_jax.data.llava_data import default_image_preprocessor
    from twig_jax.data.shapes import COLOURS, SHAPES, build_tokenizer
    from twig_jax.model.llava import Llava
    from twig_jax.convert.llava import save_converted_model

    cfg = load_preset(args.preset)
    t0 = time.perf_counter()
    pre = default_image_preprocessor(cfg)
    x_train, y_train = load_split(args.data, args.images, pre)
    x_val, y_val = load_split(args.data, 500, pre, offset=args.images)
    print(f"loaded {len(x_train)} + {len(x_val)} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    model = Llava(cfg, rngs=nnx.Rngs(args.seed))
    g = cfg.vision.image_size // cfg.vision.patch_size  # patches per side
    cells = 3
    per = g // cells
    dv = cfg.vision.hidden_size * len(cfg.feature_layers)
    n_classes = (len(COLOURS) + 1, len(SHAPES) + 1, len(SIZE_CLASSES))
    rng = np.random.default_rng(args.seed)
    # Pooled per-cell heads (colour, shape, size) and per-patch heads (cell, colour, shape, size).
    patch_classes = (cells * cells,) + n_classes
    head = {f"w{i}": jnp.asarray(rng.normal(0, 0.02, (dv, k)), jnp.float32) for i, k in enumerate(n_classes)}
    head.update({f"b{i}": jnp.zeros((k,), jnp.float32) for i, k in enumerate(n_classes)})
    head.update({f"pw{i}": jnp.asarray(rng.normal(0, 0.02, (dv, k)), jnp.float32) for i, k in enumerate(patch_classes)})
    head.update({f"pb{i}": jnp.zeros((k,), jnp.float32) for i, k in enumerate(patch_classes)})
    y_train_p, y_val_p = patch_labels(y_train, g), patch_labels(y_val, g)  # [n, P, 4]
    vision_def, vision_state = nnx.split(model.vision)
    params = {"vision": vision_state, "head": head}
    layers = cfg.feature_layers

    def forward(params, pix):  # -> 3 x [B, 9, classes], 4 x [B, P, classes]
        tower = nnx.merge(vision_def, params["vision"])
        h = tower(pix, layers)[:, 1:]  # [B, P, Dv] (CLS dropped, as LLaVA's "default" select)
        b = h.shape[0]
        pooled = h.reshape(b, cells, per, cells, per, dv).mean(axis=(2, 4)).reshape(b, cells * cells, dv)  # [B, 9, Dv]
        hd = params["head"]
        cell_out = [pooled @ hd[f"w{i}"] + hd[f"b{i}"] for i in range(3)]
        patch_out = [h @ hd[f"pw{i}"] + hd[f"pb{i}"] for i in range(4)]
        return cell_out, patch_out

    def loss_fn(params, pix, lab, plab):
        cell_out, patch_out = forward(params, pix)
        ce = optax.softmax_cross_entropy_with_integer_labels
        losses = [ce(o, lab[..., i]).mean() for i, o in enumerate(cell_out)]
        losses += [ce(o, plab[..., i]).mean() for i, o in enumerate(patch_out)]
        return sum(losses)

    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 20), args.steps, args.lr * 0.05)
    tx = optax.adamw(sched, weight_decay=0.01)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, pix, lab, plab):
        loss, grads = jax.value_and_grad(loss_fn)(params, pix, lab, plab)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, pix):  # -> [B, 9, 3], [B, P, 4]
        cell_out, patch_out = forward(params, pix)
        return (jnp.stack([jnp.argmax(o, -1) for o in cell_out], -1),
                jnp.stack([jnp.argmax(o, -1) for o in patch_out], -1))

    def cell_accuracy(params) -> float:
        outs = [predict(params, x_val[i:i + 100]) for i in range(0, len(x_val), 100)]
        preds = np.concatenate([np.asarray(c) for c, _ in outs])
        ppreds = np.concatenate([np.asarray(p) for _, p in outs])
        occupied = y_val[..., 2] > 0
        per_attr = [float(np.mean((preds[..., i] == y_val[..., i])[occupied])) for i in range(3)]
        p_occupied = y_val_p[..., 3] > 0
        p_attr = [float(np.mean((ppreds[..., i] == y_val_p[..., i])[p_occupied])) for i in range(1, 4)]
        p_cell = float(np.mean(ppreds[..., 0] == y_val_p[..., 0]))
        print(f"  occupied cells: colour {per_attr[0]:.1%}, shape {per_attr[1]:.1%}, size {per_attr[2]:.1%}; "
              f"patches of occupied cells: colour {p_attr[0]:.1%}, shape {p_attr[1]:.1%}, size {p_attr[2]:.1%}; "
              f"patch cell {p_cell:.1%}", file=sys.stderr)
        return float(np.mean(np.all(preds == y_val, axis=-1)))  # whole cell right (colour, shape and size)

    t0 = time.perf_counter()
    for s in range(1, args.steps + 1):
        idx = rng.integers(0, len(x_train), args.batch)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]),
                                       jnp.asarray(y_train_p[idx]))
        if s % args.eval_every == 0 or s == args.steps:
            acc = cell_accuracy(params)
            print(f"step {s}: loss {float(loss):.4f}, held-out cell accuracy {acc:.2%} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    nnx.update(model.vision, params["vision"])
    save_converted_model(model, args.out, build_tokenizer())
    with open(os.path.join(args.out, "vision_pretrain.json"), "w") as f:
        json.dump({"steps": args.steps, "batch": args.batch, "images": args.images, "lr": args.lr,
                   "held_out_cell_accuracy": cell_accuracy(params),
                   "seconds": time.perf_counter() - t0}, f, indent=2)
    print(f"initial model (pretrained tower) saved to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
