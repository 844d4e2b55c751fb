#!/usr/bin/env bash
# Create .venv and install boneage-keras with every backend and extra, and its test
# tools (pip install -e ".[all,dev]"): the tests train on torch, JAX and TensorFlow.
# torch is installed first on its own: where a CPU wheel of torch 2.13.0 lies on
# local disk (pip's find-links), pip takes it instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q torch
.venv/bin/python -m pip install -q -e ".[all,dev]"
