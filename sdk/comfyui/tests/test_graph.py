"""End to end: ComfyUI's own /prompt runs a graph with the pack's loader and LoRA nodes and core sampler nodes."""

import io

import numpy as np
from PIL import Image

from conftest import graph

KOHYA, PEFT = "flux-sample-kohya-lora", "flux-sample-peft-lora"


def png_size(b: bytes):
    assert b[:8] == b"\x89PNG\r\n\x1a\n", f"not a PNG: {b[:16]!r}"
    return int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")


def images(entry):
    out = []
    for node in entry["outputs"].values():
        out += node.get("images", [])
    return out


def ui_text(entry, node):
    return entry["outputs"].get(node, {}).get("text", [])


def test_graph_with_two_loras_makes_an_image(comfy, host):
    e = comfy.run(graph(host.url, loras=[(KOHYA, 0.8), (PEFT, 0.5)]))
    assert e["status"]["status_str"] == "success", e["status"]
    imgs = images(e)
    assert len(imgs) == 1, e["outputs"]
    png = comfy.view(imgs[0])
    assert png_size(png) == (64, 64)
    with_loras = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    assert with_loras.std() > 1, "a flat image"
    text = " ".join(ui_text(e, "2"))
    assert "matched 32 keys" in text and "matched 44 keys" in text, text
    st = host.get("/v1/loras/state?model=sample")
    assert st["mode"] == "side" and [(l["name"], l["strength"]) for l in st["loras"]] == [(KOHYA, 0.8), (PEFT, 0.5)]

    # The same graph without the LoRA node: the sampler's reconcile removes the set, and the image changes.
    e = comfy.run(graph(host.url))
    assert e["status"]["status_str"] == "success", e["status"]
    assert host.get("/v1/loras/state?model=sample")["loras"] == []
    plain = np.asarray(Image.open(io.BytesIO(comfy.view(images(e)[0]))).convert("RGB")).astype(np.int16)
    assert np.abs(plain - with_loras).max() > 0, "the LoRAs had no visible effect"
