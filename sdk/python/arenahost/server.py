"""Serving an arenahost plugin from Python: go-plugin's side of the handshake.

A plugin is a :class:`Plugin` with methods registered by decorator::

    plugin = Plugin("hello", "0.1.0", kind="other")

    @plugin.method("scale", description="multiply a tensor in place")
    def scale(call, args):
        x = call.array(0, writable=True)
        x *= args["factor"]
        return {"sum": float(x.sum())}

    if __name__ == "__main__":
        plugin.serve()

:func:`serve` does what hashicorp/go-plugin (v1.8.0) expects of a non-Go
plugin: it checks the magic cookie, negotiates the protocol version from
``PLUGIN_PROTOCOL_VERSIONS``, listens on a Unix socket in a private temp dir
(TCP 127.0.0.1:0 as a fallback), prints ``1|VERSION|unix|PATH|grpc`` on
stdout, and then serves, next to the arenahost Plugin service:

* ``grpc.health.v1.Health``: service ``plugin`` is SERVING;
* ``plugin.GRPCController/Shutdown``: a graceful stop, the process exits at
  once (otherwise go-plugin waits 2 s and SIGKILLs);
* ``plugin.GRPCStdio/StreamStdio``: an empty stream; after the handshake the
  process's stdout is redirected to stderr, which the host re-logs under the
  plugin's name.

Logging goes to stderr as hclog JSON lines. SIGINT is ignored (as Go plugins
do); SIGTERM, a Shutdown call, the parent's death (polled) or EOF on the
lifeline fd named in ``ARENAHOST_LIFELINE_FD`` stop the plugin.

Method handlers run on gRPC worker threads as ``fn(call, args)`` where args
is the msgpack-decoded argument (None when empty) and ``call`` a
:class:`Call`. They return a msgpack-encodable value or a :class:`Result`
(value plus output descriptors); streaming handlers are generators. An
exception becomes a gRPC error naming the plugin and method:
INVALID_ARGUMENT for :class:`InvalidArgument`, ValueError and bad
descriptors, the exception's own ``code`` for :class:`PluginError`,
INTERNAL (with the traceback on stderr) for anything else.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import grpc
import msgpack
import numpy as np

from arenahost._goplugin import grpc_controller_pb2 as ctl_pb
from arenahost._goplugin import grpc_controller_pb2_grpc as ctl_grpc
from arenahost._goplugin import grpc_stdio_pb2_grpc as stdio_grpc
from arenahost._goplugin import health_pb2 as health_pb
from arenahost._goplugin import health_pb2_grpc as health_grpc
from arenahost.host import HostClient, HostError, pack
from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.plugin.v1 import plugin_pb2_grpc as pbg
from arenahost.tensor import DescriptorError, Mapper, default_mapper

__all__ = [
    "Plugin",
    "Call",
    "Result",
    "PluginError",
    "InvalidArgument",
    "get_arg",
    "serve",
    "negotiate_version",
    "handshake_line",
    "MAGIC_COOKIE_KEY",
    "MAGIC_COOKIE_VALUE",
    "PROTOCOL_VERSION",
    "KINDS",
]

# Must match shared/wire.Handshake.
MAGIC_COOKIE_KEY = "ARENAHOST_PLUGIN"
MAGIC_COOKIE_VALUE = "arenahost-plugin-7f3c1e2a"
PROTOCOL_VERSION = 1
CORE_PROTOCOL_VERSION = 1  # go-plugin's own handshake version (field 0)
SUPPORTED_VERSIONS = (PROTOCOL_VERSION,)
HEALTH_SERVICE = "plugin"  # go-plugin's GRPCServiceName
ENV_PLUGIN_NAME = "ARENAHOST_PLUGIN_NAME"
ENV_GENERATION = "ARENAHOST_PLUGIN_GENERATION"
ENV_LIFELINE_FD = "ARENAHOST_LIFELINE_FD"
KINDS = ("lora", "preview", "pipeline", "other")

log = logging.getLogger("arenahost.plugin")


class PluginError(Exception):
    """An error a handler raises on purpose; `code` becomes the gRPC status."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(PluginError):
    """Bad arguments or tensors: INVALID_ARGUMENT."""

    code = grpc.StatusCode.INVALID_ARGUMENT


