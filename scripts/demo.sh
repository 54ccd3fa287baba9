#!/usr/bin/env bash
# Sets up (if needed) and runs the main job: `dvae train` on its default preset (scikit-learn's
# bundled 8x8 digits, real data that ships with a dependency), then the generation step: the
# tokenizer's prior (`dvae prior train`) and a grid of generated digits (`dvae generate`), a few
# minutes in all on 2 CPU cores. It writes the checkpoint, metrics.jsonl, TensorBoard scalars
# and a reconstruction grid under runs/digits/, the prior under runs/digits/prior/ and the
# samples in runs/digits/samples.png. Extra arguments go to `dvae train` (e.g. steps=200,
# out_dir=...); with --config (another preset) the generation step is left out: a prior there
# is its own run (`dvae prior train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${DVAE_VENV:-.venv}"
"$VENV/bin/python" -m dvae_kernels.info
"$VENV/bin/dvae" train "$@"
OUT=runs/digits
for arg in "$@"; do
  case "$arg" in
    out_dir=*) OUT="${arg#out_dir=}" ;;
    --config|--config=*) echo "demo: --config given: the generation step is left out"; exit 0 ;;
  esac
done
"$VENV/bin/dvae" prior train --tokenizer "$OUT/checkpoint.pt"
"$VENV/bin/dvae" generate --prior "$OUT/prior/checkpoint.pt" --labels all --num 8 \
  --out "$OUT/samples.png"
