#!/usr/bin/env bash
# Run the test suite in the project venv: scripts/test.sh [pytest args...]
# slow/gpu-marked tests are deselected by default (see pyproject.toml); e.g.
#   scripts/test.sh -m slow        # only the slow tests
#   scripts/test.sh -m ''          # everything
# XLA_FLAGS from the environment is passed through; an empty XLA_FLAGS is unset.
# Test files run in parallel (pytest-xdist, one file per worker so module fixtures build once):
# TWIG_TEST_WORKERS workers, default min(nproc, 4); TWIG_TEST_WORKERS=0 runs in this process.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
cd "$TWIG_ROOT"
if [ -z "${XLA_FLAGS-}" ]; then
    unset XLA_FLAGS
fi
if [ -z "${TWIG_TEST_WORKERS-}" ]; then
    TWIG_TEST_WORKERS="$(nproc 2>/dev/null || echo 1)"
    if [ "$TWIG_TEST_WORKERS" -gt 4 ]; then TWIG_TEST_WORKERS=4; fi
    if [ "$TWIG_TEST_WORKERS" -lt 2 ]; then TWIG_TEST_WORKERS=0; fi
fi
exec python -m pytest -q -n "$TWIG_TEST_WORKERS" --dist loadfile "$@"
