"""The pack's ComfyUI nodes: "Load NF4 model (arenahost)" and "LoRA (arenahost)".

The loader returns a ComfyUI ``MODEL`` over a host model's arena weights
(:mod:`.flux`). The LoRA node records the LoRA set a graph asks for on its
clone of that MODEL and applies it on the host at once (so its UI text can
report matched and unmatched keys, and retention when fused); before every
sampling run the loader's OUTER_SAMPLE wrapper makes the host's LoRA state
equal to the set the sampled MODEL carries: a graph without the LoRA node
(or with other inputs) removes or replaces the LoRAs, byte-exact, and a
restarted host gets its model and LoRAs back. The host applies or removes a
set whole or not at all, so a failure leaves its state as it was; errors
become ComfyUI node errors naming the file, key or setting.
"""

from __future__ import annotations

import json
import logging

from .client import ArenahostError, HostHTTP
from .flux import ArenaSession, load_model

log = logging.getLogger("arenahost")

KEY = "arenahost"  # transformer_options key: {"session": ArenaSession, "mode": str, "loras": ((name, strength), ...)}
MODES = ["side", "fuse"]
MAX_LORAS = 3

_models: dict[tuple, tuple] = {}  # (url, model, cache) -> (patcher, session): one arena mapping per process


def _host(url: str, token: str) -> HostHTTP:
    return HostHTTP(url.strip(), token.strip())


def _want(state: dict) -> tuple:
    """(mode, ((name, strength), ...)) of a /v1/loras/state answer ("" mode when no LoRA)."""
    loras = tuple((l.get("name", ""), round(float(l.get("strength", 1.0)), 6)) for l in state.get("loras") or [])
    return (state.get("mode", "") if loras else "", loras)


def reconcile(session: ArenaSession, mode: str, loras: tuple) -> dict | None:
    """Make the host's LoRA state for session.model equal (mode, loras); returns the host's report when it acted."""
    host = session.host
    want = (mode if loras else "", tuple((n, round(float(s), 6)) for n, s in loras))
    with session.lock:
        if host.model(session.model) is None:
            if not session.path:
                raise ArenahostError(f"model {session.model!r}", 404, "not_found",
                                     "the host no longer holds this model (restarted?) and the loader was given no path to load it from")
            host.load_model(session.path, session.model)
        have = _want(host.lora_state(session.model))
        if have == want:
            return None
        if not loras:
            out = host.remove_loras(session.model)
        else:
            out = host.apply_loras(session.model, mode, list(loras))
        if mode == "fuse" or have[0] == "fuse":
            session.invalidate()
        session.applied = want
        return out


def _outer_sample(executor, *args, **kwargs):
    """Before sampling: the host holds the LoRA set this MODEL carries; the watcher sees it."""
    guider = executor.class_obj
    opts = guider.model_options.get("transformer_options", {}).get(KEY) or guider.model_patcher.model_options["transformer_options"].get(KEY)
    if opts:
        reconcile(opts["session"], opts["mode"], opts["loras"])
        opts["session"].watcher.poll()
    return executor(*args, **kwargs)


def _diffusion_model(executor, *args, **kwargs):
    """Each model call: one lookup, so rebinding or removal shows from this step."""
    opts = (kwargs.get("transformer_options") or {}).get(KEY)
    if opts is None:
        opts = next((a[KEY] for a in args if isinstance(a, dict) and KEY in a), None)
    if opts:
        opts["session"].watcher.poll()
    return executor(*args, **kwargs)


def _summary(report: dict | None, state_loras) -> list[str]:
    lines = []
    if report:
        rep = report.get("report") or report
        for l in rep.get("loras") or []:
            un = l.get("unmatched") or []
            lines.append(f"{l.get('file')}: strength {l.get('strength')}, matched {l.get('matched', 0)} keys, "
                         f"unmatched {len(un)}" + (f" ({', '.join(un[:8])}{'…' if len(un) > 8 else ''})" if un else ""))
        if rep.get("retention") is not None:
            ret = rep["retention"]
            lines.append("retention: " + (json.dumps(ret) if not isinstance(ret, (int, float)) else f"{ret:.6f}"))
    elif not state_loras:
        lines.append("no LoRA: the model has its original weights")
    return lines


