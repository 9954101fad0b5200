#!/usr/bin/env bash
# The main job: set up, then train (or load) a small CNN on Fashion-MNIST and forget a class.
# Arguments go to `python -m deepunlearn.experiments.demo` (e.g. --forget-class 3; --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m deepunlearn.experiments.demo "$@"
