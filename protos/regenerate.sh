#!/usr/bin/env bash
# Regenerate the stubs. grpcio-tools 1.84.0 keeps them importable under grpcio 1.84 (the GPU
# host) and every newer grpcio.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/inference.proto
