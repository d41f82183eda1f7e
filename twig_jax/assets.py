"""Where the bundled shapes-world model and its question sets live: `infer/assets` in the repository.

The assets ship with the repository, not with the wheel: commands that default to them (`demo`, the
bundled-model tests) run from a checkout or an editable install and take a directory otherwise.
"""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "infer", "assets")
BUNDLE_DIR = os.path.join(ASSETS, "shapes-llava")  # the bundled model: base/ + twig/
BASE_SUBDIR, TWIG_SUBDIR = "base", "twig"
DEFAULT_MODEL = os.path.join(BUNDLE_DIR, BASE_SUBDIR)
DEFAULT_TWIG = os.path.join(BUNDLE_DIR, TWIG_SUBDIR)
DEMO_DIR = os.path.join(ASSETS, "demo")  # questions.jsonl, answers.jsonl, images/
MINI_DIR = os.path.join(ASSETS, "shapes-eval-mini")  # the first 16 eval images, checked in for CI
RUN_DTYPE = "float32"  # the bundle is stored in bfloat16 and run in float32 (see docs/results.md)
