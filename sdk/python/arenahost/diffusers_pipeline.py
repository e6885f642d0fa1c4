"""The ``diffusers-flux`` pipeline plugin: a real diffusers FluxPipeline on the host's NF4 model.

Kind ``pipeline``, method ``run`` (msgpack params; all optional):

==============  ===========================================================
``steps``       denoising steps, 1..200 (default 4)
``seed``        noise seed (default 0)
``width``       image width, a multiple of 16 in 16..2048 (default 256)
``height``      image height, same rule (default 256)
``guidance``    Flux guidance (default 3.5)
``prompt``      prompt text: encoded by the model folder's CLIP-L and T5
                when it has them, else it seeds stand-in embeddings
                (:func:`arenahost.diffusers_flux.prompt_embeddings`)
``max_sequence_length``  T5 tokens, 1..512 (default 512; text encoders only)
``model``       registry model name ("" = the host's default)
``model_dir``   a local diffusers FluxPipeline folder (default: env
                ``ARENAHOST_DIFFUSERS_FLUX_DIR``; none: a small pipeline
                built from configs with random weights, no download). Its
                VAE and scheduler are used, and its text encoders and
                tokenizers when model_index.json names them; the
                transformer's weights always come from the arena model,
                and so do the encoders' and the VAE's when the host
                carries them beside it (a pipeline folder loaded by the
                host: configs and tokenizers from the folder, weights from
                the arena); a part the arena lacks is loaded with
                ``from_pretrained`` (``components`` says which)
``model_file``  the path of the model's single file (the host passes it for a
                model loaded from one file): when the arena model bundles
                CLIP-L, T5 and a VAE (Forge/ComfyUI), tokenizers are looked
                for beside it (``tokenizer/`` and ``tokenizer_2/``)
``tokenizer_dir`` a folder holding ``tokenizer/`` and ``tokenizer_2/`` (and
                optionally ``text_encoder*/``, ``vae/``, ``transformer/``
                configs and ``scheduler/``) for a bundled single file
                (default: env ``ARENAHOST_DIFFUSERS_FLUX_TOKENIZERS``); looked
                at before the file's own folder
``job_id``      id the latents are published under (default: the call id)
``keep``        step latents kept allocated at once (default 2)
``cache_weights``  keep each layer's dequantized fp32 weight between steps
                (default true: fastest; false dequantizes in every forward,
                bitsandbytes' memory profile, needed to fit a Flux-dev-size
                model in a small card)
``dtype``       the pipeline's compute dtype: float32 (default), bfloat16
                or float16 (the arena's NF4 weights are dequantized to fp32
                and cast per layer; bfloat16 is how Flux-dev runs on a GPU)
``stand_in_tokens``  tokens of the stand-in prompt embeddings when the
                pipeline has no text encoders, 1..512 (default 32; 512 is
                T5-XXL's length in FLUX.1-dev)
==============  ===========================================================

``ARENAHOST_TORCH_MEMORY_CAP`` (a size, from the host's environment) caps the
device memory this process's torch allocator may hold
(:func:`arenahost.device.apply_torch_memory_cap`, applied before the first
pipeline is built); the result's ``peak_torch_bytes`` is the allocator's peak
(``torch.cuda.max_memory_reserved``) during the run, 0 on the CPU, and
``memory_cap`` says what the cap did.

The pipeline runs on the host's torch device (``ARENAHOST_TORCH_DEVICE``, see
:mod:`arenahost.device`): ``cuda:N`` when the host's arena is on device N.
The transformer's Linear layers are patched onto the arena model with
:func:`arenahost.diffusers_flux.patch_pipeline` (once per model; LoRA side
factors the host binds are polled once per step). Every step's packed Flux
latents ``F32 [tokens, 64]`` go into a region allocated through the host and
are published on topic ``latent`` with payload ``{family: "flux", arch:
"flux1", packed: true, layout: "packed", height, width, grid_h, grid_w}``.
The result is ``{images: [png bytes], width, height, steps, seed, model,
layout, patched, left, step_ms, conditioning, conditioning_note}``; the VAE
decodes the final latents. ``conditioning`` is ``"text_encoders"`` when the
folder's CLIP-L and T5 encoded the prompt, ``"stand-in"`` when the prompt only
seeded stand-in embeddings (``conditioning_note`` says why: no folder, or
what the folder lacks).

A model whose arena tensors bundle text encoders or a VAE (a Forge/ComfyUI
single file, or a pipeline folder the host loaded with its ``text_encoder*/``
and ``vae/``, then with ``model_dir`` as the source of configs, tokenizers and
scheduler) runs as a whole pipeline built from them
(:func:`arenahost.diffusers_bundled.build_bundled_pipeline`): CLIP-L and T5
read from the arena encode the prompt when both are complete and tokenizers
are found (else ``conditioning`` is ``"stand-in"`` and the note says why, e.g.
``no tokenizer: …``), the bundled VAE decodes (``decoder``: ``"vae"``, or
``"stand-in"`` with ``decoder_note``), and ``components`` says where each part
came from.

Method ``transformer`` (a cross-check, run as a job like ``run``): one
forward of the patched transformer on seeded inputs
(:func:`arenahost.diffusers_check.flux_inputs`, params ``seed``, ``tokens``,
``txt``, ``model``, and ``dtype`` and ``cache_weights`` as for ``run``),
returning ``{shape, values: [floats], bound: {layer: binding_generation},
polls, dtype, cache_weights}`` (the dtype the transformer ran in, and whether
its patched layers keep their dequantized weights), so a test can compare the
host's real side factors with diffusers + PEFT.

torch and diffusers are imported on the first ``run``, so the plugin starts
(and answers Describe) in the core environment too; ``run`` then fails with
FAILED_PRECONDITION naming the missing package.
"""

