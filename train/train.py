"""train a twig (twig-jax train)."""

import sys

from twig_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
