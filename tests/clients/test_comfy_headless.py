"""comfy-headless 3.1.1, unmodified, against arenahost's ComfyUI routes.

Client quirks found here:

* It lists checkpoints, samplers, schedulers and LoRAs from
  ``/object_info/{node}`` combos (``CheckpointLoaderSimple.ckpt_name``,
  ``KSampler.sampler_name``/``scheduler``, ``LoraLoader.lora_name``) and
  falls back to a built-in list when a combo is empty, so an empty list
  can hide a broken route: the test checks arenahost's own values.
* ``build_txt2img_workflow`` writes a KSampler with ``cfg=7`` and the
  given sampler; arenahost samples with Euler either way (cfg is logged as
  unused) and refuses sampler names outside its list as ComfyUI does.
* Completion is found by polling ``/history/{id}`` for
  ``status.completed``.
"""

from __future__ import annotations

import io

import pytest
from comfy_headless.client import ComfyClient
from PIL import Image

from conftest import api_graph, wait_until


@pytest.fixture(scope="module")
def client(host):
    c = ComfyClient(base_url=host.base)
    yield c
    c.close()


def test_listings(client):
    assert client.is_online()
    assert client.get_checkpoints() == ["flux-sample-nf4.safetensors", "second-nf4.safetensors"]
    assert client.get_samplers() == ["euler"]
    assert client.get_schedulers() == ["simple", "normal"]
    assert {"flux-sample-kohya-lora.safetensors", "styles/deep-style.safetensors"} <= set(client.get_loras())
    assert client.get_system_stats()["devices"]
    assert "KSampler" in client.get_all_installed_nodes()


def test_txt2img_queue_wait_fetch(client):
    wf = client.build_txt2img_workflow("a cat", width=256, height=192, steps=6, sampler="euler", scheduler="simple", seed=9)
    pid = client.queue_prompt(wf)
    assert pid
    entry = client.wait_for_completion(pid, timeout=120)
    assert entry and entry["status"]["completed"] and entry["status"]["status_str"] == "success"
    img = entry["outputs"]["9"]["images"][0]
    data = client.get_image(img["filename"], img["subfolder"], img["type"])
    assert Image.open(io.BytesIO(data)).size == (256, 192)


def test_unsupported_sampler_is_refused(client):
    wf = client.build_txt2img_workflow("a cat", width=64, height=64, steps=2, sampler="dpmpp_2m")
    assert client.queue_prompt(wf) is None  # a 400 with node_errors, as ComfyUI answers it


def test_clear_queue_and_cancel(client, host):
    running = client.queue_prompt(api_graph(steps=1000, width=512, height=512))
    pending = [client.queue_prompt(api_graph(steps=2)) for _ in range(2)]
    q = client.get_queue()
    assert [e[1] for e in q["queue_pending"]] == pending
    assert client.clear_queue()
    assert client.get_queue()["queue_pending"] == []
    assert client.cancel_current()
    entry = client.wait_for_completion(running, timeout=120)
    assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"]
    wait_until(lambda: client.get_queue() == {"queue_running": [], "queue_pending": []}, timeout=30, what="an empty queue")
