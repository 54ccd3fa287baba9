#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite on the CPU. Triton kernels run through
# the Triton interpreter; a separate step compiles every Triton kernel for sm_80 and sm_90.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VPY="${DVAE_VENV:-.venv}/bin/python"
export TRITON_INTERPRET=1
"$VPY" -m ruff check .
"$VPY" -m pytest -n 2 -q "$@"
