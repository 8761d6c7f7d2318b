#!/usr/bin/env bash
# The one-call GPU check (bench/gpu_check.py says what it runs and writes):
#   bash bench/gpu_check.sh [DIR] [--budget S] [--cache PATH] [--only a,b] [--skip a,b] [--dry-run]
# It runs on the machine's own python3 (SAN_PYTHON overrides), never a virtual environment of the
# repository: a CPU-only venv copied onto a GPU machine would hide its CUDA torch. Wheels carried
# in .whl/ (xformers, nvidia-cuda-runtime-cu12; README "GPU check") are installed first into a
# --target folder put on PYTHONPATH; nothing else is installed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${SAN_PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    SITE="${TMPDIR:-/tmp}/san_fast_wheels"
    rm -rf "$SITE"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_check.sh: installed $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into $SITE"
    else
        echo "gpu_check.sh: could not install the wheels in .whl/; going on without them"
    fi
fi
exec "$PY" -m bench.gpu_check "$@"
