"""hello-py: the smallest useful arenahost plugin in Python (mirrors sdk/examples/hello).

It reads an input tensor in place (no bytes cross the socket), and writes its
result into a region it allocates through the host, returning that region's
descriptor. The host starts it from plugin.json next to this file.
"""

import numpy as np

from arenahost import InvalidArgument, Plugin, Result
from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.server import get_arg

plugin = Plugin("hello-py", "0.1.0", kind="other", metadata={"language": "python"})


@plugin.method(description="statistics of tensor 0, read zero-copy")
def stats(call, args):
    x = call.array(0)  # a read-only view over the host's shared memory
    return {"name": call.tensor(0).name, "count": int(x.size), "sum": float(x.sum(dtype=np.float64)),
            "min": float(x.min()), "max": float(x.max())}


@plugin.method(description="y = a*x + b into a new host region; returns its descriptor")
def affine(call, args):
    a = get_arg(args, "a", float, 1.0)
    b = get_arg(args, "b", float, 0.0)
    d = call.tensor(0)
    if d.dtype != pb.DTYPE_F32:
        raise InvalidArgument(f"tensor {d.name!r}: want DTYPE_F32")
    x = call.array(0)
    out_desc, y = call.host.allocate_array(d.name + ".affine", np.float32, x.shape)
    np.multiply(x, np.float32(a), out=y)
    y += np.float32(b)
    call.host.log("info", "affine done", tensor=d.name, count=x.size)
    return Result({"count": int(x.size)}, [out_desc])


@plugin.method(description="multiply a read-write tensor in place by args.factor")
def scale(call, args):
    x = call.array(0, writable=True)  # fails clearly if the descriptor is read-only
    x *= np.float32(get_arg(args, "factor", float))
    return {"count": int(x.size)}


if __name__ == "__main__":
    plugin.serve()
