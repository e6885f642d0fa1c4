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


def node_error(entry):
    errs = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "error" and errs, entry["status"]
    return errs[0]


def test_bad_lora_is_a_node_error_and_leaves_the_host_as_it_was(comfy, host, tmp_path):
    ok = comfy.run(graph(host.url, loras=[(KOHYA, 0.6)], seed=5))
    assert ok["status"]["status_str"] == "success", ok["status"]
    before = host.get("/v1/loras/state?model=sample")
    digest = host.get("/v1/models/sample/digest")["sha256"]

    # An unknown LoRA name: the LoRA node fails naming it.
    err = node_error(comfy.run(graph(host.url, loras=[(KOHYA, 0.6), ("no-such-lora", 1.0)], seed=6)))
    assert err["node_type"] == "ArenahostLoRA" and "no-such-lora" in err["exception_message"], err
    # A LoRA whose shapes do not fit the model (rank-4 factors of a 512-wide layer on a 256-wide model).
    import torch
    from safetensors.torch import save_file

    bad = host.data / "loras" / "misfit-lora.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(4, 512, dtype=torch.bfloat16),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(512, 4, dtype=torch.bfloat16),
               "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(4.0, dtype=torch.bfloat16)}, str(bad))
    err = node_error(comfy.run(graph(host.url, loras=[("misfit-lora", 1.0)], mode="fuse", seed=7)))
    assert err["node_type"] == "ArenahostLoRA", err
    assert "misfit-lora" in err["exception_message"] and "double_blocks" in err["exception_message"], err
    # Neither failure changed the host's state or bytes.
    after = host.get("/v1/loras/state?model=sample")
    assert (after["mode"], after["loras"]) == (before["mode"], before["loras"])
    assert host.get("/v1/models/sample/digest")["sha256"] == digest
    # ComfyUI keeps serving, and the graph runs again.
    assert comfy.run(graph(host.url, loras=[(KOHYA, 0.6)], seed=8))["status"]["status_str"] == "success"
