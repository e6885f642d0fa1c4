"""Compile kernels.cu to kernels.ptx for compute_80 with NVRTC (make ptx).

Usage: python build_ptx.py LIBNVRTC [kernels.cu] [kernels.ptx]

The PyPI nvcc wheel ships no nvcc driver, so the CUDA C++ source goes
through NVRTC (nvidia-cuda-nvrtc-cu12), loaded with ctypes: no GPU, no
driver and no CUDA toolkit needed. Options: compute_80 (JIT-compiled by any
newer driver), -fmad=false (the kernels round every product and sum as the
CPU codec does), no fast math.
"""
import ctypes
import os
import sys

OPTIONS = [b"--gpu-architecture=compute_80", b"--fmad=false", b"--std=c++17", b"-default-device"]


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    lib = ctypes.CDLL(argv[1])
    here = os.path.dirname(os.path.abspath(__file__))
    src_path = argv[2] if len(argv) > 2 else os.path.join(here, "kernels.cu")
    out_path = argv[3] if len(argv) > 3 else os.path.join(here, "kernels.ptx")
    with open(src_path, "rb") as f:
        src = f.read()
    prog = ctypes.c_void_p()
    check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(src_path).encode(), 0, None, None), "create program")
    opts = (ctypes.c_char_p * len(OPTIONS))(*OPTIONS)
    rc = lib.nvrtcCompileProgram(prog, len(OPTIONS), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    if text:
        print(text, file=sys.stderr)
    check(lib, rc, "compile " + src_path)
    check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "ptx size")
    ptx = ctypes.create_string_buffer(size.value)
    check(lib, lib.nvrtcGetPTX(prog, ptx), "get ptx")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(ptx.value)
    os.replace(tmp, out_path)
    print(f"wrote {out_path} ({len(ptx.value)} bytes)", file=sys.stderr)
    return 0


def check(lib, rc, what):
    if rc != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise SystemExit(f"nvrtc: {what}: {lib.nvrtcGetErrorString(rc).decode()} ({rc})")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