_REQUIRED = object()
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", bytes: "bytes", list: "a list", dict: "a map"}


def get_arg(args: Any, name: str, kind: type, default: Any = _REQUIRED) -> Any:
    """args[name] checked against kind (int, float, str, bool, bytes, list, dict).

    A missing required field or a value of the wrong type raises
    InvalidArgument naming the field; float accepts integers too.
    """
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise InvalidArgument(f"args: want a map, got {type(args).__name__}")
    if name not in args or args[name] is None:
        if default is _REQUIRED:
            raise InvalidArgument(f"args.{name}: required")
        return default
    v = args[name]
    ok = isinstance(v, kind) and not (kind in (int, float) and isinstance(v, bool))
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v, ok = float(v), True
    if not ok:
        raise InvalidArgument(f"args.{name}: want {_KIND_NAMES.get(kind, kind.__name__)}, got {type(v).__name__} {v!r}")
    return v


@dataclass
class Result:
    """A handler's result: a msgpack-encodable value plus output descriptors."""

    value: Any = None
    tensors: Sequence[pb.TensorDescriptor] = ()


@dataclass
class _Method:
    name: str
    fn: Callable
    description: str
    streaming: bool


class Call:
    """What a handler gets besides its args: input tensors, the host, cancellation."""

    def __init__(self, plugin: "Plugin", method: str, req: pb.InvokeRequest, context: grpc.ServicerContext | None):
        self.plugin = plugin
        self.method = method
        self.call_id = req.call_id
        self.tensors: list[pb.TensorDescriptor] = list(req.tensors)
        self.context = context
        self.mapper: Mapper = plugin.mapper

    def tensor(self, key: int | str) -> pb.TensorDescriptor:
        """An input descriptor by position or by name."""
        if isinstance(key, int):
            if not 0 <= key < len(self.tensors):
                raise InvalidArgument(f"tensor #{key} not passed ({len(self.tensors)} tensors)")
            return self.tensors[key]
        for t in self.tensors:
            if t.name == key:
                return t
        raise InvalidArgument(f"tensor {key!r} not passed (have {[t.name for t in self.tensors]})")

    def array(self, key: int | str, writable: bool | None = None) -> np.ndarray:
        """Zero-copy ndarray over an input tensor (writable only if read-write)."""
        return self.mapper.map(self.tensor(key), writable)

    @property
    def host(self) -> HostClient:
        """The Host service client (raises HostError when the host offers none)."""
        return self.plugin.host

    def cancelled(self) -> bool:
        """True once the caller has gone away or the deadline passed."""
        return self.context is not None and not self.context.is_active()


