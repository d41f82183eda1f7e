"""`twig-jax train --train-all` with the shapes world's training-only attention target
(research/attention_target.py): its own --attn-* flags build the data extension and the auxiliary
loss; every other argument goes to `twig-jax train` unchanged.

Example (one stage of research/scripts/train_shapes.sh):
  python -m research.train_attention --attn-layer 1 --attn-key-layer 0 --attn-heads 2 --attn-weight 0.3 \\
      --attn-roles --base runs/shapes/att2/final --train-all --freeze vision --data runs/shapes/data/train.json \\
      --images runs/shapes/data/images --max-len 352 --on-too-long truncate --batch 16 --steps 400 --out att3
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from research.attention_target import shapes_attention
from twig_jax.cli.train import main as train_main

PROG = "python -m research.train_attention"


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: only these exact flags are taken, every other one is twig-jax train's
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="every other argument: twig-jax train --help")
    p.add_argument("--attn-layer", type=int, default=None,
                   help="with --train-all: a training-only attention target on this layer: its first --attn-heads "
                        "heads are pulled onto the cells each short question is about (shapes-world data: the "
                        "records' 'objects')")
    p.add_argument("--attn-heads", type=int, default=1, help="heads of --attn-layer that get the target")
    p.add_argument("--attn-key-layer", type=int, default=None,
                   help="with --attn-layer: also pull this layer's first --attn-heads heads, from the same row, "
                        "onto the question's key words (the lookup's first hop)")
    p.add_argument("--attn-weight", type=float, default=1.0, help="weight of the attention target's loss")
    p.add_argument("--attn-roles", action="store_true",
                   help="with --attn-layer: a relation's two objects are two targets (even heads: the subject "
                        "and its words, odd heads: the reference and its words) instead of one")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, train_argv = build_parser().parse_known_args(argv)
    try:
        extra_fields, aux_loss = shapes_attention(args.attn_layer, args.attn_heads, args.attn_key_layer,
                                                  args.attn_weight, args.attn_roles)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return train_main(train_argv, extra_fields=extra_fields, aux_loss=aux_loss)


if __name__ == "__main__":
    sys.exit(main())
