#!/usr/bin/env bash
# Sets up a virtual environment in .venv with torch and this project (editable, with the
# C++/CUDA extensions when a compiler is there). Safe to run again: it only installs what is
# missing. Torch must be installed before the project because the project is installed
# without build isolation (a second 5.5 GB torch in a temporary build environment would
# cost minutes and could mismatch the ABI the extensions are built against).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${DVAE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

# torch: keep what is there if it is recent enough (the GPU image's 2.11 included);
# otherwise install the release this project is pinned to on x86-64 Linux.
if ! "$VPY" - <<'PY' >/dev/null 2>&1
import torch, torchvision  # noqa: F401
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
raise SystemExit(0 if (major, minor) >= (2, 6) else 1)
PY
then
    echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
    "$VPY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi

# .[train,test]: the training module's dependencies and the test tools. The kernels alone need
# only the base dependencies (pip install dvae).
echo "[setup] installing dvae[train,test] (editable, no build isolation)"
"$VPY" -m pip install -q --no-build-isolation -e ".[train,test]"
"$VPY" -c "import dvae_kernels; print('[setup] dvae_kernels', dvae_kernels.__version__, 'ok')"
