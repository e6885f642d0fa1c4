package server

import "strconv"

// The variables every plugin process gets from its host (plugin.Config's
// ChildEnv), so a plugin follows the host's --arena-device and never
// guesses: one host per device, and everything it starts on that device.
const (
	// EnvArenaBackend is the host's arena backend: cpu, cuda or cuda-sim.
	EnvArenaBackend = "ARENAHOST_ARENA_BACKEND"
	// EnvDevice is the host's device ordinal (--arena-device), numbered as
	// the host sees devices: the host's CUDA_VISIBLE_DEVICES is passed on
	// unchanged, so the ordinal in every descriptor and this one agree.
	EnvDevice = "ARENAHOST_DEVICE"
	// EnvTorchDevice is the torch device a Python pipeline computes on:
	// "cuda:N" on the cuda backend, "cpu" otherwise (cuda-sim's memory is
	// host memory).
	EnvTorchDevice = "ARENAHOST_TORCH_DEVICE"
)

// DeviceEnv is the environment ("KEY=VALUE") a host on backend and device
// gives its plugins.
func DeviceEnv(backend string, device int) []string {
	if backend == "" {
		backend = BackendCPU
	}
	torch := "cpu"
	if backend == BackendCUDA {
		torch = "cuda:" + strconv.Itoa(device)
	}
	return []string{
		EnvArenaBackend + "=" + backend,
		EnvDevice + "=" + strconv.Itoa(device),
		EnvTorchDevice + "=" + torch,
	}
}
