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
