package api

import "time"

// ArenaStats is the body of GET /v1/arena.
type ArenaStats struct {
	Backend       string  `json:"backend"`
	Capacity      uint64  `json:"capacity"`
	Allocated     uint64  `json:"allocated"`
	Peak          uint64  `json:"peak"`
	LargestFree   uint64  `json:"largest_free"`
	Fragmentation float64 `json:"fragmentation"`
	Segments      int     `json:"segments"`
	Regions       int     `json:"regions"`
}

// Purposes of arena bytes in GET /v1/arena/usage (Usage.Purpose), read
// from the names the host gives its leases.
const (
	PurposeModel       = "model weights"
	PurposeLoRAFactors = "LoRA factors"
	PurposeJournal     = "fuse journal"
	PurposeJobs        = "job latents"
	PurposePlugin      = "plugin"
	PurposeOther       = "other"
)

// Usage is one owner's or purpose's share of the arena.
type Usage struct {
	Owner   string `json:"owner"`
	Purpose string `json:"purpose"`
	Bytes   uint64 `json:"bytes"`
	Regions int    `json:"regions"`
}

// DeviceMemory is the accelerator's own view of its memory.
type DeviceMemory struct {
	Total uint64 `json:"total"`
	Free  uint64 `json:"free"`
	Used  uint64 `json:"used"` // Total − Free: this host, its plugins and any other process
}

// ArenaUsage is the body of GET /v1/arena/usage.
type ArenaUsage struct {
	ArenaStats
	// ByOwner splits the allocated bytes by who holds them: a loaded model
	// ("model:NAME"), the host's LoRA factors, fuse journal and job
	// latents, and each plugin generation ("plugin:NAME#GEN").
	ByOwner []Usage `json:"by_owner"`
	// Device is the device's memory (device backends only).
	Device *DeviceMemory `json:"device,omitempty"`
}

// ArenaSample is one point of GET /v1/arena/history.
type ArenaSample struct {
	Time          time.Time `json:"t"`
	Allocated     uint64    `json:"allocated"`
	Peak          uint64    `json:"peak"`
	Fragmentation float64   `json:"fragmentation"`
	// DeviceUsed is the device's used memory (device backends only).
	DeviceUsed uint64 `json:"device_used,omitempty"`
}

// ArenaHistory is the body of GET /v1/arena/history.
type ArenaHistory struct {
	Backend         string        `json:"backend"`
	Capacity        uint64        `json:"capacity"`
	DeviceTotal     uint64        `json:"device_total,omitempty"`
	IntervalSeconds float64       `json:"interval_seconds"`
	Samples         []ArenaSample `json:"samples"` // oldest first
}
