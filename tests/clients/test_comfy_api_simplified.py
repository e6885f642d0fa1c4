"""comfy-api-simplified 1.6.0, unmodified, against arenahost's ComfyUI routes.

Client quirks found here:

* ``queue_prompt_and_wait`` posts the prompt *before* it opens the
  websocket, and treats every binary frame as a result image. arenahost
  (like ComfyUI) sends binary previews only to clients that ask for them,
  so this client gets none and falls back to ``/history`` and ``/view``.
* It stops waiting when a ``status`` message says ``queue_remaining == 0``:
  arenahost writes the history before that status goes out, as ComfyUI does.
* It builds every URL from the root (``urljoin(url, "/prompt")``), so a
  base URL with a path would be dropped.
"""

from __future__ import annotations

import io
import threading

import pytest
from comfy_api_simplified import ComfyApiError, ComfyApiWrapper, ComfyWorkflowWrapper
from PIL import Image

from conftest import api_graph, arenahost_graph, wait_until


@pytest.fixture(scope="module")
def api(host):
    return ComfyApiWrapper(host.base)


def test_queue_wait_and_fetch_images(api):
    wf = ComfyWorkflowWrapper(api_graph(steps=6, width=192, height=128))
    wf.set_node_param("Positive", "text", "a red cat")
    images = api.queue_and_wait_images(wf, "Save Image")
    assert len(images) == 1
    name, data = next(iter(images.items()))
    assert name.startswith("clients_") and name.endswith("_.png")
    assert Image.open(io.BytesIO(data)).size == (192, 128)


def test_arenahost_nodes_with_two_loras(api):
    images = api.queue_and_wait_images(arenahost_graph(steps=4), "Save Image")
    (name, data), = images.items()
    assert Image.open(io.BytesIO(data)).size == (256, 256)


def test_listings(api):
    info = api.get_object_info("KSampler")["KSampler"]
    assert info["input"]["required"]["sampler_name"][0] == ["euler"]
    everything = api.get_object_info()
    assert {"ArenahostLoRA", "UNETLoader", "SaveImage"} <= set(everything)
    stats = api.get_system_stats()
    assert stats["system"]["ram_total"] > 0 and stats["devices"][0]["vram_total"] > 0
    assert api.get_embeddings() == []
    assert api.get_queue() == {"queue_running": [], "queue_pending": []}


def test_unknown_node_is_refused(api):
    g = api_graph()
    g["11"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "x"}}
    with pytest.raises(ComfyApiError, match="400"):
        api.queue_prompt(g)


def test_upload_then_view(api, tmp_path):
    p = tmp_path / "in.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(p)
    r = api.upload_image(p, subfolder="up")
    assert r == {"name": "in.png", "subfolder": "up", "type": "input"}
    back = api.get_image("in.png", "up", "input")
    assert Image.open(io.BytesIO(back)).getpixel((0, 0)) == (255, 0, 0)


def sampling(host):
    st = host.get("/sdapi/v1/progress")["state"]
    return st["job_count"] == 1 and st["sampling_step"] > 2


def test_interrupt_stops_the_running_prompt(api, host):
    r = api.queue_prompt(api_graph(steps=1000, width=512, height=512))
    pid = r["prompt_id"]
    wait_until(lambda: api.get_queue_size_before(pid) == 0 and sampling(host),
               timeout=60, what="the prompt to run")
    api.interrupt()
    h = wait_until(lambda: api.get_history(pid), timeout=60, what="the history entry")
    st = h[pid]["status"]
    assert st["status_str"] == "error" and st["completed"] is False
    assert st["messages"][-1][0] == "execution_interrupted"
