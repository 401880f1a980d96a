#!/usr/bin/env bash
# The test suite (fast tests, then the real-model and multi-process ones), after building the environment.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ruff check retrieval_head tests training benchmarks
python -m pytest -q -p no:cacheprovider "$@"