from __future__ import annotations

import importlib.util
import io
import os
import threading
import time

import grpc
import numpy as np

from arenahost.device import apply_torch_memory_cap, torch_device
from arenahost.server import InvalidArgument, Plugin, PluginError, Result, get_arg

__all__ = ["plugin", "run", "NAME", "VERSION", "ENV_MODEL_DIR", "ENV_TOKENIZERS"]

NAME = "diffusers-flux"
VERSION = "0.1.0"
ENV_MODEL_DIR = "ARENAHOST_DIFFUSERS_FLUX_DIR"
ENV_TOKENIZERS = "ARENAHOST_DIFFUSERS_FLUX_TOKENIZERS"


_DTYPES = ("float32", "bfloat16", "float16")


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pipes: dict[str, object] = {}  # pipeline key (model_dir or bundled model, dtype) -> FluxPipeline
        self.patched: dict[tuple, object] = {}  # (pipeline key, model, cache_weights) -> PatchReport
        # model -> (load identity, the names it was read from, its bundled components ({} for none))
        self.bundles: dict[str, tuple[tuple, tuple, dict]] = {}
        self.memory_cap: str | None = None  # what apply_torch_memory_cap did, once


_STATE = _State()


def _need_torch() -> None:
    missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
    if missing:
        raise PluginError(
            f"{NAME} needs {' and '.join(missing)}: run it with the torch environment "
            "(ARENAHOST_PYTHON=.venv-torch/bin/python, or pip install 'arenahost[torch]' diffusers)",
            grpc.StatusCode.FAILED_PRECONDITION,
        )


