#!/usr/bin/env bash
# Run the inference demo in the project venv: scripts/demo.sh [demo args...]
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
cd "$TWIG_ROOT"
exec twig-jax demo "$@"
