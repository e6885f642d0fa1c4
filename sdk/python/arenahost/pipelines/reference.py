"""The NumPy reference pipeline: a plugin of kind ``pipeline`` that runs on any CPU.

**It exercises the plumbing; it is not a trained model and produces no
meaningful image.** What it does is real, though: every step pushes a
Flux-shaped latent through linear layers of the model loaded in the host,
using that model's NF4 weights (read from the arena by descriptor and
dequantized bit-exactly by :mod:`arenahost.nf4`) plus any LoRA side factors
bound to those layers (``y = x·Wᵀ + (x·A_catᵀ)·B_catᵀ``, re-read every step so
an apply, strength change or remove shows up in the next step), and publishes
each step's latent through the host.

Method ``run`` (msgpack params; all optional):

=============  ==========================================================
``steps``      denoising steps, 1..1000 (default 8)
``seed``       noise seed (default 0)
``width``      image width in pixels, a multiple of 16 (default 256)
``height``     image height in pixels, a multiple of 16 (default 256)
``model``      registry model name ("" = the host's default model)
``layers``     weight names forming a chain (default: chosen from the model)
``job_id``     id the latents are published under (default: the call id)
``keep``       step latents kept allocated at once (default 2)
=============  ==========================================================

The latent is ``F32 [16, height/8, width/8]`` (FLUX.1's channel-major
layout). Each step it is patchified 2×2 into ``[N, 64]`` tokens, run through
the chain (GELU between layers; fixed seeded projections adapt the chain's
width to 64 when its ends are not 64 wide), normalised into a prediction x̂₀,
and advanced with a flow-matching Euler step on the schedule σ = 1 → 0:
``x ← x + (σₙₑₓₜ − σ)·(x − x̂₀)/σ``. The last step lands on x̂₀.

Chain choice without ``layers``: the model's 4-bit weights, first an
entry/exit pair ``[H, 64]`` → ``[64, H]`` (Flux ``img_in`` and
``final_layer.linear``, or ``x_embedder`` and ``proj_out``) with one square
``[H, H]`` layer between if the model has one; else the cheapest pair
``[H, D]`` → ``[D, H]`` (an MLP's two layers); else the smallest single
weight.

Each step publishes topic ``latent`` with payload
``{"arch": "flux1", "layout": "chw", "sigma", "mean", "std"}`` and the
latent's descriptor (a region allocated through the host, leased to this
plugin). The result is ``{"latent": 0, "shape", "steps", "seed", "model",
"layers", "factors", "stats", "step_ms"}`` with the final latent's
descriptor as output tensor 0; that region stays leased until the next run
or the plugin's exit.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import grpc
import numpy as np

from arenahost.host import HostClient
from arenahost.nf4 import NF4_CODE, dequantize_4bit_arrays, quantize_nf4
from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.server import InvalidArgument, Plugin, PluginError, Result, get_arg
from arenahost.side import ArenaLinear, linear_forward
from arenahost.tensor import Mapper

__all__ = ["plugin", "run", "choose_chain", "patchify", "unpatchify", "Params", "NAME", "VERSION"]

NAME = "reference-pipeline"
VERSION = "0.1.0"
LATENT_CHANNELS = 16
PATCH = 2
TOKEN_DIM = LATENT_CHANNELS * PATCH * PATCH  # 64
ENTRY_NAMES = ("img_in.weight", "x_embedder.weight")
EXIT_NAMES = ("final_layer.linear.weight", "proj_out.weight")


@dataclass
class Params:
    steps: int = 8
    seed: int = 0
    width: int = 256
    height: int = 256
    model: str = ""
    layers: Sequence[str] = ()
    job_id: str = ""
    keep: int = 2

    @classmethod
    def parse(cls, args, call_id: str = "") -> "Params":
        p = cls(
            steps=get_arg(args, "steps", int, 8),
            seed=get_arg(args, "seed", int, 0),
            width=get_arg(args, "width", int, 256),
            height=get_arg(args, "height", int, 256),
            model=get_arg(args, "model", str, ""),
            layers=tuple(get_arg(args, "layers", list, [])),
            job_id=get_arg(args, "job_id", str, "") or call_id,
            keep=get_arg(args, "keep", int, 2),
        )
        if not 1 <= p.steps <= 1000:
            raise InvalidArgument(f"args.steps: {p.steps} must be in 1..1000")
        for f in ("width", "height"):
            v = getattr(p, f)
            if not (16 <= v <= 4096 and v % 16 == 0):
                raise InvalidArgument(f"args.{f}: {v} must be a multiple of 16 in 16..4096")
        if not all(isinstance(n, str) and n for n in p.layers):
            raise InvalidArgument("args.layers: want a list of weight names")
        if not 1 <= p.keep <= 64:
            raise InvalidArgument(f"args.keep: {p.keep} must be in 1..64")
        if not 0 <= p.seed < 2**63:
            raise InvalidArgument(f"args.seed: {p.seed} must be in 0..2^63-1")
        return p


def patchify(x: np.ndarray) -> np.ndarray:
    """[C, H, W] -> [(H/2)(W/2), 4C] tokens, Flux's _pack_latents order (c, dy, dx)."""
    c, h, w = x.shape
    return x.reshape(c, h // 2, 2, w // 2, 2).transpose(1, 3, 0, 2, 4).reshape((h // 2) * (w // 2), c * 4)


def unpatchify(t: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
    """Inverse of patchify."""
    return t.reshape(h // 2, w // 2, c, 2, 2).transpose(2, 0, 3, 1, 4).reshape(c, h, w)


def _logical_shape(d: pb.TensorDescriptor) -> tuple[int, ...]:
    return tuple(d.quant.shape) if d.HasField("quant") else tuple(d.shape)


def choose_chain(weights: dict[str, pb.TensorDescriptor]) -> list[str]:
    """Pick the layers the pipeline runs through (see the module doc)."""
    two_d = {n: _logical_shape(d) for n, d in weights.items() if len(_logical_shape(d)) == 2}
    if not two_d:
        raise ValueError("the model has no 2-D 4-bit weights")

    def by_suffix(names: Sequence[str]) -> list[str]:
        return sorted(n for n in two_d if any(n == s or n.endswith("." + s) for s in names))

    for entry in by_suffix(ENTRY_NAMES):
        hid, inp = two_d[entry]
        if inp != TOKEN_DIM:
            continue
        for exit_ in by_suffix(EXIT_NAMES):
            if two_d[exit_] == (TOKEN_DIM, hid):
                mid = sorted(n for n, s in two_d.items() if s == (hid, hid))
                return [entry, *mid[:1], exit_]
    pairs = []
    names = sorted(two_d)
    for a in names:
        h, d = two_d[a]
        for b in names:
            if b != a and two_d[b] == (d, h):
                pairs.append((h * d, a, b))
    if pairs:
        _, a, b = min(pairs)
        return [a, b]
    return [min(names, key=lambda n: (math.prod(two_d[n]), n))]


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608) * (x + np.float32(0.044715) * x * x * x)))