class Plugin:
    """A plugin's identity and its methods."""

    def __init__(
        self,
        name: str,
        version: str,
        kind: str = "other",
        metadata: Mapping[str, str] | None = None,
        *,
        conformance: bool = True,
    ):
        """conformance=True also registers the conformance.* methods sdk/plugintest calls."""
        if not name:
            raise ValueError("plugin name is empty")
        self.name = name
        self.version = version
        self.kind = kind
        self.metadata = dict(metadata or {})
        self.methods: dict[str, _Method] = {}
        self.mapper: Mapper = default_mapper()
        self._host: HostClient | None = None
        self._host_lock = threading.Lock()
        self._on_shutdown: list[Callable[[], None]] = []
        if conformance:
            from arenahost import conformance as _conf

            _conf.register(self)

    def method(self, name: str | None = None, *, description: str = "", streaming: bool = False):
        """Decorator registering fn(call, args) as method `name` (default: the function name)."""

        def deco(fn: Callable) -> Callable:
            mname = name or fn.__name__
            if mname in self.methods:
                raise ValueError(f"plugin {self.name}: method {mname!r} registered twice")
            self.methods[mname] = _Method(mname, fn, description or (fn.__doc__ or "").strip().split("\n")[0], streaming)
            return fn

        return deco

    def on_shutdown(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Decorator: run fn (briefly) before the process exits."""
        self._on_shutdown.append(fn)
        return fn

    @property
    def host(self) -> HostClient:
        with self._host_lock:
            if self._host is None:
                self._host = HostClient.from_env(mapper=self.mapper)
            return self._host

    def set_host(self, host: HostClient | None) -> None:
        """Use this Host client instead of the one from the environment (tests)."""
        with self._host_lock:
            self._host = host

    def describe(self) -> pb.DescribeResponse:
        return pb.DescribeResponse(
            name=self.name,
            version=self.version,
            protocol_version=PROTOCOL_VERSION,
            kind=self.kind,
            # The plugin's own methods first, then the conformance.* ones.
            methods=[
                pb.MethodInfo(name=m.name, description=m.description, streaming=m.streaming)
                for m in sorted(self.methods.values(), key=lambda m: m.name.startswith("conformance."))
            ],
            metadata=self.metadata,
        )

    def serve(self, **kw) -> None:
        serve(self, **kw)


# ---------------------------------------------------------------------------
# services


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, msg: str):
    context.abort(code, msg)


class _PluginServicer(pbg.PluginServicer):
    def __init__(self, plugin: Plugin):
        self.p = plugin

    def Describe(self, request, context):
        return self.p.describe()

    def _prepare(self, request: pb.InvokeRequest, context, streaming: bool):
        m = self.p.methods.get(request.method)
        if m is None:
            _abort(
                context,
                grpc.StatusCode.UNIMPLEMENTED,
                f"plugin {self.p.name}: no method {request.method!r} (methods: {', '.join(sorted(self.p.methods)) or 'none'})",
            )
        if m.streaming and not streaming:
            _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"plugin {self.p.name}: method {m.name!r} is streaming; call it with InvokeStream",
            )
        try:
            args = msgpack.unpackb(request.args, raw=False, strict_map_key=False) if request.args else None
        except Exception as e:  # msgpack raises several exception types
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"plugin {self.p.name}: method {m.name!r}: args are not valid msgpack: {e}",
            )
        return m, args, Call(self.p, m.name, request, context)

    def _response(self, m: _Method, out: Any) -> pb.InvokeResponse:
        if isinstance(out, Result):
            return pb.InvokeResponse(result=pack(out.value), tensors=list(out.tensors))
        return pb.InvokeResponse(result=pack(out))

    def _fail(self, context, m: _Method, e: BaseException):
        where = f"plugin {self.p.name}: method {m.name!r}"
        if isinstance(e, PluginError):
            code = e.code
        elif isinstance(e, (DescriptorError, ValueError)):
            code = grpc.StatusCode.INVALID_ARGUMENT
        elif isinstance(e, HostError):
            # Host errors keep their code; no Host service at all is a precondition.
            code = e.code if e.code is not None else grpc.StatusCode.FAILED_PRECONDITION
        else:
            code = grpc.StatusCode.INTERNAL
            log.error("%s: unhandled %s", where, type(e).__name__, extra={"traceback": traceback.format_exc()})
        msg = str(e) if isinstance(e, (PluginError, DescriptorError, HostError)) else f"{type(e).__name__}: {e}"
        _abort(context, code, f"{where}: {msg}")

    def Invoke(self, request, context):
        m, args, call = self._prepare(request, context, streaming=False)
        try:
            out = m.fn(call, args)
            return self._response(m, out)
        except Exception as e:
            self._fail(context, m, e)

    def InvokeStream(self, request, context):
        m, args, call = self._prepare(request, context, streaming=True)
        try:
            out = m.fn(call, args)
            if m.streaming:
                for item in out:
                    if call.cancelled():
                        return
                    yield self._response(m, item)
            else:
                yield self._response(m, out)
        except Exception as e:
            self._fail(context, m, e)


class _Stopper:
    """The shutdown flag, plus per-stream wake-ups for long-lived streams."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""
        self._lock = threading.Lock()
        self._waiters: set[threading.Event] = set()

    def stop(self, reason: str) -> None:
        with self._lock:
            if not self.event.is_set():
                self.reason = reason
            self.event.set()
            for w in self._waiters:
                w.set()

    def block_until_done(self, context: grpc.ServicerContext) -> None:
        """Block a streaming RPC until the caller cancels or the plugin stops."""
        ev = threading.Event()
        with self._lock:
            if self.event.is_set():
                return
            self._waiters.add(ev)
        context.add_callback(ev.set)
        try:
            ev.wait()
        finally:
            with self._lock:
                self._waiters.discard(ev)


class _ControllerServicer(ctl_grpc.GRPCControllerServicer):
    def __init__(self, stopper: _Stopper):
        self.stopper = stopper

    def Shutdown(self, request, context):
        self.stopper.stop("shutdown requested by host")
        return ctl_pb.Empty()


class _StdioServicer(stdio_grpc.GRPCStdioServicer):
    """stdout is redirected to stderr (re-logged by the host), so nothing is streamed."""

    def __init__(self, stopper: _Stopper):
        self.stopper = stopper

    def StreamStdio(self, request, context):
        self.stopper.block_until_done(context)
        return
        yield  # a generator: the stream ends without data


class _HealthServicer(health_grpc.HealthServicer):
    SERVING = health_pb.HealthCheckResponse.SERVING

    def __init__(self, stopper: _Stopper):
        self.stopper = stopper

    def _status(self, service: str):
        if service not in ("", HEALTH_SERVICE, "arenahost.plugin.v1.Plugin"):
            return None
        return health_pb.HealthCheckResponse.NOT_SERVING if self.stopper.event.is_set() else self.SERVING

    def Check(self, request, context):
        st = self._status(request.service)
        if st is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb.HealthCheckResponse(status=st)

    def Watch(self, request, context):
        st = self._status(request.service)
        yield health_pb.HealthCheckResponse(status=health_pb.HealthCheckResponse.SERVICE_UNKNOWN if st is None else st)
        self.stopper.block_until_done(context)


# ---------------------------------------------------------------------------
# handshake


def negotiate_version(environ: Mapping[str, str]) -> tuple[int, str | None]:
    """The protocol version to announce, and a warning when the host offers none we speak.

    Like go-plugin's Serve: the highest common version, else our own (the host
    then refuses it with an "incompatible API version" error).
    """
    raw = environ.get("PLUGIN_PROTOCOL_VERSIONS", "")
    if not raw:
        return PROTOCOL_VERSION, None
    offered = []
    for s in raw.split(","):
        try:
            offered.append(int(s.strip()))
        except ValueError:
            continue
    common = sorted(set(offered) & set(SUPPORTED_VERSIONS), reverse=True)
    if common:
        return common[0], None
    return max(SUPPORTED_VERSIONS), (
        f"host offers protocol versions {raw!r}; this plugin speaks {list(SUPPORTED_VERSIONS)}"
    )


def handshake_line(version: int, network: str, addr: str) -> str:
    """go-plugin's handshake: CORE|APP|NETWORK|ADDR|PROTOCOL."""
    return f"{CORE_PROTOCOL_VERSION}|{version}|{network}|{addr}|grpc"


class _HclogJSON(logging.Formatter):
    _LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error", "CRITICAL": "error"}

    def format(self, record: logging.LogRecord) -> str:
        d = {
            "@level": self._LEVELS.get(record.levelname, "info"),
            "@message": record.getMessage(),
            "@module": record.name,
            "@timestamp": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="microseconds"),
        }
        tb = getattr(record, "traceback", None)
        if tb:
            d["traceback"] = tb
        if record.exc_info:
            d["traceback"] = self.formatException(record.exc_info)
        return json.dumps(d)