class LoadNF4ModelArenahost:
    """Load NF4 model (arenahost): a MODEL over a host model's arena weights, zero-copy."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": ("STRING", {"default": "sample", "tooltip": "name of the model in the host (GET /v1/models)"}),
            },
            "optional": {
                "load_path": ("STRING", {"default": "", "tooltip": "file in the host's models directory to load when the host "
                                                                  "does not hold model_name yet (and again after a host restart)"}),
                "host_url": ("STRING", {"default": "", "tooltip": "arenahost address; empty: $ARENAHOST_URL or http://127.0.0.1:7860"}),
                "token": ("STRING", {"default": "", "tooltip": "the host's bearer token; empty: $ARENAHOST_TOKEN"}),
                "cache_weights": ("BOOLEAN", {"default": False, "tooltip": "keep each dequantized weight (fp32) between steps: "
                                                                           "faster, but private memory of 8 bytes per parameter"}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "arenahost"
    DESCRIPTION = "A Flux MODEL whose NF4 weights live in arenahost's shared arena (mapped, not copied)."

    @classmethod
    def IS_CHANGED(cls, model_name, load_path="", host_url="", token="", cache_weights=False):
        # The host's identity for the model: a restarted host (or a reloaded model) gives a new MODEL.
        try:
            return model_identity(_host(host_url, token), model_name.strip())
        except ArenahostError as e:
            return f"unavailable: {e}"

    def load(self, model_name, load_path="", host_url="", token="", cache_weights=False):
        name = model_name.strip()
        if not name:
            raise ValueError("model_name is empty: name a model the host holds (GET /v1/models)")
        h = _host(host_url, token)
        m = h.model(name)
        loaded = []
        if m is None:
            if not load_path.strip():
                names = [x.get("name") for x in h.models()]
                raise ValueError(f"model_name {name!r}: the host at {h.url} holds no such model (it holds {names}); "
                                 f"set load_path to a file in its models directory to load it")
            m = h.load_model(load_path.strip(), name)
            loaded.append(f"loaded {load_path.strip()} into the host as {name!r}")
        key = (h.url, name, bool(cache_weights), model_identity(h, name))
        cached = _models.get(key)
        if cached is None:
            for k in [k for k in _models if k[:3] == key[:3]]:
                _models.pop(k)  # the host's model changed (restart, reload): drop the old mapping
            import comfy.patcher_extension as pe
            from arenahost.tensor import Mapper

            # A mapper of its own: when ComfyUI drops this MODEL (a restarted host gave a new one),
            # the old arena's mappings go with it.
            h.mapper = Mapper()
            patcher, session = load_model(h, name, load_path.strip(), cache_weights=bool(cache_weights))
            patcher.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, _outer_sample)
            patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY, _diffusion_model)
            patcher.model_options.setdefault("transformer_options", {})[KEY] = {"session": session, "mode": "", "loras": ()}
            _models[key] = (patcher, session)
        patcher, session = _models[key]
        session.host.token = h.token  # this run's token (input or $ARENAHOST_TOKEN) for the LoRA node and the sampler
        session.watcher.poll()
        out = patcher.clone()
        out.model_options["transformer_options"][KEY] = {"session": session, "mode": "", "loras": ()}
        text = loaded + [f"{name}: {m.get('format')} {m.get('layout')}, {m.get('weights')} 4-bit weights, "
                         f"{m.get('tensors')} tensors, {m.get('bytes')} bytes in the arena (mapped, not copied); "
                         f"host models: {', '.join(x.get('name') for x in h.models())}"]
        return {"ui": {"text": text}, "result": (out,)}


def model_identity(h: HostHTTP, name: str) -> str:
    """Which host process holds the model where: changes when the host restarts or reloads it."""
    d = h.lookup_tensors(model=name)
    if not d.tensors:
        return "empty"
    t = min(d.tensors, key=lambda t: t.name)
    return f"{t.region.cpu.host_pid}:{t.region.cpu.id}:{t.region.offset}:{len(d.tensors)}"


class LoRAArenahost:
    """LoRA (arenahost): exact LoRAs on the arena model, side (default) or fused."""

    @classmethod
    def INPUT_TYPES(cls):
        req = {"model": ("MODEL",), "mode": (MODES, {"default": "side"})}
        opt = {}
        for i in range(1, MAX_LORAS + 1):
            opt[f"lora_{i}"] = ("STRING", {"default": "", "tooltip": "LoRA name in the host's LoRA directory (GET /v1/loras); empty: none"})
            opt[f"strength_{i}"] = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})
        return {"required": req, "optional": opt}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "arenahost"
    DESCRIPTION = ("Side mode adds the exact low-rank product beside the NF4 weights; fuse mode rewrites them in the arena "
                   "(restored byte-exact on removal). Strength changes only rebind factors.")

    def apply(self, model, mode="side", **kw):
        opts = model.model_options.get("transformer_options", {}).get(KEY)
        if not opts:
            raise ValueError("LoRA (arenahost): model does not come from 'Load NF4 model (arenahost)'")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: want one of {MODES}")
        loras = list(opts["loras"])
        if loras and opts["mode"] and opts["mode"] != mode:
            raise ValueError(f"mode {mode!r}: the incoming MODEL already carries {opts['mode']} LoRAs; chain nodes of one mode")
        for i in range(1, MAX_LORAS + 1):
            name = str(kw.get(f"lora_{i}", "") or "").strip()
            if not name:
                continue
            s = float(kw.get(f"strength_{i}", 1.0))
            if any(n == name for n, _ in loras):
                raise ValueError(f"lora_{i} {name!r}: already in this MODEL's LoRA set")
            loras.append((name, s))
        loras = tuple(loras)
        session: ArenaSession = opts["session"]
        report = reconcile(session, mode, loras)
        if report is None and loras:
            report = session.host.lora_state(session.model)
        session.watcher.poll()
        out = model.clone()
        out.model_options["transformer_options"][KEY] = {"session": session, "mode": mode if loras else "", "loras": loras}
        text = [f"{session.model}: {mode} mode, " + (", ".join(f"{n} @ {s:g}" for n, s in loras) or "no LoRA")]
        text += _summary(report, loras)
        return {"ui": {"text": text}, "result": (out,)}


NODE_CLASS_MAPPINGS = {
    "ArenahostLoadNF4Model": LoadNF4ModelArenahost,
    "ArenahostLoRA": LoRAArenahost,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ArenahostLoadNF4Model": "Load NF4 model (arenahost)",
    "ArenahostLoRA": "LoRA (arenahost)",
}
