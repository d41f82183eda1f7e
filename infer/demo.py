"""the main job: the bundled model on the bundled demo set (twig-jax demo)."""

import sys

from twig_jax.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