def _setup_logging() -> None:
    root = logging.getLogger()
    if any(getattr(h, "_arenahost", False) for h in root.handlers):
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_HclogJSON())
    h._arenahost = True  # type: ignore[attr-defined]
    root.addHandler(h)
    if root.level == logging.WARNING:
        root.setLevel(logging.INFO)


def _listen(server: grpc.Server, environ: Mapping[str, str], network: str) -> tuple[str, str, str | None]:
    """Bind the server; returns (network, addr, socket dir to remove)."""
    if network == "unix":
        base = environ.get("PLUGIN_UNIX_SOCKET_DIR") or None
        d = tempfile.mkdtemp(prefix="arenahost-plugin-", dir=base)
        path = os.path.join(d, "plugin.sock")
        if len(path.encode()) < 104:
            try:
                if server.add_insecure_port("unix:" + path):
                    return "unix", path, d
            except RuntimeError:
                pass
        shutil.rmtree(d, ignore_errors=True)
        log.warning("cannot listen on unix socket %s; falling back to tcp", path)
    port = server.add_insecure_port("127.0.0.1:0")
    if not port:
        raise RuntimeError("listen on 127.0.0.1:0 failed")
    return "tcp", f"127.0.0.1:{port}", None


def _watch_parent(stopper: _Stopper, ppid: int, interval: float) -> None:
    while not stopper.event.wait(interval):
        if os.getppid() != ppid:
            stopper.stop(f"parent process {ppid} exited")
            return