def _parse(args, call_id: str) -> dict:
    p = dict(
        steps=get_arg(args, "steps", int, 4),
        seed=get_arg(args, "seed", int, 0),
        width=get_arg(args, "width", int, 256),
        height=get_arg(args, "height", int, 256),
        guidance=get_arg(args, "guidance", float, 3.5),
        prompt=get_arg(args, "prompt", str, ""),
        model=get_arg(args, "model", str, ""),
        model_dir=get_arg(args, "model_dir", str, "") or os.environ.get(ENV_MODEL_DIR, ""),
        model_file=get_arg(args, "model_file", str, ""),
        tokenizer_dir=get_arg(args, "tokenizer_dir", str, "") or os.environ.get(ENV_TOKENIZERS, ""),
        job_id=get_arg(args, "job_id", str, "") or call_id,
        keep=get_arg(args, "keep", int, 2),
        max_sequence_length=get_arg(args, "max_sequence_length", int, 512),
        cache_weights=get_arg(args, "cache_weights", bool, True),
        stand_in_tokens=get_arg(args, "stand_in_tokens", int, 32),
        dtype=get_arg(args, "dtype", str, "float32"),
    )
    if p["dtype"] not in _DTYPES:
        raise InvalidArgument(f"args.dtype: {p['dtype']!r} must be one of {', '.join(_DTYPES)}")
    if not 1 <= p["stand_in_tokens"] <= 512:
        raise InvalidArgument(f"args.stand_in_tokens: {p['stand_in_tokens']} must be in 1..512")
    if not 1 <= p["max_sequence_length"] <= 512:
        raise InvalidArgument(f"args.max_sequence_length: {p['max_sequence_length']} must be in 1..512")
    if not 1 <= p["steps"] <= 200:
        raise InvalidArgument(f"args.steps: {p['steps']} must be in 1..200")
    for f in ("width", "height"):
        if not (16 <= p[f] <= 2048 and p[f] % 16 == 0):
            raise InvalidArgument(f"args.{f}: {p[f]} must be a multiple of 16 in 16..2048")
    if not 0 <= p["seed"] < 2**63:
        raise InvalidArgument(f"args.seed: {p['seed']} must be in 0..2^63-1")
    if not 1 <= p["keep"] <= 64:
        raise InvalidArgument(f"args.keep: {p['keep']} must be in 1..64")
    if p["model_dir"] and not os.path.isdir(p["model_dir"]):
        raise InvalidArgument(f"args.model_dir: {p['model_dir']!r} is not a directory")
    if p["tokenizer_dir"] and not os.path.isdir(p["tokenizer_dir"]):
        raise InvalidArgument(f"args.tokenizer_dir: {p['tokenizer_dir']!r} is not a directory")
    return p


def _region_sig(d) -> tuple:
    r = d.region
    return (r.cpu.host_pid, r.cpu.id, r.offset, r.length, r.generation)


def _load_identity(st: _State, host, model: str) -> tuple[tuple, dict]:
    """(load identity, bundled components) of the arena model, the components cached per load.

    The identity is the region signatures (as :class:`arenahost.torch.FactorWatcher`
    computes them) of a few of the model's tensors: the first of its transformer, its
    text encoders and its VAE. The host may unload a model and load another (or the
    same file again) under the same name; its tensors then live in new regions, the
    identity changes, and every cache built from the old load is dropped (see
    :func:`_pipeline`). One LookupTensors by name per run when nothing changed."""
    from arenahost.diffusers_bundled import VAE_PREFIXES, bundled_components
    from arenahost.host import HostError

    cached = st.bundles.get(model)
    if cached is not None:
        ident, names, comps = cached
        try:
            got = {d.name: d for d in host.lookup_tensors(model=model, names=names).tensors}
        except HostError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            got = {}  # a tensor of the old load is gone: the model was reloaded
        if tuple(_region_sig(got[n]) if n in got else () for n in names) == ident:
            return ident, comps
    all_names = sorted(d.name for d in host.lookup_tensors(model=model, prefix="").tensors)
    comps = bundled_components(all_names)
    groups = ("text_encoders.",) + VAE_PREFIXES
    names = []
    for pre in groups:
        names += [n for n in all_names if n.startswith(pre)][:1]
    names += [n for n in all_names if not n.startswith(groups)][:1]
    names = tuple(names)
    descs = {d.name: d for d in host.lookup_tensors(model=model, names=names).tensors} if names else {}
    ident = tuple(_region_sig(descs[n]) for n in names)
    st.bundles[model] = (ident, names, comps)
    return ident, comps


