"""arenahost.device: the host's device, read from the plugin's environment."""

import pytest

from arenahost import device


@pytest.mark.parametrize("env,backend,ordinal,torch_dev", [
    ({}, "cpu", 0, "cpu"),
    ({"ARENAHOST_ARENA_BACKEND": "cuda", "ARENAHOST_DEVICE": "3", "ARENAHOST_TORCH_DEVICE": "cuda:3"}, "cuda", 3, "cuda:3"),
    ({"ARENAHOST_ARENA_BACKEND": "cuda-sim", "ARENAHOST_DEVICE": "1", "ARENAHOST_TORCH_DEVICE": "cpu"}, "cuda-sim", 1, "cpu"),
])
def test_reads_the_host_choice(env, backend, ordinal, torch_dev):
    assert device.arena_backend(env) == backend
    assert device.device_ordinal(env) == ordinal
    assert device.torch_device(env) == torch_dev


@pytest.mark.parametrize("fn,env,name", [
    (device.arena_backend, {"ARENAHOST_ARENA_BACKEND": "rocm"}, "ARENAHOST_ARENA_BACKEND"),
    (device.device_ordinal, {"ARENAHOST_DEVICE": "-1"}, "ARENAHOST_DEVICE"),
    (device.device_ordinal, {"ARENAHOST_DEVICE": "one"}, "ARENAHOST_DEVICE"),
    (device.torch_device, {"ARENAHOST_TORCH_DEVICE": "cuda"}, "ARENAHOST_TORCH_DEVICE"),
    (device.torch_device, {"ARENAHOST_TORCH_DEVICE": "mps:0"}, "ARENAHOST_TORCH_DEVICE"),
])
def test_rejects_hostile_values_naming_the_variable(fn, env, name):
    with pytest.raises(ValueError, match=name):
        fn(env)


@pytest.mark.parametrize("v,n", [("12GiB", 12 << 30), ("24GB", 24 * 10**9), ("512MiB", 512 << 20), ("1048576", 1 << 20),
                                 ("1.5GiB", 3 << 29), (" 16 gib ", 16 << 30)])
def test_parse_size(v, n):
    assert device.parse_size(v) == n


@pytest.mark.parametrize("v", ["", "twelve", "-1GiB", "12XB", "0", "2PiB0"])
def test_memory_cap_rejects_hostile_values_naming_the_variable(v):
    if v == "":
        assert device.torch_memory_cap({"ARENAHOST_TORCH_MEMORY_CAP": v}) is None
        return
    with pytest.raises(ValueError, match="ARENAHOST_TORCH_MEMORY_CAP"):
        device.torch_memory_cap({"ARENAHOST_TORCH_MEMORY_CAP": v})


class _FakeCuda:
    """torch.cuda's two calls apply_torch_memory_cap makes, recorded (the real ones need a GPU)."""

    def __init__(self, total):
        self.total, self.set = total, []

    def get_device_properties(self, i):
        return type("P", (), {"total_memory": self.total})()

    def set_per_process_memory_fraction(self, frac, i):
        self.set.append((frac, i))


def test_apply_torch_memory_cap():
    fake = type("T", (), {})()
    fake.cuda = _FakeCuda(80 << 30)
    assert device.apply_torch_memory_cap({}, torch_module=fake) == "no cap" and fake.cuda.set == []
    msg = device.apply_torch_memory_cap({"ARENAHOST_TORCH_MEMORY_CAP": "12GiB"}, torch_module=fake)
    assert "not applied" in msg and "cpu" in msg and fake.cuda.set == []
    env = {"ARENAHOST_TORCH_MEMORY_CAP": "20GiB", "ARENAHOST_TORCH_DEVICE": "cuda:2"}
    assert "fraction 0.2500" in device.apply_torch_memory_cap(env, torch_module=fake)
    assert fake.cuda.set == [(0.25, 2)]
    env["ARENAHOST_TORCH_MEMORY_CAP"] = "200GiB"  # more than the card: all of it
    device.apply_torch_memory_cap(env, torch_module=fake)
    assert fake.cuda.set[-1] == (1.0, 2)
