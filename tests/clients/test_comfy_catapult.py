"""comfy-catapult 3.0.0, unmodified, against arenahost's ComfyUI routes.

Client quirks found here:

* Every response is parsed into pydantic models (``APIObjectInfo``,
  ``APIQueueInfo`` with 5-element entries, ``APIHistory`` …), so shapes
  must match ComfyUI's, and JSON answers must say ``application/json``.
* ``PostQueue`` and ``PostFree`` send their arguments as a *form* body
  (aiohttp ``data=dict``: ``delete=a&delete=b&clear=False``), where
  ComfyUI's server reads JSON and fails on them; arenahost reads both.
* ``ComfyCatapult`` polls ``/prompt``, ``/system_stats``, ``/queue`` and
  ``/history/{id}`` every 2 s and checks that every output node listed in
  the queue entry's ``outputs_to_execute`` has outputs in the history.
"""

from __future__ import annotations

import asyncio
import io

import pytest
from comfy_catapult.api_client import ComfyAPIClient
from comfy_catapult.catapult import ComfyCatapult
from PIL import Image

from conftest import api_graph, wait_until


def run(coro):
    return asyncio.run(coro)


def test_schemas_parse(host):
    async def go():
        async with ComfyAPIClient(host.base + "/") as c:
            stats = await c.GetSystemStats()
            assert stats.devices and stats.devices[0].vram_total > 0
            info = await c.GetObjectInfo()
            assert "KSampler" in info.root and info.root["KSampler"].output == ["LATENT"]
            pinfo = await c.GetPrompt()
            assert pinfo.exec_info.queue_remaining == 0
            q = await c.GetQueue()
            assert q.queue_running == [] and q.queue_pending == []
            up = await c.PostUploadImage(folder_type="input", subfolder="", filename="cat.png", data=_png(), overwrite=True)
            assert up.name == "cat.png" and up.type == "input"
            assert await c.GetView(folder_type="input", subfolder="", filename="cat.png") == _png()
            await c.PostFree(unload_models=True, free_memory=True)
    run(go())


def _png():
    b = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 128, 0)).save(b, format="PNG")
    return b.getvalue()


def test_catapult_runs_a_graph_and_fetches_the_image(host):
    async def go():
        async with ComfyAPIClient(host.base + "/") as c:
            cat = ComfyCatapult(comfy_client=c, debug_path=None)
            try:
                hist = await asyncio.wait_for(cat.Catapult(job_id="catapult-job-1", prepared_workflow=api_graph(steps=4, width=128, height=128),
                                                           important=["9"]), 120)
            finally:
                await cat.Close()
            img = hist["outputs"]["9"]["images"][0]
            data = await c.GetView(folder_type=img["type"], subfolder=img["subfolder"], filename=img["filename"])
            assert Image.open(io.BytesIO(data)).size == (128, 128)
            h = await c.GetHistory(max_items=1)
            assert len(h.root) == 1
            entry = next(iter(h.root.values()))
            assert entry.status.completed and entry.status.status_str == "success"
            assert entry.prompt.outputs_to_execute == ["9"]
    run(go())


def test_queue_delete_and_clear(host):
    async def go():
        async with ComfyAPIClient(host.base + "/") as c:
            long = await c.PostPrompt(prompt_workflow=api_graph(steps=1000, width=512, height=512))
            waiting = [await c.PostPrompt(prompt_workflow=api_graph(steps=2)) for _ in range(2)]
            q = await c.GetQueue()
            assert [e.prompt_id for e in q.queue_running] == [long.prompt_id]
            assert [e.prompt_id for e in q.queue_pending] == [w.prompt_id for w in waiting]
            assert all(len(e) == 5 for e in q.queue_pending)
            await c.PostQueue(delete=[waiting[0].prompt_id], clear=False)
            q = await c.GetQueue()
            assert [e.prompt_id for e in q.queue_pending] == [waiting[1].prompt_id]
            await c.PostQueue(delete=[], clear=True)
            q = await c.GetQueue()
            assert q.queue_pending == []
            await c.PostInterrupt()
            for _ in range(600):
                if (await c.GetPrompt()).exec_info.queue_remaining == 0:
                    break
                await asyncio.sleep(0.1)
            h = await c.GetHistory(prompt_id=long.prompt_id)
            assert h.root[long.prompt_id].status.status_str == "error"
            everything = (await c.GetHistory()).root
            assert all(w.prompt_id not in everything for w in waiting)
    run(go())
