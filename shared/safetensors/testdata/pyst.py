"""Oracle for the Go safetensors tests, run with the pinned .venv interpreter.

  pyst.py JOBS.json   run each job and print a JSON list with one result each:
    {"op": "write", "spec": {...}, "out": PATH}  write the tensors the spec describes
        with the Python safetensors package (numpy API or raw TensorSpec); result null
    {"op": "read", "path": PATH}  result: what the Python package reads from PATH
        (metadata, and dtype/shape/sha256 per tensor), or {"error": message}
"""
import hashlib
import json
import sys

import numpy as np
import safetensors
import safetensors.numpy

NUMPY = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
SPEC_NAMES = {
    "BOOL": "bool", "I8": "int8", "U8": "uint8", "I16": "int16", "U16": "uint16",
    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64",
    "F16": "float16", "F32": "float32", "F64": "float64", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}


def write(spec, out):
    meta = spec["metadata"]
    if spec["api"] == "numpy":
        arrays = {}
        for t in spec["tensors"]:
            raw = bytes.fromhex(t["data"])
            arrays[t["name"]] = np.frombuffer(raw, dtype=NUMPY[t["dtype"]]).reshape(t["shape"])
        safetensors.numpy.save_file(arrays, out, metadata=meta)
        return
    keep = []
    specs = {}
    for t in spec["tensors"]:
        buf = np.frombuffer(bytes.fromhex(t["data"]) or b"\0", dtype=np.uint8).copy()
        keep.append(buf)
        specs[t["name"]] = safetensors.TensorSpec(
            dtype=SPEC_NAMES[t["dtype"]], shape=t["shape"],
            data_ptr=buf.ctypes.data, data_len=len(t["data"]) // 2)
    safetensors.serialize_file(specs, out, metadata=meta)


def read(path):
    with open(path, "rb") as f:
        raw = f.read()
    out = {}
    for name, t in safetensors.deserialize(raw):
        out[name] = {"dtype": t["dtype"], "shape": list(t["shape"]),
                     "sha256": hashlib.sha256(bytes(t["data"])).hexdigest()}
    with safetensors.safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    return {"metadata": meta, "tensors": out}


def run(job):
    if job["op"] == "write":
        return write(job["spec"], job["out"])
    try:
        return read(job["path"])
    except Exception as e:  # the Go test asserts on the message
        return {"error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    print(json.dumps([run(j) for j in jobs]))
