#!/usr/bin/env bash
# Sets up (if needed) and runs the main job: `dvae train` on its default preset (scikit-learn's
# bundled 8x8 digits, real data that ships with a dependency), a few minutes on 2 CPU cores.
# It writes the checkpoint, metrics.jsonl, TensorBoard scalars and a reconstruction grid PNG
# under runs/digits/. Extra arguments go to `dvae train` (e.g. steps=200).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${DVAE_VENV:-.venv}"
"$VENV/bin/python" -m dvae_kernels.info
"$VENV/bin/dvae" train "$@"