def _pipeline(st: _State, host, p: dict):
    from arenahost.diffusers_bundled import build_bundled_pipeline
    from arenahost.diffusers_flux import build_small_pipeline, patch_pipeline

    tok_dirs = (p["tokenizer_dir"], os.path.dirname(os.path.abspath(p["model_file"])) if p["model_file"] else "")

    def build(bundled: bool):
        # On the host's device (ARENAHOST_TORCH_DEVICE: cuda:N on the cuda
        # backend): patched layers follow the pipeline's device. The memory
        # cap goes on before anything is allocated there.
        if st.memory_cap is None:
            st.memory_cap = apply_torch_memory_cap()
        import torch

        if bundled and p["model_dir"]:
            # A pipeline folder whose text encoders / VAE the host carries in the arena.
            try:
                pipe = build_bundled_pipeline(host, p["model"], folder=p["model_dir"], tokenizer_dirs=(p["tokenizer_dir"],),
                                              dtype=getattr(torch, p["dtype"]))
            except (ValueError, OSError, KeyError) as e:  # a bad folder is the caller's mistake: say which and why
                raise InvalidArgument(f"args.model_dir: {p['model_dir']!r}: {e}") from e
            return pipe.to(torch_device())
        if bundled:
            try:
                pipe = build_bundled_pipeline(host, p["model"], tokenizer_dirs=tok_dirs, dtype=getattr(torch, p["dtype"]))
            except (ValueError, OSError) as e:  # a bad companion folder or an unreadable bundle: say which and why
                raise InvalidArgument(f"model {p['model']!r} (bundled single file; tokenizer_dir {p['tokenizer_dir']!r}): {e}") from e
            return pipe.to(torch_device())
        try:
            pipe = build_small_pipeline(p["model_dir"] or None, dtype=getattr(torch, p["dtype"]))
        except (ValueError, OSError, KeyError) as e:  # a bad folder is the caller's mistake: say which and why
            raise InvalidArgument(f"args.model_dir: {p['model_dir']!r}: {e}") from e
        return pipe.to(torch_device())

    with st.lock:
        # The arena model carries text encoders or a VAE (a bundled single file, or a pipeline
        # folder whose components the host loaded beside its transformer): build from them.
        ident, comps = _load_identity(st, host, p["model"])
        bundled = bool(comps)
        if p["model_dir"] and bundled:
            from arenahost.diffusers_flux import folder_text_components

            try:
                folder_text_components(p["model_dir"])  # no model_index.json / a bad one: the caller's mistake
            except ValueError as e:
                raise InvalidArgument(f"args.model_dir: {p['model_dir']!r}: {e}") from e
        # The load identity is part of both keys: a model reloaded under the same name gets a
        # fresh pipeline (VAE, encoders' embeddings and norms, transformer norm scales and the
        # components dict all come from the new load), never the old load's.
        pkey = (p["model_dir"] if not bundled else f"arena:{p['model']}:{p['model_dir']}:{tok_dirs}") + f"|{p['dtype']}"
        key = (pkey, p["model"], ident, p["cache_weights"])
        report = st.patched.get(key)
        if report is not None:
            return st.pipes[pkey], report
        # One transformer per pipeline and one pipeline at a time: another model, load, dtype
        # or cache_weights drops every pipeline built before (with its caches), then builds once.
        st.pipes.clear()
        st.patched.clear()
        pipe = build(bundled)
        report = patch_pipeline(pipe, host, model=p["model"], cache_weight=p["cache_weights"])
        if getattr(pipe, "_arenahost_empty_transformer", False):
            # The folder's transformer was built without weights: every parameter must come from the arena.
            unset = [n for n, _ in pipe.transformer.named_parameters() if n not in report.copied]
            if unset or report.left:
                raise PluginError(f"model {p['model']!r} does not cover the transformer of {p['model_dir'] or 'its bundled pipeline'}: "
                                  f"no arena tensor for {sorted(report.left)[:5] or unset[:5]}",
                                  grpc.StatusCode.FAILED_PRECONDITION)
        st.pipes[pkey] = pipe
        st.patched[key] = report
        return pipe, report


