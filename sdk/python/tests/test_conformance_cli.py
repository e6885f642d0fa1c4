"""`python -m arenahost.conformance PLUGIN_DIR`: the conformance suite without Go, on real plugin processes."""

import os
import subprocess
import sys
import textwrap

from conftest import EXAMPLES, SDK


def run_cli(plugin_dir, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SDK) + os.pathsep + env.get("PYTHONPATH", "")
    env["ARENAHOST_PYTHON"] = sys.executable
    r = subprocess.run([sys.executable, "-m", "arenahost.conformance", str(plugin_dir)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def write_plugin(tmp_path, body):
    (tmp_path / "plugin.json").write_text(
        '{"name": "bad-py", "version": "0.1.0", "kind": "other", "language": "python",'
        ' "command": "${ARENAHOST_PYTHON}", "args": ["-u", "p.py"], "protocol_version": 1}')
    (tmp_path / "p.py").write_text(textwrap.dedent(body))
    return tmp_path


def test_example_passes():
    rc, out = run_cli(EXAMPLES)
    assert rc == 0, out
    for check in ("health", "describe", "input tensor read in place", "input tensor written in place", "host allocate",
                  "stream", "error codes", "shutdown"):
        assert f"ok   {check}" in out, out
    assert "FAIL" not in out


def test_wrong_sum_fails_that_check(tmp_path):
    write_plugin(tmp_path, """
        from arenahost import Plugin
        plugin = Plugin("bad-py", "0.1.0", kind="other")
        del plugin.methods["conformance.sum"]

        @plugin.method("conformance.sum")
        def wrong_sum(call, args):
            x = call.array(0)
            return {"sum": float(x.sum(dtype="float64")) + 1, "count": int(x.size)}

        if __name__ == "__main__":
            plugin.serve()
    """)
    rc, out = run_cli(tmp_path)
    assert rc == 1, out
    assert "FAIL input tensor read in place: sum" in out, out
    assert "ok   echo" in out and "ok   shutdown" in out, out


def test_missing_conformance_methods_fail_describe(tmp_path):
    write_plugin(tmp_path, """
        from arenahost import Plugin
        plugin = Plugin("bad-py", "0.1.0", kind="other", conformance=False)

        @plugin.method()
        def hello(call, args):
            return {}

        if __name__ == "__main__":
            plugin.serve()
    """)
    rc, out = run_cli(tmp_path)
    assert rc == 1 and "FAIL describe: conformance methods missing" in out, out


def test_syntax_error_is_a_failed_start(tmp_path):
    write_plugin(tmp_path, "def broken(:\n    pass\n")
    rc, out = run_cli(tmp_path)
    assert rc == 2 and "FAIL start: handshake: the plugin exited" in out, out
    assert "SyntaxError" in out, out


def test_no_manifest(tmp_path):
    rc, out = run_cli(tmp_path)
    assert rc == 2 and "plugin.json" in out, out