class _Pipeline:
    """Per-plugin state: cached layers and the last run's final latent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.layers: dict[tuple[str, str], ArenaLinear] = {}
        self.last_final: pb.TensorDescriptor | None = None

    def layer(self, model: str, w: pb.TensorDescriptor, bias: pb.TensorDescriptor | None, mapper: Mapper) -> ArenaLinear:
        key = (model, w.name)
        with self.lock:
            lin = self.layers.get(key)
            if lin is None:
                lin = self.layers[key] = ArenaLinear(w, bias, mapper)
            else:
                lin.set_weight(w, bias)  # re-dequantizes only if the region changed
            return lin


def _lookup_chain(host: HostClient, p: Params) -> tuple[list[str], dict[str, pb.TensorDescriptor], dict[str, pb.TensorDescriptor]]:
    if p.layers:
        resp = host.lookup_tensors(model=p.model, names=list(p.layers))
        weights = {d.name: d for d in resp.tensors}
        chain = list(p.layers)
    else:
        resp = host.lookup_tensors(model=p.model, prefix="")
        weights = {d.name: d for d in resp.tensors if d.HasField("quant")}
        if not weights:
            raise PluginError(
                f"model {p.model or '(default)'!r} has no bitsandbytes 4-bit weights; the reference pipeline runs on NF4 models",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        chain = choose_chain(weights)
    for n in chain:
        if n not in weights:
            raise InvalidArgument(f"args.layers: model {p.model!r} has no tensor {n!r}")
        if len(_logical_shape(weights[n])) != 2:
            raise InvalidArgument(f"args.layers: {n!r} has shape {list(_logical_shape(weights[n]))}, want a 2-D weight")
    for a, b in zip(chain, chain[1:]):
        if _logical_shape(weights[a])[0] != _logical_shape(weights[b])[1]:
            raise InvalidArgument(
                f"args.layers: {a!r} {list(_logical_shape(weights[a]))} does not feed {b!r} {list(_logical_shape(weights[b]))}"
            )
    bias_of = {n: n[: -len(".weight")] + ".bias" for n in chain if n.endswith(".weight")}
    if p.layers:
        # An exact-name lookup fails on a missing name; a prefix lookup gives nothing.
        have = {d.name: d for bn in bias_of.values() for d in host.lookup_tensors(model=p.model, prefix=bn).tensors}
    else:
        have = {d.name: d for d in resp.tensors}
    biases = {n: have[bn] for n, bn in bias_of.items() if bn in have and len(have[bn].shape) == 1}
    return chain, weights, biases


_STATE = _Pipeline()


def run(
    host: HostClient,
    p: Params,
    *,
    mapper: Mapper | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    state: _Pipeline | None = None,
) -> Result:
    """Run one job (see the module doc); the plugin's ``run`` method calls this."""
    st = state if state is not None else _STATE
    m = mapper if mapper is not None else host.mapper
    chain, weights, biases = _lookup_chain(host, p)
    layers = [st.layer(p.model, weights[n], biases.get(n), m) for n in chain]
    d_in, d_out = layers[0].in_features, layers[-1].out_features
    rng = np.random.default_rng(p.seed)
    proj_in = proj_out = None
    if d_in != TOKEN_DIM:
        proj_in = (rng.standard_normal((d_in, TOKEN_DIM)) / math.sqrt(TOKEN_DIM)).astype(np.float32)
    if d_out != TOKEN_DIM:
        proj_out = (rng.standard_normal((TOKEN_DIM, d_out)) / math.sqrt(d_out)).astype(np.float32)

    c, h, w = LATENT_CHANNELS, p.height // 8, p.width // 8
    x = rng.standard_normal((c, h, w)).astype(np.float32)
    sigmas = np.linspace(1.0, 0.0, p.steps + 1)

    with st.lock:
        prev, st.last_final = st.last_final, None
    if prev is not None:
        host.free(prev)

    live: list[pb.TensorDescriptor] = []
    step_ms: list[float] = []
    bound_gens: dict[str, int] = {}
    try:
        for i in range(p.steps):
            if cancelled():
                raise PluginError(f"job {p.job_id!r}: cancelled at step {i}/{p.steps}", grpc.StatusCode.CANCELLED)
            t0 = time.perf_counter()
            # Re-read the bindings: a LoRA apply/strength change/remove applies from this step on.
            fresp = host.lookup_tensors(model=p.model, names=chain, include_factors=True)
            fmap = {f.layer: f for f in fresp.factors}
            for name, lin in zip(chain, layers):
                lin.bind(fmap.get(name))
                bound_gens[name] = int(fmap[name].binding_generation) if name in fmap else 0

            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            tok = patchify(x)
            hdn = tok @ proj_in.T if proj_in is not None else tok
            for j, lin in enumerate(layers):
                hdn = lin(hdn)
                if j + 1 < len(layers):
                    hdn = _gelu(hdn)
            pred = hdn @ proj_out.T if proj_out is not None else hdn
            rms = np.sqrt(np.mean(pred * pred, axis=1, keepdims=True)) + np.float32(1e-6)
            x0 = np.tanh(pred / rms).astype(np.float32)
            tok = tok + np.float32((s_next - s) / s) * (tok - x0)
            x = unpatchify(tok.astype(np.float32), c, h, w)

            last = i + 1 == p.steps
            desc, buf = host.allocate_array(f"{p.job_id}/latent/{'final' if last else i + 1}", np.float32, x.shape)
            buf[...] = x
            mean, std = float(x.mean()), float(x.std())
            host.publish(p.job_id, "latent", i + 1, p.steps,
                         {"arch": "flux1", "layout": "chw", "sigma": s_next, "mean": mean, "std": std}, [desc])
            step_ms.append((time.perf_counter() - t0) * 1000)
            if last:
                with st.lock:
                    st.last_final = desc
            else:
                live.append(desc)
                while len(live) > p.keep:
                    host.free(live.pop(0))
    finally:
        if live:
            host.free(*live)

    return Result(
        {
            "latent": 0,
            "shape": [c, h, w],
            "steps": p.steps,
            "seed": p.seed,
            "model": p.model,
            "job_id": p.job_id,
            "layers": chain,
            "factors": bound_gens,
            "stats": {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())},
            "step_ms": step_ms,
            "note": "reference pipeline: exercises the plumbing; not a trained model",
        },
        [st.last_final],
    )


