"""A real ``arenahost serve`` for the client-library tests.

The host runs from ``bin/`` (``make build``) on a loopback port with the
lora-nf4 and preview plugins and the NumPy reference pipeline (named
explicitly with ``--pipeline reference-pipeline``; it needs no torch), on
the sample NF4 model and sample LoRAs it writes into a fresh data folder.
The pipeline's plugin runs on the core environment's Python
(``ARENAHOST_PYTHON``); these tests run in ``.venv-clients``, which holds the
client libraries at pinned versions and nothing of arenahost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGINS = ("lora-nf4", "preview", "reference_pipeline")


def _need(env: str, default: Path) -> Path:
    p = Path(os.environ.get(env) or default)
    if not p.exists():
        msg = f"{p} missing ({env}): run `make build venv` or the tests through `make test`"
        if os.environ.get("ARENAHOST_REQUIRE_PYTHON") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return p


class Host:
    """A running host: its base URL, data folder and log."""

    def __init__(self, proc: subprocess.Popen, base: str, data: Path, log: Path):
        self.proc, self.base, self.data, self.log = proc, base, data, log
        self.port = int(base.rsplit(":", 1)[1])

    def get(self, path: str):
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body=None):
        req = urllib.request.Request(self.base + path, method="POST", data=json.dumps(body).encode() if body is not None else b"",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw.strip() else None)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@pytest.fixture(scope="session")
def host(tmp_path_factory) -> Host:
    bindir = _need("ARENAHOST_BIN", REPO / "bin")
    exe = _need("ARENAHOST_BIN", REPO / "bin") / "arenahost"
    python = _need("ARENAHOST_PYTHON", REPO / ".venv" / "bin" / "python")
    tmp = tmp_path_factory.mktemp("host")
    plugins = tmp / "plugins"
    for name in PLUGINS:
        src = bindir / "plugins" / name
        if not (src / "plugin.json").exists():
            _need("ARENAHOST_BIN", src / "plugin.json")
        shutil.copytree(src, plugins / name)
    data = tmp / "data"
    log = tmp / "host.log"
    env = dict(os.environ, PYTHONPATH=str(REPO / "sdk" / "python"))
    proc = subprocess.Popen([str(exe), "serve", "--listen", "127.0.0.1:0", "--data", str(data), "--plugins", str(plugins),
                             "--python", str(python), "--pipeline", "reference-pipeline"],
                            stdout=subprocess.PIPE, stderr=open(log, "wb"), env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("arenahost console: "), (line, log.read_text()[-3000:])
        h = Host(proc, line.split(": ", 1)[1].strip().rstrip("/"), data, log)
        deadline = time.monotonic() + 120
        while True:
            states = {p["name"]: p["state"] for p in h.get("/v1/plugins")}
            if all(states.get(n) == "serving" for n in ("lora-nf4", "preview", "reference-pipeline")):
                break
            assert time.monotonic() < deadline, f"plugins not serving: {states}\n{h.log_tail()}"
            time.sleep(0.3)
        # A LoRA in a subfolder, named by its bare name in prompts, as A1111 does.
        (data / "loras" / "styles").mkdir()
        shutil.copy(data / "loras" / "flux-sample-kohya-lora.safetensors", data / "loras" / "styles" / "deep-style.safetensors")
        # A second checkpoint, not loaded until a client selects it.
        shutil.copy(data / "models" / "flux-sample-nf4.safetensors", data / "models" / "second-nf4.safetensors")
        yield h
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(cond, timeout=60.0, every=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def api_graph(steps=8, width=256, height=256, batch=1, seed=5, lora="flux-sample-kohya-lora.safetensors", ckpt="flux-sample-nf4.safetensors"):
    """An API-format graph with ComfyUI's core node names, titled as the UI titles them."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}, "_meta": {"title": "Load Checkpoint"}},
        "10": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name": lora, "strength_model": 0.7},
               "_meta": {"title": "LoraLoaderModelOnly"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}, "_meta": {"title": "Empty Latent Image"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}, "_meta": {"title": "Positive"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}, "_meta": {"title": "Negative"}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
                                                 "scheduler": "simple", "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
                                                 "denoise": 1.0}, "_meta": {"title": "KSampler"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "_meta": {"title": "VAE Decode"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "clients"}, "_meta": {"title": "Save Image"}},
    }


def arenahost_graph(steps=8, width=256, height=256, seed=3):
    """The same flow with arenahost's own nodes (two LoRAs, side mode)."""
    return {
        "1": {"class_type": "ArenahostLoadModel", "inputs": {"model_name": "flux-sample-nf4.safetensors"}, "_meta": {"title": "Load"}},
        "2": {"class_type": "ArenahostLoRA", "inputs": {"model": ["1", 0], "lora_name": "flux-sample-kohya-lora.safetensors", "strength": 0.5, "mode": "side"},
              "_meta": {"title": "LoRA 1"}},
        "3": {"class_type": "ArenahostLoRA", "inputs": {"model": ["2", 0], "lora_name": "flux-sample-peft-lora.safetensors", "strength": 0.8, "mode": "side"},
              "_meta": {"title": "LoRA 2"}},
        "4": {"class_type": "ArenahostSampler", "inputs": {"model": ["3", 0], "prompt": "a cat", "seed": seed, "steps": steps, "width": width,
                                                         "height": height, "batch_size": 1}, "_meta": {"title": "Sample"}},
        "5": {"class_type": "ArenahostDecode", "inputs": {"samples": ["4", 0]}, "_meta": {"title": "Decode"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "own/nodes"}, "_meta": {"title": "Save Image"}},
    }
