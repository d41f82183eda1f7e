"""train a twig's P-head (twig-jax train-phead)."""

import sys

from twig_jax.train.prune_rl import main

if __name__ == "__main__":
    sys.exit(main())