plugin = Plugin(NAME, VERSION, kind="pipeline", metadata={
    "language": "python",
    "note": "NumPy reference pipeline: real arithmetic on the model's NF4 weights; exercises the plumbing, not a trained model",
})


@plugin.method("run", description="run a denoising-like loop on the model's NF4 layers, publishing each step's latent")
def _run(call, args):
    return run(call.host, Params.parse(args, call.call_id), mapper=call.mapper, cancelled=call.cancelled)


@plugin.method("warmup", description="self-check the host runs before switching to a new generation")
def _warmup(call, args):
    # An NF4 round trip and a side forward on a fixed input: catches a broken
    # NumPy/BLAS install before the generation takes traffic.
    w = np.linspace(-1.0, 1.0, 8 * TOKEN_DIM, dtype=np.float32).reshape(8, TOKEN_DIM)
    packed, absmax = quantize_nf4(w, 64)
    dq = dequantize_4bit_arrays(packed, absmax, NF4_CODE, 64, w.shape, "float32")
    err = float(np.abs(dq - w).max())
    if not err <= 0.2 * float(absmax.max()):
        raise PluginError(f"warmup: NF4 round trip error {err} is too large", grpc.StatusCode.INTERNAL)
    a = np.eye(2, TOKEN_DIM, dtype=np.float32)
    y = linear_forward(np.ones((3, TOKEN_DIM), np.float32), dq, None, (a, np.ones((8, 2), np.float32)))
    want = dq.sum(axis=1, dtype=np.float64) + 2.0
    if not np.allclose(y, want[None, :], atol=1e-4):
        raise PluginError("warmup: side forward self-check failed", grpc.StatusCode.INTERNAL)
    return {"ok": True}
