"""Two ComfyUI processes on one host share one copy of the weights.

A bigger sample model (`arenahost sample --hidden 768 --mlp 3072 --double 4
--single 8`: 155M parameters, ~80 MB of NF4) is loaded into the host by the
pack's loader (its load_path input). ComfyUI A runs a graph on it; ComfyUI B
first runs a graph on the small sample model (so the VAE, the sampler and
ComfyUI's lazy imports are in place), then the big model's graph: the
private memory (RssAnon) that graph adds to B is under
10 % of the model's arena bytes, while its shared-memory RSS (RssShmem) grows
by about the model's size: B computes from the host's pages, it does not copy
them. Both processes run with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_), so the per-forward dequantization's freed
temporaries go back to the system instead of staying in the heap.
"""

import shutil
import subprocess

import pytest

from conftest import Comfy, Host, graph

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def status(pid: int) -> dict:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[k] = int(v.split()[0]) * 1024
    return out


@pytest.fixture(scope="module")
def big_host(tmp_path_factory):
    d = tmp_path_factory.mktemp("bighost")
    h = Host(d / "data")
    out = d / "gen"
    subprocess.run([str(h.bin), "sample", "--out", str(out), "--hidden", "768", "--mlp", "3072", "--double", "4", "--single", "8"],
                   check=True, capture_output=True, timeout=300)
    (d / "data" / "models").mkdir(parents=True)
    shutil.move(str(out / "flux-sample-nf4.safetensors"), str(d / "data" / "models" / "flux-big-nf4.safetensors"))
    h.start()
    yield h
    h.stop()


def big_graph(url):
    g = graph(url, steps=1, size=64)
    g["1"]["inputs"].update({"model_name": "big", "load_path": "flux-big-nf4.safetensors"})
    return g


def test_second_comfyui_adds_under_10_percent(big_host, tmp_path, monkeypatch):
    for k, v in MALLOC.items():
        monkeypatch.setenv(k, v)
    a = Comfy(tmp_path / "a" / "base", big_host.url).prepare().start()
    b = Comfy(tmp_path / "b" / "base", big_host.url).prepare().start()
    try:
        ea = a.run(big_graph(big_host.url), timeout=600)
        assert ea["status"]["status_str"] == "success", ea["status"]
        size = next(m for m in big_host.get("/v1/models") if m["name"] == "big")["bytes"]
        assert size > 60 << 20
        warm = b.run(graph(big_host.url, steps=1, size=64), timeout=600)
        assert warm["status"]["status_str"] == "success", warm["status"]
        before = status(b.proc.pid)
        eb = b.run(big_graph(big_host.url), timeout=600)
        assert eb["status"]["status_str"] == "success", eb["status"]
        after = status(b.proc.pid)
        anon = after["RssAnon"] - before["RssAnon"]
        shm = after["RssShmem"] - before["RssShmem"]
        print(f"model {size} B; second ComfyUI: RssAnon +{anon} B ({anon / size:.1%}), RssShmem +{shm} B ({shm / size:.1%}), "
              f"VmRSS {before['VmRSS']} -> {after['VmRSS']}; first ComfyUI now {status(a.proc.pid)}")
        assert anon < 0.10 * size, f"second ComfyUI added {anon} private bytes, {anon / size:.1%} of the model's {size}"
        assert shm > 0.9 * size, f"second ComfyUI's shared RSS grew {shm} bytes: it did not compute from the arena's pages"
    finally:
        a.stop()
        b.stop()
