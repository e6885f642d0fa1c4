"""Through a real host: ``arenahost serve`` with the LoRA engine, the preview plugin and diffusers-flux.

* Side mode against diffusers + PEFT, end to end: the host writes and loads
  the NF4 sample model, ``POST /v1/loras/apply`` (mode side) binds the LoRA
  engine's A_cat/B_cat for a PEFT-keyed and a kohya LoRA, and a job runs the
  plugin's ``transformer`` method (the patched transformer, polling the
  host's bindings). In this process diffusers' ``load_lora_weights`` loads
  the same two files onto the same weights dequantized by bitsandbytes. The
  outputs agree within fp32 tolerance; after ``DELETE /v1/loras`` they are
  the base output again.
* Previews: a ``run`` job produces previews that decode as images and a final
  PNG of the requested size.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import SDK, require
from test_diffusers_side import arenahost_bin, diffusers_reference

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


class Host:
    def __init__(self, proc, base, data):
        self.proc, self.base, self.data = proc, base, data

    def call(self, method, path, body=None, timeout=120):
        req = urllib.request.Request(self.base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if r.headers.get("Content-Type", "").startswith("application/json") else raw)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def job(self, spec, timeout=600):
        st, j = self.call("POST", "/v1/jobs", spec)
        assert st == 201, (st, j)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st, s = self.call("GET", f"/v1/jobs/{j['id']}")
            if s["state"] in ("done", "failed", "cancelled", "error"):
                return s
            time.sleep(0.2)
        raise AssertionError(f"job {j['id']} still {s['state']} after {timeout}s")


def _plugins_dir(tmp):
    """bin/plugins' Go plugins (lora-nf4, preview) next to this checkout's diffusers_flux example."""
    src = arenahost_bin().parent / "plugins"
    out = tmp / "plugins"
    out.mkdir()
    for name in ("lora-nf4", "preview"):
        if not (src / name / "plugin.json").exists():
            if os.environ.get("ARENAHOST_REQUIRE_PYTHON") == "1":
                pytest.fail(f"{src / name} missing: run make build")
            pytest.skip(f"{src / name} missing: run make build")
        shutil.copytree(src / name, out / name)  # discovery reads real directories
    shutil.copytree(SDK / "examples" / "diffusers_flux", out / "diffusers-flux")
    return out


@contextlib.contextmanager
def serve_host(tmp, data, serving=("diffusers-flux",)):
    """A real `arenahost serve` on data with the built plugins and diffusers-flux as the txt2img pipeline,
    yielded once the plugins named in serving serve; its stderr goes to tmp/host.log (Host.log)."""
    plugins = _plugins_dir(tmp)
    env = dict(os.environ, PYTHONPATH=str(SDK) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = tmp / "host.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(arenahost_bin()), "serve", "--listen", "127.0.0.1:0", "--data", str(data),
                                 "--plugins", str(plugins), "--python", sys.executable, "--pipeline", "diffusers-flux"],
                                stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith("arenahost console: "), (line, log_path.read_text()[-2000:])
            h = Host(proc, line.split(": ", 1)[1].strip().rstrip("/"), data)
            h.log = log_path
            deadline = time.monotonic() + 120
            while True:
                st, ps = h.call("GET", "/v1/plugins")
                states = {p.get("name"): p.get("state") for p in ps} if st == 200 and isinstance(ps, list) else {}
                if all(states.get(n) == "serving" for n in serving):
                    break
                assert time.monotonic() < deadline, f"plugins not serving: {states}; {log_path.read_text()[-3000:]}"
                time.sleep(0.3)
            yield h
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    require("torch")
    require("diffusers")
    require("peft")
    require("bitsandbytes")
    tmp = tmp_path_factory.mktemp("host")
    data = tmp / "data"
    (data / "loras").mkdir(parents=True)
    with serve_host(tmp, data, serving=("lora-nf4", "preview", "diffusers-flux")) as h:
        yield h


def _forward(h, **params):
    s = h.job({"pipeline": "diffusers-flux", "method": "transformer", "params": dict(model="sample", **params)})
    assert s["state"] == "done", s
    r = s["result"]
    return np.asarray(r["values"], np.float32).reshape(r["shape"]), r


def test_side_mode_through_the_host_matches_diffusers_peft(host):
    torch = require("torch")
    from arenahost import diffusers_check as dc
    from arenahost.diffusers_flux import SAMPLE_TRANSFORMER_CONFIG as cfg

    sd = dc.read_nf4_checkpoint(str(host.data / "models" / "flux-sample-nf4.safetensors"))
    bfl = dc.dequantized_bfl_state(sd)
    diff = dc.bfl_to_diffusers_state(bfl)
    peft = dc.write_peft_lora(str(host.data / "loras" / "style_peft.safetensors"), diff, cfg)
    kohya = dc.write_kohya_lora(str(host.data / "loras" / "detail_kohya.safetensors"), bfl)
    inp = dc.flux_inputs(3)
    with torch.no_grad():
        base_ref = dc.plain_transformer(diff, cfg)(**inp)[0].numpy()
    base, _ = _forward(host, seed=3)
    np.testing.assert_allclose(base, base_ref, rtol=1e-4, atol=1e-4)

    st, res = host.call("POST", "/v1/loras/apply", {"model": "sample", "mode": "side", "loras": [
        {"name": "style_peft", "strength": 1.0}, {"name": "detail_kohya", "strength": 0.7}]})
    assert st == 200, res
    ref, _ = diffusers_reference(dict(diff=diff, cfg=cfg, peft=peft, kohya=kohya), (1.0, 0.7))
    with torch.no_grad():
        want = ref(**inp)[0].numpy()
    got, r = _forward(host, seed=3)
    assert len(r["bound"]) > 30
    assert np.abs(want - base_ref).max() > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)

    st, res = host.call("DELETE", "/v1/loras?model=sample")
    assert st == 200, res
    again, r = _forward(host, seed=3)
    assert r["bound"] == {}
    np.testing.assert_allclose(again, base_ref, rtol=1e-4, atol=1e-4)


def test_bf16_factors_give_a_bfloat16_forward_the_same_bits(host):
    """factor_dtype bf16 (half the factor memory) changes no bit of a bfloat16 forward: the pipeline
    casts f32 factors to bfloat16 with the rounding the plugin stored them with. A float32 forward
    reads the rounded values, so it differs; the f32 set is applied again to tell the two apart."""
    require("torch")
    from arenahost import diffusers_check as dc
    from arenahost.diffusers_flux import SAMPLE_TRANSFORMER_CONFIG as cfg

    loras = host.data / "loras"
    if not (loras / "style_peft.safetensors").exists():
        sd = dc.read_nf4_checkpoint(str(host.data / "models" / "flux-sample-nf4.safetensors"))
        bfl = dc.dequantized_bfl_state(sd)
        dc.write_peft_lora(str(loras / "style_peft.safetensors"), dc.bfl_to_diffusers_state(bfl), cfg)
        dc.write_kohya_lora(str(loras / "detail_kohya.safetensors"), bfl)
    body = {"model": "sample", "mode": "side", "loras": [{"name": "style_peft", "strength": 1.0}, {"name": "detail_kohya", "strength": 0.7}]}
    out = {}
    try:
        for fdt in ("f32", "bf16"):
            st, res = host.call("POST", "/v1/loras/apply", dict(body, factor_dtype=fdt))
            assert st == 200 and res["factor_dtype"] == fdt and res["path"] == "apply", res
            side = res["report"]["side_bytes"]
            for dt in ("bfloat16", "float32"):
                y, r = _forward(host, seed=3, dtype=dt)
                assert r["dtype"] == dt and len(r["bound"]) > 30, r
                out[fdt, dt] = (y, side)
        assert out["bf16", "bfloat16"][1] * 2 == out["f32", "bfloat16"][1], "bf16 factors take half the bytes"
        np.testing.assert_array_equal(out["bf16", "bfloat16"][0], out["f32", "bfloat16"][0])
        assert np.abs(out["bf16", "float32"][0] - out["f32", "float32"][0]).max() > 0, \
            "a float32 forward must see the rounding, or this test cannot tell the factors apart"
    finally:
        host.call("DELETE", "/v1/loras?model=sample")


def test_job_previews_decode_and_final_image_has_requested_size(host):
    from PIL import Image

    w, hgt, steps = 96, 64, 3
    s = host.job({"pipeline": "diffusers-flux", "params": {"steps": steps, "seed": 2, "width": w, "height": hgt, "model": "sample"},
                  "preview": {"format": "png"}})
    assert s["state"] == "done", s
    assert s["preview"]["published"] == steps and s["preview"]["rendered"] >= 1, s["preview"]
    st, frame = host.call("GET", f"/v1/jobs/{s['id']}/preview.jpg")
    assert st == 200
    img = Image.open(io.BytesIO(frame))
    img.load()
    assert min(img.size) > 0
    r = s["result"]
    # The PNG itself is checked over gRPC (job snapshots carry it base64-encoded)
    # (test_diffusers_pipeline.py). Here: one image of the requested size, and the final frame.
    assert (r["width"], r["height"], r["steps"]) == (w, hgt, steps) and len(r["images"]) == 1, r
    assert s["step"] == s["total"] == steps
