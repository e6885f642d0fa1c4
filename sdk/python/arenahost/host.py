"""Client for the Host service, which the host serves to each plugin generation.

Python plugins reach it at the address in ``ARENAHOST_HOST_ADDR``
(``unix:///path`` or ``127.0.0.1:PORT``) and identify their generation with
the token in ``ARENAHOST_HOST_TOKEN``, sent on every call as the gRPC
metadata ``arenahost-host-token``. Regions a plugin allocates are leased to
its generation and reclaimed by the host when that generation dies.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import grpc
import msgpack
import numpy as np

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.plugin.v1 import plugin_pb2_grpc as pbg
from arenahost.tensor import Mapper, default_mapper, dtype_enum

__all__ = ["HostClient", "HostError", "ENV_HOST_ADDR", "ENV_HOST_TOKEN", "METADATA_TOKEN", "pack"]

ENV_HOST_ADDR = "ARENAHOST_HOST_ADDR"
ENV_HOST_TOKEN = "ARENAHOST_HOST_TOKEN"
METADATA_TOKEN = "arenahost-host-token"

# Messages carry descriptors, not bytes; the limit only guards against bugs.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


class HostError(RuntimeError):
    """A Host service call failed; carries the gRPC status code."""

    def __init__(self, method: str, code: grpc.StatusCode | None, details: str):
        self.method = method
        self.code = code
        self.details = details
        name = code.name if code is not None else "UNKNOWN"
        super().__init__(f"host {method}: {name}: {details}")


def _np_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot msgpack-encode {type(o).__name__}")


def pack(obj: Any) -> bytes:
    """msgpack-encode obj (NumPy scalars and small arrays become plain values)."""
    return msgpack.packb(obj, use_bin_type=True, default=_np_default)


class HostClient:
    """Allocate/free arena regions, look up tensors, publish and log through the host."""

    def __init__(self, addr: str, token: str = "", *, timeout: float = 30.0, mapper: Mapper | None = None):
        if not addr:
            raise ValueError(f"host address is empty (is {ENV_HOST_ADDR} set?)")
        self.addr = addr
        self.timeout = timeout
        self.mapper = mapper if mapper is not None else default_mapper()
        self._md = ((METADATA_TOKEN, token),) if token else ()
        self._channel = grpc.insecure_channel(addr, options=_CHANNEL_OPTIONS)
        self._stub = pbg.HostStub(self._channel)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kw) -> "HostClient":
        """Connect to ARENAHOST_HOST_ADDR with ARENAHOST_HOST_TOKEN."""
        env = os.environ if environ is None else environ
        addr = env.get(ENV_HOST_ADDR, "")
        if not addr:
            raise HostError("connect", None, f"{ENV_HOST_ADDR} is not set: the host offered no Host service")
        return cls(addr, env.get(ENV_HOST_TOKEN, ""), **kw)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "HostClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, fn, req):
        try:
            return fn(req, timeout=self.timeout, metadata=self._md)
        except grpc.RpcError as e:
            raise HostError(method, e.code(), e.details() or str(e)) from None

    # --- arena -----------------------------------------------------------

    def allocate(self, name: str, dtype: int, shape: Sequence[int] = (), nbytes: int = 0) -> pb.TensorDescriptor:
        """Allocate a read-write region leased to this plugin generation."""
        resp = self._call(
            "Allocate",
            self._stub.Allocate,
            pb.AllocateRequest(name=name, dtype=dtype, shape=[int(d) for d in shape], nbytes=int(nbytes)),
        )
        return resp.tensor

    def allocate_array(self, name: str, dtype, shape: Sequence[int], *, wire_dtype: int | None = None):
        """Allocate and map a region: returns (descriptor, writable ndarray view)."""
        wd = dtype_enum(dtype) if wire_dtype is None else wire_dtype
        desc = self.allocate(name, wd, shape)
        return desc, self.mapper.map(desc, writable=True)

    def free(self, *items: pb.TensorDescriptor | pb.Region) -> None:
        """Free regions (given as descriptors or regions) this generation allocated."""
        regions = [it.region if isinstance(it, pb.TensorDescriptor) else it for it in items]
        if regions:
            self._call("Free", self._stub.Free, pb.FreeRequest(regions=regions))

    # --- registry --------------------------------------------------------

    def lookup_tensors(
        self,
        model: str = "",
        names: Iterable[str] = (),
        prefix: str = "",
        include_factors: bool = False,
    ) -> pb.LookupTensorsResponse:
        """Tensors of a model by exact names or prefix (and their bound side factors)."""
        return self._call(
            "LookupTensors",
            self._stub.LookupTensors,
            pb.LookupTensorsRequest(model=model, names=list(names), prefix=prefix, include_factors=include_factors),
        )

    # --- events and logs -------------------------------------------------

    def publish(
        self,
        job_id: str,
        topic: str,
        step: int = 0,
        total: int = 0,
        payload: Any = None,
        tensors: Sequence[pb.TensorDescriptor] = (),
    ) -> bool:
        """Publish an event (topic "latent", "progress", "frame", "event"); payload is msgpack-encoded."""
        resp = self._call(
            "Publish",
            self._stub.Publish,
            pb.PublishRequest(
                job_id=job_id,
                topic=topic,
                step=int(step),
                total=int(total),
                payload=b"" if payload is None else pack(payload),
                tensors=list(tensors),
            ),
        )
        return resp.accepted

    def log(self, level: str, message: str, **attrs: Any) -> None:
        """Log through the host under this plugin's name (level: debug, info, warn, error)."""
        self._call(
            "Log",
            self._stub.Log,
            pb.LogRequest(level=level, message=message, attrs={k: str(v) for k, v in attrs.items()}),
        )
