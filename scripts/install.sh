#!/usr/bin/env bash
# Installs what the project needs into the current Python environment.
# torch first and pinned: on this project's machines torch==2.13.0 is a local CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build. Set TORCH_SPEC to choose another build (e.g. TORCH_SPEC=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$PY" -m pip install -q -r requirements.txt
