"""A real plugin subprocess (examples/hello_plugin.py) spoken to over gRPC."""

import os
import signal
import subprocess
import sys
import time

import grpc
import msgpack
import numpy as np
import pytest

from arenahost._goplugin import grpc_controller_pb2 as ctl_pb
from arenahost._goplugin import grpc_controller_pb2_grpc as ctl_grpc
from arenahost._goplugin import grpc_stdio_pb2_grpc as stdio_grpc
from arenahost._goplugin import health_pb2 as health_pb
from arenahost._goplugin import health_pb2_grpc as health_grpc
from arenahost.conformance import METHODS
from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.plugin.v1 import plugin_pb2_grpc as pbg
from google.protobuf import empty_pb2
from conftest import EXAMPLES, Arena, plugin_env, plugin_launcher, serve_fake_host

HELLO = str(EXAMPLES / "hello_plugin.py")


@pytest.fixture(scope="module")
def shared():
    """One plugin process for the tests that leave it running (startup costs ~1 s)."""
    a = Arena()
    with serve_fake_host(a) as (host, env), plugin_launcher() as start:
        p = start([HELLO], env)
        yield p, pbg.PluginStub(p.channel), host, a
    a.close()


@pytest.fixture
def hello(shared):
    p, stub, host, _ = shared
    host.allocated.clear()
    host.logs.clear()
    return p, stub, host


@pytest.fixture
def arena(shared):
    return shared[3]


@pytest.fixture
def own_hello(start_plugin, fake_host):
    """A plugin process of the test's own, for tests that stop it."""
    host, env = fake_host
    p = start_plugin([HELLO], env)
    return p, pbg.PluginStub(p.channel), host


def invoke(stub, method, args=None, tensors=()):
    r = stub.Invoke(pb.InvokeRequest(method=method, args=b"" if args is None else msgpack.packb(args), tensors=list(tensors)), timeout=10)
    return msgpack.unpackb(r.result), list(r.tensors)


