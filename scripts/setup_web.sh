#!/usr/bin/env bash
# Install the real MediaPipe web runtime for harness/web_runtime.py: @mediapipe/tasks-genai
# (pinned) from npm into .web/ (gitignored). Installs node/npm with apt when missing and root.
# Prints the package folder. Chromium itself: apt-get install chromium (scripts/test.sh does it).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.10.29
PACKAGE=.web/node_modules/@mediapipe/tasks-genai
if [ -f "$PACKAGE/package.json" ] && grep -q "\"version\": \"$VERSION\"" "$PACKAGE/package.json"; then
  echo "$PACKAGE"
  exit 0
fi
if ! command -v npm >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  else
    echo "error: npm not found (apt-get install nodejs npm)" >&2
    exit 1
  fi
fi
mkdir -p .web
npm install --prefix .web --no-save --no-audit --no-fund --loglevel=error "@mediapipe/tasks-genai@$VERSION" >&2
echo "$PACKAGE"
