#!/usr/bin/env bash
# The main job: train a head for SmolLM2-135M against all-MiniLM-L6-v2 on the bundled data, evaluate it
# against the teacher on held-out splits, save it with its card, print the report.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
HF_HUB_OFFLINE=1 retrieval-head main "$@"