def test_health_and_describe(hello):
    p, stub, _ = hello
    h = health_grpc.HealthStub(p.channel)
    assert h.Check(health_pb.HealthCheckRequest(service="plugin"), timeout=5).status == health_pb.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        h.Check(health_pb.HealthCheckRequest(service="nope"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    d = stub.Describe(pb.DescribeRequest(), timeout=5)
    assert (d.name, d.version, d.kind, d.protocol_version) == ("hello-py", "0.1.0", "other", 1)
    names = [m.name for m in d.methods]
    assert {"stats", "affine", "scale", *METHODS} <= set(names)
    assert len(names) == len(set(names))
    assert next(m for m in d.methods if m.name == "conformance.stream").streaming


def test_zero_copy_read_and_write_visible(hello, arena):
    p, stub, host = hello
    x = (np.arange(20000, dtype=np.float32) - 5000) * 0.5
    d = arena.put("hello.x", x, pb.ACCESS_READ_WRITE)
    res, _ = invoke(stub, "stats", tensors=[d])
    assert res == {"name": "hello.x", "count": 20000, "sum": float(x.astype(np.float64).sum()), "min": -2500.0, "max": 7499.5}
    # Changing the bytes in place is seen by the next call: the plugin maps, it does not copy.
    arena.mm[d.region.offset : d.region.offset + 4] = np.float32(-1e6).tobytes()
    assert invoke(stub, "stats", tensors=[d])[0]["min"] == -1e6
    # The plugin's in-place write is visible to us.
    assert invoke(stub, "scale", {"factor": -2.0}, [d])[0] == {"count": 20000}
    got = arena.read(d, np.float32)
    want = x.copy()
    want[0] = -1e6
    np.testing.assert_array_equal(got, want * np.float32(-2.0))


def test_read_only_descriptor_cannot_be_written(hello, arena):
    _, stub, _ = hello
    d = arena.put("hello.ro", np.ones(8, np.float32), pb.ACCESS_READ_ONLY)
    with pytest.raises(grpc.RpcError) as e:
        invoke(stub, "scale", {"factor": 3.0}, [d])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello.ro" in e.value.details() and "read-only" in e.value.details()
    np.testing.assert_array_equal(arena.read(d, np.float32), np.ones(8, np.float32))


def test_output_through_host_allocation(hello, arena):
    _, stub, host = hello
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    d = arena.put("hello.in", x)
    res, outs = invoke(stub, "affine", {"a": 3.0, "b": 0.5}, [d])
    assert res == {"count": 1000} and len(outs) == 1
    assert [a.name for a in host.allocated] == ["hello.in.affine"]
    assert outs[0].region.offset == host.allocated[0].region.offset
    np.testing.assert_array_equal(arena.read(outs[0], np.float32), x * np.float32(3.0) + np.float32(0.5))
    assert [(l.level, l.message, dict(l.attrs)) for l in host.logs] == [("info", "affine done", {"tensor": "hello.in", "count": "1000"})]


def test_errors_are_grpc_statuses_naming_the_method(hello, arena):
    _, stub, _ = hello
    with pytest.raises(grpc.RpcError) as e:
        invoke(stub, "nope")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "'nope'" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Invoke(pb.InvokeRequest(method="conformance.echo", args=b"\xc1"), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "conformance.echo" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        invoke(stub, "scale", {"factor": "big"}, [arena.put("t", np.ones(2, np.float32), pb.ACCESS_READ_WRITE)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "args.factor" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        invoke(stub, "stats")  # no tensor passed
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tensor #0" in e.value.details()
    # A descriptor past its segment's end is refused, not mapped.
    d = arena.put("hello.oob", np.ones(4, np.float32))
    d.region.offset = arena.size - 8
    with pytest.raises(grpc.RpcError) as e:
        invoke(stub, "stats", tensors=[d])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds segment" in e.value.details()
    for code, want in [("not_found", grpc.StatusCode.NOT_FOUND), ("internal", grpc.StatusCode.INTERNAL)]:
        with pytest.raises(grpc.RpcError) as e:
            invoke(stub, "conformance.fail", {"code": code, "message": "boom " + code})
        assert e.value.code() == want and "boom " + code in e.value.details() and "conformance.fail" in e.value.details()


def test_stream_and_echo(hello):
    _, stub, _ = hello
    got = [msgpack.unpackb(r.result) for r in stub.InvokeStream(pb.InvokeRequest(method="conformance.stream", args=msgpack.packb({"count": 5})), timeout=10)]
    assert got == [{"index": i} for i in range(5)]
    payload = {"s": "héllo", "n": -3, "f": 1.5, "b": b"\x00\x01\xff", "l": [1, "two"], "nil": None}
    assert invoke(stub, "conformance.echo", {"payload": payload})[0] == {"payload": payload}
    # A non-streaming method through InvokeStream yields its one result.
    assert [msgpack.unpackb(r.result) for r in stub.InvokeStream(pb.InvokeRequest(method="conformance.echo", args=msgpack.packb({"payload": 1})), timeout=10)] == [{"payload": 1}]


def test_fill_through_host(hello, arena):
    _, stub, host = hello
    res, outs = invoke(stub, "conformance.fill", {"name": "f", "count": 100, "start": 1.0, "step": 0.25})
    np.testing.assert_array_equal(arena.read(outs[0], np.float32), (1.0 + np.arange(100) * 0.25).astype(np.float32))


def test_shutdown_is_graceful_and_fast(own_hello):
    p, stub, _ = own_hello
    # An open stdio stream (go-plugin keeps one) must not delay the stop.
    stdio = stdio_grpc.GRPCStdioStub(p.channel).StreamStdio(empty_pb2.Empty())
    time.sleep(0.1)
    sock = p.addr
    t0 = time.monotonic()
    ctl_grpc.GRPCControllerStub(p.channel).Shutdown(ctl_pb.Empty(), timeout=5)
    rc = p.proc.wait(timeout=5)
    took = time.monotonic() - t0
    assert rc == 0, p.stderr()
    assert took < 0.5, f"shutdown took {took:.3f}s"
    assert list(stdio) == []  # the stream ended cleanly, without data
    assert not os.path.exists(sock)
    assert "stopped (shutdown requested by host)" in p.stderr()


def test_sigint_is_ignored_and_sigterm_stops(own_hello):
    p, stub, _ = own_hello
    p.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert p.proc.poll() is None
    assert stub.Describe(pb.DescribeRequest(), timeout=5).name == "hello-py"
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(timeout=5) == 0


def test_plugin_exits_when_its_parent_dies(tmp_path):
    # A launcher starts the plugin, reports its pid, then dies without killing it.
    launcher = tmp_path / "launcher.py"
    launcher.write_text(
        "import subprocess, sys, os\n"
        f"p = subprocess.Popen([sys.executable, {HELLO!r}], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)\n"
        "p.stdout.readline()\n"
        "print(p.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    r = subprocess.run([sys.executable, str(launcher)], env=plugin_env(), capture_output=True, timeout=30)
    pid = int(r.stdout.split()[0])
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"plugin {pid} outlived its parent by 3 s")
