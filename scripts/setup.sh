#!/usr/bin/env bash
# Create .venv and install the appliance with its training and test extras (idempotent).
# torch is pinned to the CPU build in pyproject's [train] extra; nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[train,dev]'
    rm -f .venv/.installed-* && touch "$stamp"
fi
