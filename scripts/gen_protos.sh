#!/usr/bin/env bash
# Regenerate converter/proto/*_pb2.py from the .proto files (needs grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. converter/proto/*.proto
