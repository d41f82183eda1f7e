#!/usr/bin/env python3
"""Bundle the trained shapes-world LLaVA + twig into infer/assets/shapes-llava (research/bundle.py: `python -m research.bundle` is the same command).

    python research/scripts/bundle_shapes.py --base /work/runs/base/final --twig /work/runs/twig \
        --out infer/assets/shapes-llava --measure
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from research.bundle import main

if __name__ == "__main__":
    sys.exit(main())
