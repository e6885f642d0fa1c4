"""A ComfyUI Flux MODEL whose weights are an arenahost model's, mapped zero-copy.

:func:`load_model` asks the host for every descriptor of a loaded model
(``GET /v1/models/{name}/tensors``) and hands ComfyUI's own
``comfy.sd.load_diffusion_model_state_dict`` a state dict in which

* plain tensors (biases, norm scales) are zero-copy torch views of the arena;
* each 4-bit weight is a ``meta`` tensor of its logical shape, so ComfyUI's
  model detection sees the real layer sizes without any bytes.

ComfyUI builds its Flux model with ``custom_operations`` whose ``Linear``
binds, while ComfyUI loads the state dict, to the arena weight of that name:
an :class:`arenahost.torch.ArenaNF4Linear` that dequantizes the arena's NF4
bytes (bit-exact with bitsandbytes) per forward, or once when
``cache_weights``, and adds the LoRA side factors the host binds
(``x·A_catᵀ·B_catᵀ``). One :class:`~arenahost.torch.FactorWatcher` polls the
host once per model call, so rebinding (strength change) and removal take
effect from the next step without reloading anything.
"""

from __future__ import annotations

import threading

import torch

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.torch import ArenaNF4Linear, FactorWatcher, as_tensor

from .client import ArenahostError, HostHTTP

__all__ = ["ArenaSession", "load_model", "PREFIXES"]

# Checkpoint prefixes ComfyUI strips (a full checkpoint's UNet prefix).
PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_LOGICAL = {pb.DTYPE_BF16: torch.bfloat16, pb.DTYPE_F16: torch.float16, pb.DTYPE_F32: torch.float32}


class ArenaSession:
    """One ComfyUI model over one host model: the host client, the watcher and the LoRA set it wants.

    Shared by every clone of the MODEL (ComfyUI clones patchers, not modules).
    ``lock`` serializes reconciling the host's LoRA state with what a graph asks.
    """

    def __init__(self, host: HostHTTP, model: str, path: str, watcher: FactorWatcher, cache_weights: bool):
        self.host = host
        self.model = model
        self.path = path  # models-dir path to load again when the host lost the model (restarted)
        self.watcher = watcher
        self.cache_weights = cache_weights
        self.linears: dict[str, object] = {}  # arena weight name -> ArenaNF4Linear
        self.lock = threading.Lock()
        self.applied = None  # (mode, loras) this process last saw on the host

    def invalidate(self) -> None:
        """Forget cached dequantized weights (fused bytes changed in place)."""
        for lin in self.linears.values():
            lin._wsig = None
            lin._epoch = -1


def _strip(name: str) -> tuple[str, str]:
    for p in PREFIXES:
        if name.startswith(p):
            return p, name[len(p):]
    return "", name


def arena_operations(base, session: ArenaSession, quantized: dict[str, pb.TensorDescriptor], biases: set[str]):
    """ComfyUI operations (``base`` = comfy.ops.manual_cast) whose Linear binds to arena weights."""

    class Linear(torch.nn.Module):
        """comfy.ops Linear over the arena: 4-bit weights through ArenaNF4Linear, plain ones as zero-copy views."""

        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            super().__init__()
            self.in_features, self.out_features = int(in_features), int(out_features)
            self.has_bias = bool(bias)
            self.arena = None
            self.weight = None
            self.bias = None

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
            wkey = prefix + "weight"
            d = quantized.get(wkey)
            if d is not None:
                bname = d.name[: -len("weight")] + "bias"
                shape = list(d.quant.shape)
                if shape != [self.out_features, self.in_features]:
                    error_msgs.append(f"arena weight {d.name!r}: shape {shape}, ComfyUI's layer is [{self.out_features}, {self.in_features}]")
                    return
                lin = ArenaNF4Linear(session.watcher, d.name, bname if bname in biases else None, self.in_features,
                                     self.out_features, cache_weight=session.cache_weights)
                self.arena = lin
                session.linears[d.name] = lin
                if self.has_bias and bname not in biases:
                    missing_keys.append(prefix + "bias")
                return
            w = state_dict.get(wkey)
            if w is None:
                missing_keys.append(wkey)
                return
            self.weight = torch.nn.Parameter(w, requires_grad=False)
            b = state_dict.get(prefix + "bias")
            if b is not None:
                self.bias = torch.nn.Parameter(b, requires_grad=False)

        def forward(self, x):
            if self.arena is not None:
                if x.device.type == "cpu":
                    return self.arena(x)
                # ComfyUI on a GPU over a CPU arena: dequantize here, upload per forward.
                F, lin, dt = torch.nn.functional, self.arena, x.dtype
                w = lin.dequantized_weight().to(x.device, dt)
                y = F.linear(x, w, None if lin._b is None else lin._b.to(x.device, dt))
                f = lin.factors()
                if f is not None and f[0].shape[0]:
                    y = y + F.linear(F.linear(x, f[0].to(x.device, dt)), f[1].to(x.device, dt))
                return y
            return torch.nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    class ops(base):
        pass

    ops.Linear = Linear
    return ops


def load_model(host: HostHTTP, model: str, path: str = "", *, cache_weights: bool = False):
    """A ComfyUI ModelPatcher over the host's model (Flux, BFL layout, NF4 linears)."""
    import comfy.ops
    import comfy.sd

    resp = host.lookup_tensors(model=model)
    if not resp.tensors:
        raise ArenahostError(f"model {model!r}", 404, "not_found", "the host answered no tensors for it")
    watcher = FactorWatcher(host, model=model, mapper=host.mapper)
    session = ArenaSession(host, model, path, watcher, cache_weights)
    sd, quantized, biases = {}, {}, set()
    for d in resp.tensors:
        prefix, key = _strip(d.name)
        if d.HasField("quant"):
            logical = _LOGICAL.get(d.quant.dtype)
            if logical is None:
                raise ArenahostError(f"model {model!r}", 0, "unsupported",
                                     f"tensor {d.name!r}: 4-bit weight of logical dtype {pb.DType.Name(d.quant.dtype)}")
            sd[key] = torch.empty([int(s) for s in d.quant.shape], dtype=logical, device="meta")
            quantized[key] = d
        else:
            sd[key] = as_tensor(d, host.mapper, writable=False)
            biases.add(d.name)
    ops = arena_operations(comfy.ops.manual_cast, session, quantized, biases)
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops}, disable_dynamic=True)
    if patcher is None:
        raise ArenahostError(f"model {model!r}", 0, "unsupported",
                             "ComfyUI does not recognize its layout (the pack builds Flux models in BFL layout)")
    missing = [k for k in quantized if quantized[k].name not in session.linears]
    if missing:
        raise ArenahostError(f"model {model!r}", 0, "unsupported",
                             f"ComfyUI's model has no Linear layer for arena weights {missing[:5]}")
    watcher.poll()
    return patcher, session
