#!/usr/bin/env bash
# Go vs bitsandbytes (CPU, torch) NF4 throughput on the same data, in one
# run. Usage: shared/nf4/testdata/bench_compare.sh [TORCH_PYTHON]
# (default: $ARENAHOST_TORCH_PYTHON, else .venv-torch/bin/python).
# ARENAHOST_NF4_BENCH_ELEMS sets the element count (default 64 Mi).
set -euo pipefail
cd "$(dirname "$0")/../../.."
py="${1:-${ARENAHOST_TORCH_PYTHON:-.venv-torch/bin/python}}"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
go test -run '^$' -bench '^Benchmark(Quantize|QuantizeNested|Dequantize)$' -benchtime 3x ./shared/nf4 | tee "$out"
"$py" shared/nf4/testdata/bench_bnb.py --go "$out"
