#!/usr/bin/env bash
# Regenerates the Python stubs for go-plugin's own services, which every
# non-Go go-plugin plugin serves next to its own:
#   grpc_controller.proto, grpc_stdio.proto  copied verbatim from
#     github.com/hashicorp/go-plugin@v1.8.0 internal/plugin/ (package `plugin`)
#   health.proto  the standard grpc.health.v1 service
# The proto packages must stay `plugin` and `grpc.health.v1`: go-plugin's host
# calls /plugin.GRPCController/Shutdown, /plugin.GRPCStdio/StreamStdio and
# /grpc.health.v1.Health/Check by those full names.
#
# Usage (from the repository root): sdk/python/arenahost/_goplugin/regen.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../../../.." && pwd)
py=${PY:-$root/.venv/bin/python}
cd "$root/sdk/python"
"$py" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  arenahost/_goplugin/grpc_controller.proto \
  arenahost/_goplugin/grpc_stdio.proto \
  arenahost/_goplugin/health.proto
