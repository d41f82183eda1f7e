#!/usr/bin/env bash
# Create (or reuse) the project virtualenv at <repo>/.venv and install twig_jax
# with its test extra. Safe to run directly or to `source`; when sourced, the
# venv's bin/ is put first on PATH (VIRTUAL_ENV is exported too).
#
# torch==2.13.0 is installed FIRST: it comes from a local CPU wheel, and must be
# present before anything else can pull a CUDA build of torch from the registry.
#
# Idempotent: pip is skipped while the stamp file .venv/.twig_jax_installed is
# newer than pyproject.toml. Set TWIG_FORCE_INSTALL=1 to reinstall anyway.

_twig_fail() {
    echo "setup_env.sh: $*" >&2
    return 1
}

_twig_setup() {
    local root venv stamp py
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    venv="$root/.venv"
    stamp="$venv/.twig_jax_installed"
    py="${PYTHON:-python3}"

    if [ ! -x "$venv/bin/python" ]; then
        echo "setup_env.sh: creating virtualenv $venv" >&2
        "$py" -m venv "$venv" || _twig_fail "could not create $venv with $py" || return 1
    fi

    if [ "${TWIG_FORCE_INSTALL:-0}" = "1" ] || [ ! -f "$stamp" ] \
        || [ "$root/pyproject.toml" -nt "$stamp" ]; then
        echo "setup_env.sh: installing torch==2.13.0 and twig_jax[test] into $venv" >&2
        "$venv/bin/python" -m pip install --disable-pip-version-check "torch==2.13.0" \
            || _twig_fail "pip install torch==2.13.0 failed" || return 1
        "$venv/bin/python" -m pip install --disable-pip-version-check -e "$root[test]" \
            || _twig_fail "pip install -e '$root[test]' failed" || return 1
        touch "$stamp"
    fi

    export VIRTUAL_ENV="$venv"
    case ":$PATH:" in
        *":$venv/bin:"*) ;;
        *) export PATH="$venv/bin:$PATH" ;;
    esac
    TWIG_ROOT="$root"
    export TWIG_ROOT
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    # Executed directly.
    set -euo pipefail
    _twig_setup
else
    # Sourced: report failure to the caller without killing an interactive shell.
    _twig_setup || return 1
fi
