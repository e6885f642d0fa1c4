"""Screenshot of the pack's graph in ComfyUI's real frontend (not a test; writes sdk/comfyui/docs/graph.png).

    pip download --no-deps comfyui-frontend-package==1.58.1 -d .cache/dl
    unzip -q .cache/dl/comfyui_frontend_package-1.58.1-py3-none-any.whl -d .cache/comfyui-frontend-1.58.1
    PYTHONPATH=sdk/python .venv-comfy/bin/python sdk/comfyui/tests/screenshot.py .cache/comfyui-frontend-1.58.1/comfyui_frontend_package/static

Starts a host and a ComfyUI serving that frontend, opens it in headless
Debian chromium over the DevTools protocol (aiohttp's websocket client),
loads the tests' graph with the frontend's own app.loadApiJson, queues it,
and captures the page once the image is saved.
"""

import asyncio
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest as c  # noqa: E402

import aiohttp  # noqa: E402


async def cdp(port, url, graph, out):
    async with aiohttp.ClientSession() as s:
        for _ in range(100):
            try:
                async with s.get(f"http://127.0.0.1:{port}/json/list") as r:
                    pages = [p for p in await r.json() if p.get("type") == "page"]
                if pages:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        ws = await s.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        n = 0

        async def call(method, **params):
            nonlocal n
            n += 1
            await ws.send_json({"id": n, "method": method, "params": params})
            while True:
                m = await ws.receive_json()
                if m.get("id") == n:
                    if "error" in m:
                        raise RuntimeError(f"{method}: {m['error']}")
                    return m.get("result", {})

        async def js(expr):
            r = await call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
            if r.get("exceptionDetails"):
                raise RuntimeError(f"{expr[:80]}: {r['exceptionDetails']}")
            return r.get("result", {}).get("value")

        await call("Page.enable")
        await call("Emulation.setDeviceMetricsOverride", width=1700, height=950, deviceScaleFactor=1, mobile=False)
        await call("Page.navigate", url=url)
        for _ in range(150):
            await asyncio.sleep(0.4)
            if await js("!!(window.app && window.app.graph)"):
                break
        await asyncio.sleep(3)
        await js(f"window.app.loadApiJson({json.dumps(graph)}, 'arenahost.json')")
        await asyncio.sleep(2)
        await js("window.app.queuePrompt(0)")
        for _ in range(300):
            await asyncio.sleep(1)
            h = await js("fetch('/history').then(r => r.json())")
            if h and all(v.get("status", {}).get("completed") for v in h.values()):
                break
        await asyncio.sleep(3)
        await js("const c = window.app.canvas; const ns = window.app.graph._nodes;"
                 "const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1]));"
                 "const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));"
                 "const sc = Math.min(1450 / (x1 - x0), 780 / (y1 - y0), 1); c.ds.scale = sc;"
                 "c.ds.offset = [150 / sc - x0, 130 / sc - y0]; c.setDirty(true, true)")
        await asyncio.sleep(1)
        shot = await call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


def main():
    fe = Path(sys.argv[1]).resolve()
    out = Path(__file__).resolve().parents[1] / "docs" / "graph.png"
    tmp = Path(tempfile.mkdtemp(prefix="arenahost-shot-"))
    h = c.Host(tmp / "data").start()
    cm = c.Comfy(tmp / "base", h.url).prepare(h.data / "loras")
    settings = cm.base / "user" / "default"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "comfy.settings.json").write_text(json.dumps({
        "Comfy.TutorialCompleted": True, "Comfy.InstalledVersion": "1.58.1", "Comfy.Workflow.ShowMissingModelsWarning": False,
        "Comfy.NodeBadge.NodeIdBadgeMode": "Show all"}))
    shutil.rmtree(tmp / "frontend", ignore_errors=True)
    (tmp / "frontend").symlink_to(fe, target_is_directory=True)
    cm.start()
    port = c.free_port()
    chrome = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
                               f"--user-data-dir={tmp / 'chrome'}", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        g = c.graph(h.url, loras=[("flux-sample-kohya-lora", 0.8), ("flux-sample-peft-lora", 0.5)], steps=4, size=256)
        asyncio.run(cdp(port, cm.url, g, out))
        print("wrote", out)
    finally:
        chrome.terminate()
        chrome.wait(10)
        cm.stop()
        h.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
