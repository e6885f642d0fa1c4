#!/usr/bin/env bash
# cuda-env.sh: make the CUDA 12 build environment for the cuda variant
# (go build/vet -tags cuda) and for `make ptx`, without a GPU or a driver.
#
# It creates .venv-cuda (or $CUDA_VENV) from python/requirements-cuda.txt
# (NVRTC, ptxas and the CUDA headers from PyPI wheels), builds a link-time stub
# libcuda.so from the cuda.h in those wheels (the wheels ship no driver
# stub; the real libcuda.so.1 comes with the NVIDIA driver at run time),
# and prints the exports to evaluate:
#
#   eval "$(bash scripts/cuda-env.sh)"
#   go vet -tags cuda ./... && go build -tags cuda ./...
#
# By default only the headers wheel is installed (a few MB: enough for the
# cgo compile check and the build). With --ptx it also installs NVRTC and
# ptxas (about 300 MB) and exports CUDA_NVRTC and CUDA_PTXAS for `make ptx`.
#
# Progress goes to stderr; stdout carries only the export lines.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${CUDA_VENV:-$root/.venv-cuda}
python=${PYTHON:-python3}
req=python/requirements-cuda.txt
ptx=0
case "${1:-}" in
  --ptx) ptx=1 ;;
  "") ;;
  *) echo "usage: cuda-env.sh [--ptx]" >&2; exit 2 ;;
esac

if [ ! -x "$venv/bin/python" ]; then
  echo "cuda-env: creating $venv" >&2
  "$python" -m venv "$venv"
fi
stamp=$venv/.stamp-runtime
if [ "$ptx" = 1 ]; then stamp=$venv/.stamp-ptx; fi
if [ ! -f "$stamp" ] || [ "$req" -nt "$stamp" ]; then
  if [ "$ptx" = 1 ]; then
    echo "cuda-env: installing $req" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2
  else
    pin=$(grep -E '^nvidia-cuda-runtime-cu12==' "$req")
    echo "cuda-env: installing $pin (from $req)" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$pin" >&2
  fi
  touch "$stamp"
fi

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
nv=$site/nvidia
nvcc_dir=$nv/cuda_nvcc
rt_dir=$nv/cuda_runtime
inc=$rt_dir/include
if [ ! -f "$inc/cuda.h" ]; then
  echo "cuda-env: $inc/cuda.h missing: is nvidia-cuda-runtime-cu12 installed in $venv?" >&2
  exit 1
fi
nvrtc= ptxas=
if [ "$ptx" = 1 ]; then
  nvrtc=$(ls "$nv"/cuda_nvrtc/lib/libnvrtc.so.12 2>/dev/null || true)
  if [ -z "$nvrtc" ]; then
    echo "cuda-env: $nv/cuda_nvrtc/lib/libnvrtc.so.12 missing: is nvidia-cuda-nvrtc-cu12 installed in $venv?" >&2
    exit 1
  fi
  ptxas=$nvcc_dir/bin/ptxas
  if [ ! -x "$ptxas" ]; then
    echo "cuda-env: $ptxas missing: is nvidia-cuda-nvcc-cu12 installed in $venv?" >&2
    exit 1
  fi
fi

# The link stub: every cu* function that cuda.h declares, as an empty
# symbol. It only satisfies the linker; the binary records libcuda.so.1 as
# its dependency and the driver's library is used at run time.
stubdir=$venv/cuda-stub
if [ ! -f "$stubdir/libcuda.so" ] || [ "$inc/cuda.h" -nt "$stubdir/libcuda.so" ]; then
  echo "cuda-env: building link stub $stubdir/libcuda.so" >&2
  mkdir -p "$stubdir"
  cc=${CC:-gcc}
  # Symbol names as the header maps them (cuMemAlloc -> cuMemAlloc_v2, ...):
  # preprocess, then collect every identifier declared as a CUDAAPI function.
  "$cc" -E -P -I"$inc" -D__CUDA_API_VERSION_INTERNAL=0 -x c - <<<'#include <cuda.h>' 2>/dev/null |
    grep -oE '\bcu[A-Za-z0-9_]+[[:space:]]*\(' | sed -E 's/[[:space:]]*\($//' | sort -u |
    awk '{printf "void %s(void) {}\n", $1}' >"$stubdir/stub.c"
  "$cc" -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubdir/libcuda.so" "$stubdir/stub.c"
fi

cat <<OUT
export CUDA_VENV='$venv'
export CUDA_INCLUDE='$inc'
export CGO_CFLAGS='-I$inc'
export CGO_LDFLAGS='-L$stubdir'
OUT
if [ "$ptx" = 1 ]; then
  echo "export CUDA_NVRTC='$nvrtc'"
  echo "export CUDA_PTXAS='$ptxas'"
fi
