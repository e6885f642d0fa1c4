"""The conformance.* methods sdk/plugintest calls on every SDK-built plugin.

They exercise the SDK's plumbing, not the plugin's own work: msgpack round
trips, zero-copy reads and in-place writes of descriptors, allocation through
the Host service, streaming, and error codes. :class:`arenahost.Plugin`
registers them unless built with ``conformance=False``. The contract is in
sdk/plugintest/README.md.
"""

from __future__ import annotations

import grpc
import numpy as np

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.server import InvalidArgument, Plugin, PluginError, Result, get_arg
from arenahost.tensor import dtype_name

__all__ = ["register", "METHODS"]

# Bounds on element and message counts (sdk/plugintest/README.md).
MAX_COUNT = 1 << 26
MAX_STREAM = 10000

METHODS = ("conformance.echo", "conformance.sum", "conformance.scale", "conformance.fill", "conformance.stream", "conformance.fail")

_CODES = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "internal": grpc.StatusCode.INTERNAL,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
}


def _f32(call, i: int) -> pb.TensorDescriptor:
    d = call.tensor(i)
    if d.dtype != pb.DTYPE_F32:
        raise InvalidArgument(f"tensor {d.name!r}: dtype {dtype_name(d.dtype)}, want DTYPE_F32")
    return d


def register(p: Plugin) -> None:
    @p.method("conformance.echo", description="return args.payload unchanged")
    def echo(call, args):
        return {"payload": get_arg(args, "payload", object)}

    @p.method("conformance.sum", description="sum of an F32 tensor, read in place")
    def sum_(call, args):
        _f32(call, 0)
        x = call.array(0, writable=False)
        return {"sum": float(x.sum(dtype=np.float64)), "count": int(x.size)}

    @p.method("conformance.scale", description="multiply a read-write F32 tensor in place by args.factor")
    def scale(call, args):
        factor = get_arg(args, "factor", float)
        d = _f32(call, 0)
        if d.access != pb.ACCESS_READ_WRITE:
            raise InvalidArgument(f"tensor {d.name!r}: read-only, cannot scale in place")
        x = call.array(0, writable=True)
        np.multiply(x, np.float32(factor), out=x)
        return {"count": int(x.size)}

    @p.method("conformance.fill", description="allocate F32[count] through the host and fill it with start + i*step")
    def fill(call, args):
        name = get_arg(args, "name", str)
        count = get_arg(args, "count", int)
        start = get_arg(args, "start", float, 0.0)
        step = get_arg(args, "step", float, 1.0)
        if not 0 < count <= MAX_COUNT:
            raise InvalidArgument(f"args.count: {count} must be in 1..{MAX_COUNT}")
        desc, x = call.host.allocate_array(name, np.float32, [count])
        x[:] = (start + np.arange(count, dtype=np.float64) * step).astype(np.float32)
        return Result({"count": count}, [desc])

    @p.method("conformance.stream", description="stream {index} for index in 0..args.count-1", streaming=True)
    def stream(call, args):
        count = get_arg(args, "count", int)
        if not 0 <= count <= MAX_STREAM:
            raise InvalidArgument(f"args.count: {count} must be in 0..{MAX_STREAM}")
        for i in range(count):
            yield {"index": i}

    @p.method("conformance.fail", description="fail with args.code and args.message")
    def fail(call, args):
        code = get_arg(args, "code", str)
        msg = get_arg(args, "message", str)
        if code not in _CODES:
            raise InvalidArgument(f"args.code: {code!r} is not one of {sorted(_CODES)}")
        raise PluginError(msg, _CODES[code])
