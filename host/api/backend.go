package api

import (
	"context"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/job"
	"github.com/arenahost/arenahost/host/lora"
	"github.com/arenahost/arenahost/host/registry"
	v1 "github.com/arenahost/arenahost/sdk/api"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// Backend is what the HTTP layer calls: the host's parts, each behind the
// small interface of the methods routes use. host/server.Server's parts
// satisfy them (host/cli wires them); tests may put fakes behind any one.
type Backend struct {
	// Host is the composition root's own methods.
	Host
	Arena    Arena
	Registry Registry
	Plugins  Plugins
	Jobs     Jobs
	// LoRAs is nil when the host runs no LoRA coordinator (the LoRA routes
	// then answer 503 no_lora_engine).
	LoRAs LoRAs
	// DataDir, ModelsDir and LoRAsDir are the host's directories: ComfyUI's
	// files live under DataDir; request paths are confined to the other
	// two (unless Options names others).
	DataDir, ModelsDir, LoRAsDir string
}

// Host is what routes need of the composition root itself.
type Host interface {
	// Prepare opens a just-loaded model's device memory in the LoRA
	// plugin, in the background.
	Prepare(model string)
	// LookupTensors answers descriptors as the Host service gives plugins.
	LookupTensors(ctx context.Context, req *pluginv1.LookupTensorsRequest) (*pluginv1.LookupTensorsResponse, error)
	// DeviceMemory is the device's free and total memory (ok false on a
	// CPU arena).
	DeviceMemory() (free, total uint64, ok bool)
}

// Arena is the memory arena's figures.
type Arena interface {
	Stats() arena.Stats
	Leases() []arena.Lease
}

// Registry is the models in the arena.
type Registry interface {
	Models() []*registry.Model
	Model(name string) (*registry.Model, bool)
	// Load loads the model at path; opts go to checkpoint.OpenModel
	// (safetensors.Within confines a folder model's files).
	Load(ctx context.Context, name, path string, opts ...safetensors.Option) (*registry.Model, error)
	Unload(name string) error
	Tensors(model, prefix string) ([]*registry.Tensor, error)
	View(model, name string, fn func(t *registry.Tensor, b []byte) error) error
}

// Plugins is the plugin manager.
type Plugins interface {
	Status() []v1.PluginStatus
	PluginStatus(name string) (v1.PluginStatus, error)
	Swap(ctx context.Context, name string) error
	Rescan(ctx context.Context) (v1.RescanResult, error)
	Logs(name string, n int) ([]v1.LogLine, error)
}

// Jobs is the job manager.
type Jobs interface {
	Create(ctx context.Context, spec v1.JobSpec) (*job.Job, error)
	Get(id string) (*job.Job, error)
	List() []*job.Job
	Current() *job.Job
	Subscribe(jobID string, buffer int) *job.Subscription
	// Done is closed when the manager shuts down.
	Done() <-chan struct{}
}

// LoRAs is the LoRA coordinator.
type LoRAs interface {
	Apply(ctx context.Context, req lora.Request) (*v1.LoRAResult, error)
	Remove(ctx context.Context, model string) (*v1.LoRAResult, error)
	State(model string) (v1.LoRAState, error)
	// Forget frees an unloaded model's factors and journal.
	Forget(model string)
}
