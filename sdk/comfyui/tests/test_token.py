"""A host with a token: the nodes send it on mutating calls (node input or $ARENAHOST_TOKEN); without it, a node error says so."""

import pytest

from conftest import Host

KOHYA = "flux-sample-kohya-lora"


@pytest.fixture()
def token_host(tmp_path):
    h = Host(tmp_path / "data", args=["--token", "s3cret-token"]).start()
    yield h
    h.stop()


def test_token_from_input_and_env(token_host, monkeypatch):
    from arenahost_comfyui.client import ArenahostError
    from arenahost_comfyui.nodes import LoadNF4ModelArenahost, LoRAArenahost

    monkeypatch.delenv("ARENAHOST_TOKEN", raising=False)
    m = LoadNF4ModelArenahost().load("sample", host_url=token_host.url)["result"][0]  # reads need no token
    with pytest.raises(ArenahostError) as e:
        LoRAArenahost().apply(m, "side", lora_1=KOHYA, strength_1=0.5)
    assert e.value.status == 401 and "token" in str(e.value).lower(), str(e.value)
    assert token_host.get("/v1/loras/state?model=sample")["loras"] == []

    m = LoadNF4ModelArenahost().load("sample", host_url=token_host.url, token="s3cret-token")["result"][0]
    out = LoRAArenahost().apply(m, "side", lora_1=KOHYA, strength_1=0.5)
    assert any("matched 32 keys" in t for t in out["ui"]["text"]), out["ui"]["text"]

    monkeypatch.setenv("ARENAHOST_TOKEN", "s3cret-token")
    m = LoadNF4ModelArenahost().load("sample", host_url=token_host.url)["result"][0]
    LoRAArenahost().apply(m, "side", lora_1=KOHYA, strength_1=0.25)
    assert token_host.get("/v1/loras/state?model=sample")["loras"][0]["strength"] == 0.25
