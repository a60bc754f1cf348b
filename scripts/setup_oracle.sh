#!/usr/bin/env bash
# Create the oracle venv: MediaPipe 0.10.21's converter and bundler (numpy 1.26, protobuf 4),
# kept apart from the project's own environment. Prints the venv's python path.
set -euo pipefail
venv="${ORACLE_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.oracle-venv}"
if ! "$venv/bin/python" -c "from mediapipe.tasks.python.genai.converter import llm_converter" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q "mediapipe==0.10.21" "torch==2.13.0" "jax<0.5" "jaxlib<0.5" safetensors >&2
fi
echo "$venv/bin/python"