def run(host, p: dict, *, cancelled=lambda: False, state: _State | None = None) -> Result:
    """Run one job (see the module doc); the plugin's ``run`` method calls this."""
    _need_torch()
    import torch

    from arenahost.diffusers_flux import encode_prompt

    st = state if state is not None else _STATE
    pipe, report = _pipeline(st, host, p)
    pe, pooled, conditioning, cond_note = encode_prompt(pipe, p["prompt"], max_sequence_length=p["max_sequence_length"],
                                                        stand_in_tokens=p["stand_in_tokens"])
    on_cuda = pipe.transformer.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(pipe.transformer.device)
    h, w, steps, job = p["height"], p["width"], p["steps"], p["job_id"]
    live: list = []
    step_ms: list[float] = []
    t_last = [time.perf_counter()]

    def on_step(_pipe, i, _t, kw):
        if cancelled():
            raise PluginError(f"job {job!r}: cancelled at step {i + 1}/{steps}", grpc.StatusCode.CANCELLED)
        lat = kw["latents"]  # [1, tokens, 64] packed Flux latents
        desc, buf = host.allocate_array(f"{job}/latent/{i + 1}", np.float32, tuple(lat.shape[1:]))
        buf[...] = lat[0].detach().float().cpu().numpy()
        host.publish(job, "latent", i + 1, steps,
                     {"family": "flux", "arch": "flux1", "packed": True, "layout": "packed", "height": h, "width": w,
                      "grid_h": h // 16, "grid_w": w // 16}, [desc])
        live.append(desc)
        while len(live) > p["keep"]:
            host.free(live.pop(0))
        now = time.perf_counter()
        step_ms.append((now - t_last[0]) * 1000)
        t_last[0] = now
        return kw

    gen = torch.Generator().manual_seed(p["seed"])
    try:
        with torch.inference_mode():
            out = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=h, width=w, num_inference_steps=steps,
                       guidance_scale=p["guidance"], generator=gen, output_type="pil",
                       callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])
    finally:
        if live:
            host.free(*live)
    peak = torch.cuda.max_memory_reserved(pipe.transformer.device) if on_cuda else 0
    pngs = []
    for img in out.images:
        b = io.BytesIO()
        img.save(b, format="PNG")
        pngs.append(b.getvalue())
    return Result({
        "images": pngs, "width": w, "height": h, "steps": steps, "seed": p["seed"], "model": p["model"], "job_id": job,
        "layout": report.layout, "patched": len(report.patched), "left": sorted(report.left), "step_ms": step_ms,
        "note": "" if p["model_dir"] or hasattr(pipe, "_arenahost_components") else
        "small FluxPipeline from configs with random weights except the arena model's transformer",
        "conditioning": conditioning, "conditioning_note": cond_note,
        "decoder": getattr(pipe, "_arenahost_decoder", ("vae", ""))[0],
        "decoder_note": getattr(pipe, "_arenahost_decoder", ("vae", ""))[1],
        "components": dict(getattr(pipe, "_arenahost_components", {})),
        "peak_torch_bytes": int(peak), "memory_cap": st.memory_cap or "no cap", "cache_weights": p["cache_weights"],
    })


plugin = Plugin(NAME, VERSION, kind="pipeline", metadata={
    "language": "python",
    "needs": "torch, diffusers (arenahost[torch])",
    "note": "diffusers FluxPipeline whose transformer runs on the host's NF4 weights and LoRA side factors",
})


@plugin.method("run", description="run a diffusers FluxPipeline on the host's NF4 Flux model, publishing each step's packed latents; returns PNGs")
def _run(call, args):
    return run(call.host, _parse(args, call.call_id), cancelled=call.cancelled)


@plugin.method("transformer", description="one forward of the patched transformer on seeded inputs (cross-checks): {shape, values, bound}")
def _transformer(call, args):
    p = _parse({k: v for k, v in (args or {}).items() if k in ("model", "model_dir", "model_file", "tokenizer_dir", "dtype",
                                                                  "cache_weights")}, call.call_id)
    seed = get_arg(args, "seed", int, 3)
    tokens = get_arg(args, "tokens", int, 64)
    txt = get_arg(args, "txt", int, 16)
    if not (1 <= tokens <= 4096 and 1 <= txt <= 512):
        raise InvalidArgument(f"args.tokens/txt: {tokens}/{txt} must be in 1..4096 / 1..512")
    _need_torch()
    import torch

    from arenahost.diffusers_check import flux_inputs

    pipe, report = _pipeline(_STATE, call.host, p)
    cfg = pipe.transformer.config
    inp = flux_inputs(seed, tokens, txt, int(cfg.in_channels), int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim))
    with torch.inference_mode():
        dev = pipe.transformer.device
        y = pipe.transformer(**{k: (v.to(dev, pipe.transformer.dtype) if torch.is_tensor(v) and v.is_floating_point()
                                    else v.to(dev) if torch.is_tensor(v) else v)
                                for k, v in inp.items()})[0]
    bound, cached = {}, set()
    for name, m in pipe.transformer.named_modules():
        if getattr(m, "binding_generation", 0):
            bound[m.weight_name] = m.binding_generation
        if hasattr(m, "cache_weight"):
            cached.add(bool(m.cache_weight))
    # values as a float list: job snapshots show msgpack bytes as "<N bytes>"
    return {"shape": list(y.shape), "values": y.float().cpu().reshape(-1).tolist(), "bound": bound,
            "polls": report.watcher.polls, "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
            "cache_weights": sorted(cached) == [True]}
