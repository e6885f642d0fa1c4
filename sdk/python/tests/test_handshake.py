"""go-plugin handshake: version negotiation, the stdout line, the cookie check."""

import os
import subprocess
import sys

import pytest

from arenahost.server import MAGIC_COOKIE_KEY, handshake_line, negotiate_version
from conftest import EXAMPLES, HANDSHAKE_RE, plugin_env


@pytest.mark.parametrize(
    "offered, want, warns",
    [
        (None, 1, False),
        ("1", 1, False),
        ("1,2,3", 1, False),
        ("3,1", 1, False),
        ("x,1", 1, False),
        ("2", 1, True),  # no common version: announce ours, the host refuses it
        ("junk", 1, True),
    ],
)
def test_negotiate_version(offered, want, warns):
    env = {} if offered is None else {"PLUGIN_PROTOCOL_VERSIONS": offered}
    v, warn = negotiate_version(env)
    assert v == want
    assert (warn is not None) == warns
    if warns:
        assert offered in warn


def test_handshake_line_format():
    assert handshake_line(1, "unix", "/tmp/x/plugin.sock") == "1|1|unix|/tmp/x/plugin.sock|grpc"
    assert handshake_line(1, "tcp", "127.0.0.1:4242") == "1|1|tcp|127.0.0.1:4242|grpc"


def test_subprocess_prints_handshake_on_unix_socket(start_plugin):
    p = start_plugin([str(EXAMPLES / "hello_plugin.py")])
    m = HANDSHAKE_RE.match(p.line)
    assert m, p.line
    assert p.version == 1 and p.network == "unix"
    assert os.path.isabs(p.addr) and os.path.exists(p.addr)
    assert len(p.addr.encode()) < 104


def test_socket_dir_honours_plugin_unix_socket_dir(start_plugin, tmp_path):
    p = start_plugin([str(EXAMPLES / "hello_plugin.py")], {"PLUGIN_UNIX_SOCKET_DIR": str(tmp_path)})
    assert p.addr.startswith(str(tmp_path) + os.sep)


def test_wrong_protocol_version_is_announced_for_the_host_to_refuse(start_plugin):
    p = start_plugin([str(EXAMPLES / "hello_plugin.py")], {"PLUGIN_PROTOCOL_VERSIONS": "2"})
    assert p.version == 1


@pytest.mark.parametrize("cookie", [None, "wrong"])
def test_missing_cookie_exits_1_with_message(cookie):
    env = plugin_env()
    env.pop(MAGIC_COOKIE_KEY)
    if cookie:
        env[MAGIC_COOKIE_KEY] = cookie
    r = subprocess.run([sys.executable, str(EXAMPLES / "hello_plugin.py")], env=env, capture_output=True, timeout=30)
    assert r.returncode == 1
    assert r.stdout == b""
    assert b"not meant to be run directly" in r.stderr and MAGIC_COOKIE_KEY.encode() in r.stderr


def test_automtls_request_is_refused_clearly():
    env = plugin_env({"PLUGIN_CLIENT_CERT": "-----BEGIN CERTIFICATE-----\n"})
    r = subprocess.run([sys.executable, str(EXAMPLES / "hello_plugin.py")], env=env, capture_output=True, timeout=30)
    assert r.returncode == 1
    assert b"AutoMTLS" in r.stderr
