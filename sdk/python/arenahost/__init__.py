"""arenahost: Python SDK for arenahost plugins and pipelines.

Core (grpcio, protobuf, numpy, msgpack only):

* :mod:`arenahost.server`: ``Plugin``, ``Call``, ``Result``, ``serve``: go-plugin's side of the handshake
  and the Plugin service;
* :mod:`arenahost.host`: ``HostClient``: the Host service (allocate, free, lookup_tensors, publish, log);
* :mod:`arenahost.tensor`: ``map_descriptor``: zero-copy NumPy views over arena descriptors;
* :mod:`arenahost.nf4`: ``dequantize_nf4``: bitsandbytes 4-bit dequantization, bit-exact;
* :mod:`arenahost.side`: ``linear_forward``, ``ArenaLinear``: the side-mode LoRA forward.

``arenahost.torch`` holds the optional torch helpers; it is imported only on demand.
"""

from arenahost.host import HostClient, HostError
from arenahost.nf4 import dequantize_nf4
from arenahost.server import Call, InvalidArgument, Plugin, PluginError, Result, serve
from arenahost.side import ArenaLinear, linear_forward
from arenahost.tensor import DescriptorError, Mapper, bf16_to_f32, f32_to_bf16, map_descriptor

__version__ = "0.1.0"

__all__ = [
    "ArenaLinear",
    "Call",
    "DescriptorError",
    "HostClient",
    "HostError",
    "InvalidArgument",
    "Mapper",
    "Plugin",
    "PluginError",
    "Result",
    "bf16_to_f32",
    "dequantize_nf4",
    "f32_to_bf16",
    "linear_forward",
    "map_descriptor",
    "serve",
]
