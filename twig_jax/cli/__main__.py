"""`python -m twig_jax.cli` is `twig-jax`."""

import sys

from twig_jax.cli.main import main

sys.exit(main())
