#!/usr/bin/env bash
# Run the test suite in the project venv: scripts/test.sh [pytest args...]
# slow/gpu-marked tests are deselected by default (see pyproject.toml); e.g.
#   scripts/test.sh -m slow        # only the slow tests
#   scripts/test.sh -m ''          # everything
# XLA_FLAGS from the environment is passed through; an empty XLA_FLAGS is unset.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
cd "$TWIG_ROOT"
if [ -z "${XLA_FLAGS-}" ]; then
    unset XLA_FLAGS
fi
exec python -m pytest -q "$@"
