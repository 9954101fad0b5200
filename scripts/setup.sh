#!/usr/bin/env bash
# Install everything deepunlearn needs on a fresh machine of this project's kind (idempotent):
# torch 2.14.1 / torchvision 0.29.1 from the local disk, Debian's Fashion-MNIST package, the
# Python dependencies, and the package itself with its extension built against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! $PY - <<'PYEOF' 2>/dev/null
import sys, torch, torchvision
major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if major_minor >= (2, 11) and torchvision.__version__ else 1)
PYEOF
then
  echo "== installing torch 2.14.1 and torchvision 0.29.1 (local disk)"
  $PY -m pip install -q torch==2.14.1 torchvision==0.29.1
fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "== installing Debian's dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

echo "== installing Python dependencies"
$PY -m pip install -q -r requirements.txt

echo "== building deepunlearn (pip install --no-build-isolation -e .)"
if [ -d /usr/local/cuda ] && [ -z "${CUDA_HOME:-}" ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
$PY -m pip install -q --no-build-isolation --no-deps -e .
$PY -c "import deepunlearn, json; print('deepunlearn', deepunlearn.__version__, json.dumps(deepunlearn.extension_info()))"
