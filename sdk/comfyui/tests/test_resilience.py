"""The host dies mid-run: ComfyUI reports a node error and keeps serving; the restarted host runs the same graph."""

import signal
import threading
import time

import pytest

from conftest import Comfy, Host, graph, http

KOHYA = "flux-sample-kohya-lora"


@pytest.fixture()
def host_and_comfy(tmp_path):
    h = Host(tmp_path / "data").start()
    c = Comfy(tmp_path / "base", h.url).prepare(h.data / "loras").start()
    yield h, c
    c.stop()
    h.stop()


def test_host_killed_mid_run_then_restarted(host_and_comfy):
    h, c = host_and_comfy
    # Enough steps that the sampler is still stepping when the host dies, even
    # on a quiet machine (30 steps once finished inside the second waited
    # below); every model call asks the host for its factors.
    g = graph(h.url, loras=[(KOHYA, 0.7)], steps=400, size=64, cache_weights=True)
    pid = c.queue(g)
    # Kill the host once the sampler is stepping (the LoRA node has already applied on it).
    t0 = time.time()
    while time.time() - t0 < 120:
        q = http("GET", c.url + "/queue")
        if q["queue_running"] and h.get("/v1/loras/state?model=sample").get("loras"):
            break
        time.sleep(0.2)
    time.sleep(0.3)
    h.kill()
    e = c.wait(pid, timeout=300)
    assert e["status"]["status_str"] == "error", e["status"]
    errs = [m[1] for m in e["status"]["messages"] if m[0] == "execution_error"]
    assert errs, e["status"]["messages"]
    assert errs[0]["node_type"] == "KSampler", errs[0]
    assert "arenahost" in errs[0]["exception_message"] and "no arenahost answers" in errs[0]["exception_message"], errs[0]
    # ComfyUI keeps serving.
    assert http("GET", c.url + "/system_stats")["system"]["comfyui_version"]
    assert c.proc.poll() is None

    # Same port, same data: the host writes nothing new and loads the sample again; the same graph runs.
    h.start()
    e = c.run(g, timeout=600)
    assert e["status"]["status_str"] == "success", e["status"]
    assert any(n.get("images") for n in e["outputs"].values())
    st = h.get("/v1/loras/state?model=sample")
    assert [(l["name"], l["strength"]) for l in st["loras"]] == [(KOHYA, 0.7)]
