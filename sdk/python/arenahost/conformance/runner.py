"""The conformance suite in Python: ``python -m arenahost.conformance PLUGIN_DIR``.

It runs the checks of sdk/plugintest (the Go suite; contract in
sdk/plugintest/README.md) against a plugin folder without Go: it reads
PLUGIN_DIR/plugin.json, starts the real plugin process with the arenahost
go-plugin handshake, serves it a fake Host service over a Unix socket (with a
token, as the host serves non-Go plugins) backed by a memfd arena, and checks
health, Describe, errors, zero-copy reads and in-place writes, host
allocation, streaming, error codes and a graceful, quick shutdown. It prints
one line per check and exits 0 when all pass, 1 when one fails, 2 when the
plugin cannot be started or the folder is unusable.

A Go plugin is run the same way (no TLS; it reaches the fake host through
ARENAHOST_HOST_ADDR, which the Go SDK supports); the Go suite in
sdk/plugintest also covers go-plugin's broker path.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import secrets
import select
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
import msgpack
import numpy as np

from arenahost._goplugin import grpc_controller_pb2 as ctl_pb
from arenahost._goplugin import grpc_controller_pb2_grpc as ctl_grpc
from arenahost._goplugin import health_pb2 as health_pb
from arenahost._goplugin import health_pb2_grpc as health_grpc
from arenahost.conformance import METHODS
from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.plugin.v1 import plugin_pb2_grpc as pbg
from arenahost.server import MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE
from arenahost.tensor import itemsize, make_descriptor

__all__ = ["main", "run", "CheckFailed"]

HANDSHAKE_RE = re.compile(r"^1\|(\d+)\|(unix|tcp)\|([^|]+)\|grpc(\|[^|]*)?$")  # go-plugin adds |CERT (empty without TLS)
TOKEN_HEADER = "arenahost-host-token"


class CheckFailed(AssertionError):
    """A conformance check did not pass; the message says what was wrong."""


class Arena:
    """A memfd segment with a bump allocator that the plugin maps through /proc/PID/fd/N."""

    def __init__(self, size: int = 16 << 20):
        self.fd = os.memfd_create("arenahost-conformance", 0)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.size, self.path, self.next, self.generation = size, f"/proc/{os.getpid()}/fd/{self.fd}", 0, 0
        self.lock = threading.Lock()

    def alloc(self, name, dtype, shape, access=pb.ACCESS_READ_WRITE):
        with self.lock:
            n = (int(np.prod(shape)) if len(shape) else 1) * itemsize(dtype)
            off = (self.next + 63) & ~63
            if off + n > self.size:
                raise MemoryError(f"arena full: {name} needs {n} bytes at {off} of {self.size}")
            self.next, self.generation = off + n, self.generation + 1
            return make_descriptor(name, dtype, shape, segment_id=1, path=self.path, segment_size=self.size,
                                   offset=off, access=access, generation=self.generation)

    def put(self, name, arr, access=pb.ACCESS_READ_ONLY, dtype=pb.DTYPE_F32):
        arr = np.ascontiguousarray(arr)
        d = self.alloc(name, dtype, arr.shape, access)
        self.mm[d.region.offset : d.region.offset + arr.nbytes] = arr.tobytes()
        return d

    def read(self, d, dtype=np.float32):
        n = d.region.length // np.dtype(dtype).itemsize
        return np.frombuffer(self.mm, dtype=dtype, count=n, offset=d.region.offset).copy()

    def close(self):
        try:
            self.mm.close()
        except BufferError:
            pass
        os.close(self.fd)


class FakeHost(pbg.HostServicer):
    """The Host service a plugin under test reaches: allocation into the arena, records of what it did."""

    def __init__(self, arena: Arena):
        self.arena, self.token = arena, secrets.token_hex(16)
        self.allocated: list[pb.TensorDescriptor] = []
        self.lock = threading.Lock()

    def _auth(self, context):
        if dict(context.invocation_metadata()).get(TOKEN_HEADER) != self.token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"bad or missing {TOKEN_HEADER}")

    def Allocate(self, request, context):
        self._auth(context)
        try:
            d = self.arena.alloc(request.name, request.dtype, list(request.shape))
        except MemoryError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        with self.lock:
            self.allocated.append(d)
        return pb.AllocateResponse(tensor=d)

    def Free(self, request, context):
        self._auth(context)
        return pb.FreeResponse()

    def LookupTensors(self, request, context):
        self._auth(context)
        context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r}: the conformance host has no models")

    def Publish(self, request, context):
        self._auth(context)
        return pb.PublishResponse(accepted=False)

    def Log(self, request, context):
        self._auth(context)
        return pb.LogResponse()


def _expand(s: str, env: dict) -> str:
    try:
        return string.Template(s).substitute(env)
    except KeyError as e:
        raise SystemExit(f"conformance: manifest: ${{{e.args[0]}}} is not set (export it, e.g. ARENAHOST_PYTHON={sys.executable})")


class Plugin:
    """The plugin process after its handshake, with a channel to it and its stderr collected."""

    def __init__(self, argv, env, cwd, timeout):
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.err: list[str] = []
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        line = self._read_line(timeout)
        m = HANDSHAKE_RE.match(line)
        if not m:
            self.kill()
            raise CheckFailed(f"handshake: line {line!r} is not 1|1|unix|ADDR|grpc")
        if int(m.group(1)) != 1:
            self.kill()
            raise CheckFailed(f"handshake: protocol version {m.group(1)}, want 1")
        target = ("unix:" + m.group(3)) if m.group(2) == "unix" else m.group(3)
        self.channel = grpc.insecure_channel(target)
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.stub = pbg.PluginStub(self.channel)

    def _drain(self):
        for raw in self.proc.stderr:
            self.err.append(raw.decode(errors="replace").rstrip("\n"))

    def _read_line(self, timeout):
        fd, buf, deadline = self.proc.stdout.fileno(), b"", time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                raise CheckFailed(f"handshake: no line within {timeout:.0f}s (got {buf!r})")
            chunk = os.read(fd, 4096)
            if not chunk:
                rc = self.proc.wait()
                self._drainer.join(timeout=2)
                tail = "\n  ".join(self.err[-10:])
                raise CheckFailed(f"handshake: the plugin exited (rc={rc}) before its handshake; stderr:\n  {tail}")
            buf += chunk
        return buf.split(b"\n", 1)[0].decode()

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()


def _invoke(p: Plugin, method, args=None, tensors=(), raw=None):
    r = p.stub.Invoke(pb.InvokeRequest(method=method, args=raw if raw is not None else msgpack.packb(args or {}),
                                       tensors=list(tensors)), timeout=30)
    return msgpack.unpackb(r.result, raw=False), list(r.tensors)


def _want_error(what, fn, codes, *mention):
    try:
        fn()
    except grpc.RpcError as e:
        if e.code() not in codes:
            raise CheckFailed(f"{what}: code {e.code().name}, want {' or '.join(c.name for c in codes)} ({e.details()})")
        for m in mention:
            if m not in (e.details() or ""):
                raise CheckFailed(f"{what}: message {e.details()!r} does not mention {m!r}")
        return
    raise CheckFailed(f"{what}: succeeded, want {' or '.join(c.name for c in codes)}")


INVALID = (grpc.StatusCode.INVALID_ARGUMENT,)


def run(plugin_dir: str, *, out=sys.stdout, timeout: float = 90.0) -> int:
    """Run the suite on the plugin in plugin_dir; print one line per check; return the exit status."""
    manifest_path = os.path.join(plugin_dir, "plugin.json")
    try:
        with open(manifest_path) as f:
            man = json.load(f)
    except (OSError, ValueError) as e:
        print(f"conformance: {manifest_path}: {e}", file=out)
        return 2
    env = dict(os.environ)
    env.setdefault("ARENAHOST_PYTHON", sys.executable)
    if not isinstance(man.get("command"), str) or not man["command"]:
        print(f"conformance: {manifest_path}: field command: missing", file=out)
        return 2
    argv = [_expand(man["command"], env)] + [_expand(str(a), env) for a in man.get("args", [])]
    if not os.path.isabs(argv[0]) and os.sep in argv[0]:
        argv[0] = os.path.join(os.path.abspath(plugin_dir), argv[0])

    arena = Arena()
    host = FakeHost(arena)
    tmp = tempfile.mkdtemp(prefix="ahconf-")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pbg.add_HostServicer_to_server(host, server)
    sock = os.path.join(tmp, "host.sock")
    server.add_insecure_port("unix:" + sock)
    server.start()
    env.update({MAGIC_COOKIE_KEY: MAGIC_COOKIE_VALUE, "PLUGIN_PROTOCOL_VERSIONS": "1", "PLUGIN_UNIX_SOCKET_DIR": tmp,
                "ARENAHOST_HOST_ADDR": "unix://" + sock, "ARENAHOST_HOST_TOKEN": host.token,
                "ARENAHOST_PLUGIN_NAME": str(man.get("name", "")), "ARENAHOST_PLUGIN_GENERATION": "1"})
    failed, p = 0, None

    def check(name, fn):
        nonlocal failed
        t0 = time.monotonic()
        try:
            fn()
        except (CheckFailed, grpc.RpcError, AssertionError) as e:
            failed += 1
            detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
            print(f"FAIL {name}: {detail}", file=out)
            return False
        print(f"ok   {name} ({(time.monotonic() - t0) * 1000:.0f} ms)", file=out)
        return True

    try:
        try:
            p = Plugin(argv, env, os.path.abspath(plugin_dir), timeout)
        except CheckFailed as e:
            print(f"FAIL start: {e}", file=out)
            return 2
        print(f"ok   start: {' '.join(argv)} (pid {p.proc.pid})", file=out)
        desc = {}

        def health():
            r = health_grpc.HealthStub(p.channel).Check(health_pb.HealthCheckRequest(service="plugin"), timeout=10)
            if r.status != health_pb.HealthCheckResponse.SERVING:
                raise CheckFailed(f"service plugin is {r.status}, want SERVING")

        def describe():
            d = p.stub.Describe(pb.DescribeRequest(), timeout=10)
            desc["d"] = d
            if not (d.name and d.version and d.kind):
                raise CheckFailed(f"name {d.name!r} version {d.version!r} kind {d.kind!r}: none may be empty")
            if d.protocol_version != 1:
                raise CheckFailed(f"protocol_version {d.protocol_version}, want 1")
            for field in ("name", "kind"):
                if man.get(field) and man[field] != getattr(d, field):
                    raise CheckFailed(f"{field} {getattr(d, field)!r}, the manifest says {man[field]!r}")
            names = [m.name for m in d.methods]
            if len(names) != len(set(names)):
                raise CheckFailed(f"methods listed twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
            missing = [m for m in METHODS if m not in names]
            if missing:
                raise CheckFailed(f"conformance methods missing: {missing} (build the plugin with an arenahost SDK)")
            if not next(m for m in d.methods if m.name == "conformance.stream").streaming:
                raise CheckFailed("conformance.stream is not marked streaming")

        def unknown():
            _want_error("plugintest.no-such-method", lambda: _invoke(p, "plugintest.no-such-method"),
                        (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT), "plugintest.no-such-method")

        def bad_msgpack():
            _want_error("echo with args c1", lambda: _invoke(p, "conformance.echo", raw=b"\xc1"), INVALID, "conformance.echo")
            _want_error("echo with a truncated map", lambda: _invoke(p, "conformance.echo", raw=b"\x81\xa7payload"), INVALID, "conformance.echo")
            _want_error("fill with count a string", lambda: _invoke(p, "conformance.fill", {"name": "x", "count": "7"}), INVALID, "count")

        def echo():
            payload = {"s": "héllo", "n": [1, -2, 3.5], "b": b"\x00\xff", "m": {"k": None, "t": True}}
            got, _ = _invoke(p, "conformance.echo", {"payload": payload})
            if got.get("payload") != payload:
                raise CheckFailed(f"payload came back {got.get('payload')!r}, want {payload!r}")

        def read_in_place():
            x = (np.arange(16384, dtype=np.float32) % 97) - 48
            d = arena.put("conformance/sum", x)
            got, _ = _invoke(p, "conformance.sum", tensors=[d])
            if got.get("sum") != float(x.sum(dtype=np.float64)) or got.get("count") != x.size:
                raise CheckFailed(f"sum {got}, want sum {float(x.sum(dtype=np.float64))} count {x.size}")
            u8 = arena.put("conformance/u8", np.zeros(16, np.uint8), dtype=pb.DTYPE_U8)
            _want_error("sum of a U8 tensor", lambda: _invoke(p, "conformance.sum", tensors=[u8]), INVALID, "conformance/u8")
            past = arena.put("conformance/past", np.zeros(4, np.float32))
            past.region.offset = arena.size - 8
            _want_error("sum of a region past its segment's end", lambda: _invoke(p, "conformance.sum", tensors=[past]), INVALID)

        def written_in_place():
            x = np.linspace(-2, 2, 4096, dtype=np.float32)
            d = arena.put("conformance/scale", x, access=pb.ACCESS_READ_WRITE)
            _invoke(p, "conformance.scale", {"factor": 2.5}, tensors=[d])
            if not np.array_equal(arena.read(d), x * np.float32(2.5)):
                raise CheckFailed("the host does not see every element scaled in place")
            ro = arena.put("conformance/ro", x)
            _want_error("scale of a read-only tensor", lambda: _invoke(p, "conformance.scale", {"factor": 3.0}, tensors=[ro]), INVALID, "conformance/ro")
            if not np.array_equal(arena.read(ro), x):
                raise CheckFailed("a refused scale changed the read-only tensor")

        def describe_again():
            d = p.stub.Describe(pb.DescribeRequest(), timeout=10)
            if "d" in desc and d != desc["d"]:
                raise CheckFailed("a second Describe answered differently")

        def allocate():
            before = len(host.allocated)
            got, ts = _invoke(p, "conformance.fill", {"name": "conformance/fill", "count": 1000, "start": 1.0, "step": 0.5})
            new = host.allocated[before:]
            if len(new) != 1:
                raise CheckFailed(f"{len(new)} Allocate calls, want exactly 1")
            if got.get("count") != 1000 or len(ts) != 1:
                raise CheckFailed(f"result {got} with {len(ts)} tensors, want count 1000 and one tensor")
            if (ts[0].region.offset, ts[0].region.generation) != (new[0].region.offset, new[0].region.generation):
                raise CheckFailed("the returned tensor is not the allocated region")
            want = (1.0 + np.arange(1000, dtype=np.float64) * 0.5).astype(np.float32)
            if not np.array_equal(arena.read(new[0]), want):
                raise CheckFailed("the host does not read start + i*step")
            _want_error("fill with count 0", lambda: _invoke(p, "conformance.fill", {"name": "x", "count": 0}), INVALID, "count")

        def stream():
            r = p.stub.InvokeStream(pb.InvokeRequest(method="conformance.stream", args=msgpack.packb({"count": 7})), timeout=30)
            got = [msgpack.unpackb(m.result, raw=False).get("index") for m in r]
            if got != list(range(7)):
                raise CheckFailed(f"indices {got}, want 0..6")

        def error_codes():
            for name, code in (("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT), ("not_found", grpc.StatusCode.NOT_FOUND),
                               ("failed_precondition", grpc.StatusCode.FAILED_PRECONDITION), ("internal", grpc.StatusCode.INTERNAL)):
                _want_error(f"fail with {name}", lambda: _invoke(p, "conformance.fail", {"code": name, "message": "boom-" + name}),
                            (code,), "boom-" + name, "conformance.fail")

        def shutdown():
            t0 = time.monotonic()
            try:
                ctl_grpc.GRPCControllerStub(p.channel).Shutdown(ctl_pb.Empty(), timeout=5)
            except grpc.RpcError as e:
                # A plugin may exit before its answer is sent (Go's go-plugin
                # server does); go-plugin's client ignores that too.
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
            try:
                p.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                raise CheckFailed("still running 2 s after GRPCController/Shutdown")
            try:
                os.killpg(p.proc.pid, 0)
                raise CheckFailed("the plugin's process group still has processes after it exited")
            except ProcessLookupError:
                pass
            print(f"     shutdown took {(time.monotonic() - t0) * 1000:.0f} ms", file=out)

        for name, fn in (("health", health), ("describe", describe), ("unknown method", unknown), ("bad msgpack", bad_msgpack),
                         ("echo", echo), ("input tensor read in place", read_in_place),
                         ("input tensor written in place", written_in_place), ("describe again", describe_again),
                         ("host allocate", allocate), ("stream", stream), ("error codes", error_codes), ("shutdown", shutdown)):
            check(name, fn)
        return 1 if failed else 0
    finally:
        if p is not None:
            p.kill()
            p.channel.close() if hasattr(p, "channel") else None
            if failed and p.err:
                print("plugin stderr (last 20 lines):", file=out)
                for line in p.err[-20:]:
                    print("  " + line, file=out)
        server.stop(0).wait()
        arena.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m arenahost.conformance",
                                 description="Run the arenahost plugin conformance suite on PLUGIN_DIR (its plugin.json) without Go.")
    ap.add_argument("plugin_dir", metavar="PLUGIN_DIR", help="folder holding plugin.json")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the handshake (default 90)")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.plugin_dir):
        print(f"conformance: {a.plugin_dir}: not a directory", file=sys.stderr)
        return 2
    return run(a.plugin_dir, timeout=a.timeout)