def _watch_lifeline(stopper: _Stopper, fd: int) -> None:
    try:
        os.set_inheritable(fd, False)  # children must not hold the host's lifeline open
    except OSError:
        pass
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    stopper.stop("lifeline closed")


def serve(
    plugin: Plugin,
    *,
    environ: Mapping[str, str] | None = None,
    network: str = "unix",
    max_workers: int = 8,
    grace: float = 0.2,
    parent_poll: float = 0.2,
    exit: bool = True,
) -> None:
    """Serve plugin until the host shuts it down; then exit the process (exit=False: return)."""
    env = os.environ if environ is None else environ
    _setup_logging()
    if env.get(MAGIC_COOKIE_KEY) != MAGIC_COOKIE_VALUE:
        sys.stderr.write(
            f"{plugin.name}: this is an arenahost plugin; the host starts it (environment variable "
            f"{MAGIC_COOKIE_KEY} is missing or wrong). It is not meant to be run directly.\n"
        )
        sys.stderr.flush()
        sys.exit(1)
    if env.get("PLUGIN_CLIENT_CERT"):
        sys.stderr.write(
            f"{plugin.name}: the host asked for AutoMTLS (PLUGIN_CLIENT_CERT is set), which the arenahost Python "
            "SDK does not implement; start Python plugins with AutoMTLS off (they listen on a private Unix socket)\n"
        )
        sys.stderr.flush()
        sys.exit(1)
    version, warn = negotiate_version(env)
    if warn:
        log.warning(warn)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopper = _Stopper()
    try:
        signal.signal(signal.SIGTERM, lambda *_: stopper.stop("SIGTERM"))
    except ValueError:
        pass  # not the main thread: only Shutdown and the watchers stop us

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers + 4, thread_name_prefix="arenahost-rpc"),
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
    )
    health_grpc.add_HealthServicer_to_server(_HealthServicer(stopper), server)
    ctl_grpc.add_GRPCControllerServicer_to_server(_ControllerServicer(stopper), server)
    stdio_grpc.add_GRPCStdioServicer_to_server(_StdioServicer(stopper), server)
    pbg.add_PluginServicer_to_server(_PluginServicer(plugin), server)
    net, addr, sockdir = _listen(server, env, network)
    server.start()

    ppid = os.getppid()
    if ppid > 1:
        threading.Thread(target=_watch_parent, args=(stopper, ppid, parent_poll), daemon=True, name="arenahost-parent").start()
    lifeline = env.get(ENV_LIFELINE_FD)
    if lifeline:
        try:
            threading.Thread(target=_watch_lifeline, args=(stopper, int(lifeline)), daemon=True, name="arenahost-lifeline").start()
        except ValueError:
            log.warning("%s=%r is not a file descriptor number", ENV_LIFELINE_FD, lifeline)

    out = sys.stdout
    out.write(handshake_line(version, net, addr) + "\n")
    out.flush()
    # Later stdout lines would be discarded by go-plugin: send them to stderr,
    # which the host re-logs under the plugin's name.
    try:
        os.dup2(2, 1)
    except OSError:
        pass
    log.info(
        "plugin %s %s serving on %s %s (protocol %d, generation %s)",
        plugin.name, plugin.version, net, addr, version, env.get(ENV_GENERATION, "?"),
    )

    while not stopper.event.wait(1.0):
        pass
    t0 = time.monotonic()
    stopped = server.stop(grace)
    for fn in plugin._on_shutdown:
        try:
            fn()
        except Exception:
            log.exception("on_shutdown hook failed")
    stopped.wait(grace + 0.2)
    if sockdir:
        shutil.rmtree(sockdir, ignore_errors=True)
    log.info("plugin %s stopped (%s) in %.0f ms", plugin.name, stopper.reason, (time.monotonic() - t0) * 1000)
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stderr.flush()
    if exit:
        # Skip interpreter teardown: it would join gRPC and handler threads.
        os._exit(0)
