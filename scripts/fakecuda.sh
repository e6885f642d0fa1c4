#!/usr/bin/env bash
# fakecuda.sh: build the stand-in driver library (shared/gpu/kernels/emu/
# fakecuda.cc, kernels.cu run by the CPU emulator) as DIR/libcuda.so.1 and
# print DIR. Run a binary built with -tags cuda against it on a machine
# without a GPU:
#
#   LD_LIBRARY_PATH=$(bash scripts/fakecuda.sh) bin/cuda/arenahost-gpucheck ...
#
# It also builds DIR/fakecuda_test, which checks that the stand-in refuses
# what the driver refuses (no context on the thread, ranges outside an
# allocation, opening one's own IPC handle, PTX that disagrees with
# kernels.cu). Needs g++ (C++20) and the CUDA headers that scripts/cuda-env.sh installs.
# Functions of cuda.h that fakecuda.cc does not define are generated to
# return CUDA_ERROR_NOT_SUPPORTED. Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/cuda-env.sh)"
src=shared/gpu/kernels/emu
out=${FAKECUDA_DIR:-$(pwd)/.cache/fakecuda}
lib=$out/libcuda.so.1
cxx=${CXX:-g++}
cc=${CC:-gcc}
newest=$(ls -t "$src"/fakecuda.cc "$src"/fakecuda_test.c "$src"/emu.h "$src"/emu_run.h "$src"/kernels_table.h shared/gpu/kernels/kernels.cu "$CUDA_INCLUDE/cuda.h" "$0" | head -1)
if [ ! -f "$lib" ] || [ "$newest" -nt "$lib" ]; then
  echo "fakecuda: building $lib" >&2
  mkdir -p "$out"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$cxx" -std=c++20 -O2 -fPIC -pthread -ffp-contract=off -I"$CUDA_INCLUDE" -c -o "$tmp/fakecuda.o" "$src/fakecuda.cc"
  nm --defined-only "$tmp/fakecuda.o" | awk '$2 == "T" && $3 ~ /^cu/ {print $3}' | sort -u >"$tmp/defined"
  "$cc" -E -P -I"$CUDA_INCLUDE" -D__CUDA_API_VERSION_INTERNAL=0 -x c - <<<'#include <cuda.h>' 2>/dev/null |
    grep -oE '\bcu[A-Za-z0-9_]+[[:space:]]*\(' | sed -E 's/[[:space:]]*\($//' | sort -u |
    comm -23 - "$tmp/defined" |
    awk '{printf "int %s(void) { return 801; /* CUDA_ERROR_NOT_SUPPORTED */ }\n", $1}' >"$tmp/defaults.c"
  "$cc" -O1 -fPIC -c -o "$tmp/defaults.o" "$tmp/defaults.c"
  "$cxx" -shared -pthread -Wl,-soname,libcuda.so.1 -o "$lib.tmp" "$tmp/fakecuda.o" "$tmp/defaults.o"
  mv "$lib.tmp" "$lib"
  "$cc" -I"$CUDA_INCLUDE" -pthread -o "$out/fakecuda_test" "$src/fakecuda_test.c" -L"$out" -l:libcuda.so.1
  echo "fakecuda: $(wc -l <"$tmp/defined") driver functions emulated, $(wc -l <"$tmp/defaults.c") return CUDA_ERROR_NOT_SUPPORTED" >&2
fi
echo "$out"
