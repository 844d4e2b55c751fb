#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has PyTorch, JAX, numpy, h5py, ml-dtypes, rich,
# absl-py, pandas, pillow, scikit-learn, click, pyyaml, matplotlib, onnx(runtime), but
# no keras): keras and its small pure-Python dependencies, for Python 3.12 on x86-64,
# into .whl/ (git-ignored). Then, on that machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/python -m pip}"
KERAS_VERSION="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("keras"))')"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "keras==$KERAS_VERSION" namex optree
ls -la .whl
