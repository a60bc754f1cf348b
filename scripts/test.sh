#!/usr/bin/env bash
# The test command: prepares what the parity and runtime tests need, then runs pytest.
# - the oracle venv (MediaPipe 0.10.21) for tests/test_oracle.py;
# - Debian's chromium (its SwiftShader Vulkan driver) and libvulkan1 for LiteRT-LM's GPU backend;
# - @mediapipe/tasks-genai from npm (scripts/setup_web.sh; node/npm from apt) for the web runtime
#   tests, which drive that chromium headless with WebGPU on SwiftShader.
# With these present the tests are required to run (REQUIRE_ORACLE / REQUIRE_RUNTIME / REQUIRE_WEB),
# not skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_oracle.sh >/dev/null
if [ ! -e /usr/lib/chromium/vk_swiftshader_icd.json ] || ! ldconfig -p | grep -q libvulkan.so.1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libvulkan1 >/dev/null
  else
    echo "note: no SwiftShader Vulkan (apt-get install chromium libvulkan1); LiteRT-LM runtime tests will skip" >&2
  fi
fi
runtime=""
[ -e /usr/lib/chromium/vk_swiftshader_icd.json ] && runtime=1
web=""
if [ -x /usr/lib/chromium/chromium ]; then
  web=1  # a failed npm install then fails the web tests instead of skipping them
  bash scripts/setup_web.sh >/dev/null || echo "note: scripts/setup_web.sh failed; the web runtime tests will fail" >&2
fi
REQUIRE_ORACLE=1 REQUIRE_RUNTIME="$runtime" REQUIRE_WEB="$web" exec .venv/bin/python -m pytest -q "$@"
