// Package registry owns the host's tensor registry: the models loaded into the
// arena, each with its stored tensors (name, dtype, shape, arena region) and
// one entry per bitsandbytes 4-bit weight holding its quantization info and
// the regions of its side tensors. It loads safetensors checkpoints into the
// arena atomically (on any error everything allocated for the load is freed
// and nothing is registered), writes models back byte for byte, and turns
// tensors into protocol descriptors.
package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/shared/checkpoint"
	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// Memory is what the registry needs from the arena to hold tensors.
// *arena.Arena satisfies it. Bytes fails with arena.ErrNoHostView on
// memory the host cannot map (a device arena); the registry then moves
// bytes with Read and Write.
type Memory interface {
	Alloc(owner arena.Owner, name string, n uint64) (arena.Region, error)
	Free(r arena.Region) error
	Bytes(r arena.Region) ([]byte, error)
	Read(r arena.Region, off uint64, p []byte) error
	Write(ctx context.Context, r arena.Region, off uint64, p []byte) error
}

// Errors the registry returns, wrapped with the model and tensor names.
var (
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already loaded")
)

// Format names how a checkpoint stores its weights.
type Format string

// Formats a model can have. A checkpoint with bitsandbytes 4-bit weights is
// "bnb-<type>" with " nested" when every 4-bit weight has nested absmax;
// mixed checkpoints say so.
const (
	FormatSafetensors  Format = "safetensors"
	FormatBnbNF4       Format = "bnb-nf4"
	FormatBnbNF4Nested Format = "bnb-nf4 nested"
	FormatBnbFP4       Format = "bnb-fp4"
	FormatBnbFP4Nested Format = "bnb-fp4 nested"
)

// Tensor is one stored tensor of a model, as the checkpoint holds it: for a
// 4-bit weight that is the packed codes (Quant set) and, as separate tensors,
// its side tensors (QuantOf set).
type Tensor struct {
	Name  string
	DType safetensors.DType // storage dtype
	Shape []int64           // storage shape
	// Region holds the bytes; the zero Region for an empty tensor (NBytes 0),
	// which needs no memory.
	Region arena.Region
	NBytes uint64
	// Quant is set on the packed tensor of a 4-bit weight.
	Quant *QuantWeight
	// QuantOf names the 4-bit weight a side tensor (absmax, quant_map,
	// nested_*, quant-state JSON) belongs to; empty otherwise.
	QuantOf string

	// crc is the CRC-32C of the bytes the load wrote (LoadCRC).
	crc uint32
}

// LoadCRC is the CRC-32C of the bytes the load wrote into the tensor's
// region, taken as they were copied: what the region holds for as long as
// nothing has written it since (the LoRA journal, the only writer of model
// tensors, knows which it has), without reading the region back, which on
// a device arena is a download.
func (t *Tensor) LoadCRC() uint32 { return t.crc }

// QuantWeight is one bitsandbytes 4-bit weight: its quant state and its
// tensors. Nested fields are nil when the weight is not nested.
type QuantWeight struct {
	Name  string         // the weight's key, "X.weight"
	State nf4.QuantState // quant type, blocksize, logical dtype and shape, nested info
	Packed,
	Absmax,
	QuantMap,
	NestedAbsmax,
	NestedQuantMap,
	StateJSON *Tensor
}

// Model is a loaded checkpoint. A registered Model is never modified; treat
// every field (and the tensors it points to) as read-only.
type Model struct {
	Name   string
	Source string // the file or folder it was loaded from
	Format Format
	// Layout is the architecture and naming shared/layout detected from the
	// tensor names ("flux-bfl", "flux-diffusers", "sdxl", "sd15"); empty
	// when none matched. LayoutPrefix is the key prefix in front of the
	// model's module paths ("model.diffusion_model." in Forge files).
	Layout       string
	LayoutPrefix string
	// Variant names the Flux-family model its layers say it is ("chroma",
	// "flux.1-dev", …; empty for other layouts), Container how it is
	// packaged ("file", "model-folder", "pipeline-folder").
	Variant   string
	Container string
	// Components are the models the checkpoint holds beside the diffusion
	// model (a single file's bundled encoders and VAE, a pipeline folder's
	// text_encoder*/ and vae/: checkpoint.OpenModel), Notes what of a
	// pipeline folder was left out and why.
	Components []checkpoint.Component
	Notes      []string
	// Metadata is the checkpoint's __metadata__ (nil when it had none).
	Metadata map[string]string
	// Tensors are every stored tensor, sorted by name.
	Tensors []*Tensor
	// Weights are the 4-bit weights, sorted by name.
	Weights []*QuantWeight
	// Bytes is the sum of the stored tensors' sizes.
	Bytes uint64

	byName   map[string]*Tensor
	weights  map[string]*QuantWeight
	lifetime sync.RWMutex // readers hold it while they use region bytes; Unload takes it to free
	// source is the file the model was loaded from, mapped read-only until
	// Unload or DetachSource (nil after); guarded by lifetime.
	source *safetensors.Set
}

// SourceRef is where a stored tensor's bytes lie in the file its model was
// loaded from (for a sharded folder, the shard that holds the tensor).
type SourceRef struct {
	File   string // the file (shard) that holds the tensor
	Tensor string
	Offset int64 // from the start of the file
	Length int64
}

// SourceOf returns where tensor name's bytes lie in the model's source
// file; ok is false when the model holds no source file (DetachSource) or
// the tensor is empty or unknown. The caller must hold the model's write
// lock (WriteLocked) or otherwise keep it from being unloaded.
func (m *Model) SourceOf(name string) (ref SourceRef, ok bool) {
	if m.source == nil {
		return SourceRef{}, false
	}
	info, ok := m.source.Lookup(name)
	if !ok || info.End <= info.Begin {
		return SourceRef{}, false
	}
	f, _ := m.source.FileOf(name)
	return SourceRef{File: f.Path, Tensor: name, Offset: f.DataStart + info.Begin, Length: info.End - info.Begin}, true
}

// SourceUnchanged reports whether the model's source file is still the
// file it was loaded from, with the size and modification times it had
// (safetensors.File.Unchanged): then its bytes are the ones the load
// copied. False when it was written, retimed or renamed over since, or the
// model holds no source file. Timestamps are as fine as the filesystem
// keeps them; whoever restores from the file checksums what it reads.
func (m *Model) SourceUnchanged() bool { return m.source != nil && m.source.Unchanged() }

// ReadSource copies len(p) bytes of ref's tensor, from byte off of the
// tensor, out of the source file as its mapping shows them now: the file
// the model was loaded from even if another was renamed over its path
// since, but with any in-place write to that file (checksum what you read
// when that matters). A fault (the file was truncated) is an error naming
// the file and tensor. The caller must hold the model's write lock
// (WriteLocked) or otherwise keep it from being unloaded.
func (m *Model) ReadSource(ref SourceRef, off int64, p []byte) error {
	if m.source == nil {
		return fmt.Errorf("model %q: tensor %s: the source file %s is no longer held: %w", m.Name, ref.Tensor, ref.File, ErrNotFound)
	}
	if off < 0 || off+int64(len(p)) > ref.Length {
		return fmt.Errorf("read source %s: tensor %s: bytes [%d, %d) outside its %d bytes", ref.File, ref.Tensor, off, off+int64(len(p)), ref.Length)
	}
	f, ok := m.source.FileOf(ref.Tensor)
	if !ok || f.Path != ref.File {
		return fmt.Errorf("read source %s: tensor %s: not in the model's source %s", ref.File, ref.Tensor, m.Source)
	}
	if _, err := f.ReadAt(p, ref.Offset+off); err != nil {
		return fmt.Errorf("read source %s: tensor %s: %w", ref.File, ref.Tensor, err)
	}
	return nil
}

// DetachSource closes model's source file: the registry stops holding it
// (a deleted file's disk space is released), and readers of original bytes
// (the LoRA fuse journal) fall back to copies in the arena for what they
// save afterwards. References taken before (SourceOf) stop resolving.
func (r *Registry) DetachSource(model string) error {
	m, err := r.model(model)
	if err != nil {
		return fmt.Errorf("detach source: %w", err)
	}
	m.lifetime.Lock()
	defer m.lifetime.Unlock()
	return m.closeSource()
}

func (m *Model) closeSource() error {
	if m.source == nil {
		return nil
	}
	f := m.source
	m.source = nil
	if err := f.Close(); err != nil {
		return fmt.Errorf("model %q: close source %s: %w", m.Name, m.Source, err)
	}
	return nil
}

// Tensor returns the stored tensor called name.
func (m *Model) Tensor(name string) (*Tensor, bool) {
	t, ok := m.byName[name]
	return t, ok
}

// Weight returns the 4-bit weight called name ("X.weight").
func (m *Model) Weight(name string) (*QuantWeight, bool) {
	w, ok := m.weights[name]
	return w, ok
}

// Params returns the model's logical parameter count: the elements of its
// plain tensors plus the logical elements of its 4-bit weights (side tensors
// excluded).
func (m *Model) Params() int64 {
	var n int64
	for _, t := range m.Tensors {
		switch {
		case t.Quant != nil:
			n += t.Quant.State.Numel()
		case t.QuantOf == "":
			n += safetensors.TensorInfo{DType: t.DType, Shape: t.Shape}.NumElements()
		}
	}
	return n
}

// LogValue logs the model's summary.
func (m *Model) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("name", m.Name), slog.String("source", m.Source),
		slog.String("format", string(m.Format)), slog.String("layout", m.Layout),
		slog.Int("tensors", len(m.Tensors)), slog.Int("weights4bit", len(m.Weights)),
		slog.Any("bytes", arena.ByteSize(m.Bytes)))
}

// Registry holds the loaded models. All methods are safe for concurrent use.
type Registry struct {
	mem Memory
	log *slog.Logger

	mu      sync.RWMutex
	models  map[string]*Model
	pending map[string]bool // names of loads in progress
}

// New returns an empty registry whose tensors live in mem. A nil logger
// means slog.Default().
func New(mem Memory, logger *slog.Logger) *Registry {
	if logger == nil {
		logger = slog.Default()
	}
	return &Registry{mem: mem, log: logger, models: map[string]*Model{}, pending: map[string]bool{}}
}

// Model returns the model registered under name.
func (r *Registry) Model(name string) (*Model, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	m, ok := r.models[name]
	return m, ok
}

// Models returns the registered models sorted by name.
func (r *Registry) Models() []*Model {
	r.mu.RLock()
	out := make([]*Model, 0, len(r.models))
	for _, m := range r.models {
		out = append(out, m)
	}
	r.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (r *Registry) model(name string) (*Model, error) {
	m, ok := r.Model(name)
	if !ok {
		return nil, fmt.Errorf("model %q: %w", name, ErrNotFound)
	}
	return m, nil
}

// Tensor returns the stored tensor name of model.
func (r *Registry) Tensor(model, name string) (*Tensor, error) {
	m, err := r.model(model)
	if err != nil {
		return nil, err
	}
	t, ok := m.byName[name]
	if !ok {
		return nil, fmt.Errorf("model %q: tensor %q: %w", model, name, ErrNotFound)
	}
	return t, nil
}

// Tensors returns model's stored tensors whose names start with prefix,
// sorted by name ("" gives all).
func (r *Registry) Tensors(model, prefix string) ([]*Tensor, error) {
	m, err := r.model(model)
	if err != nil {
		return nil, err
	}
	i := sort.Search(len(m.Tensors), func(i int) bool { return m.Tensors[i].Name >= prefix })
	var out []*Tensor
	for ; i < len(m.Tensors) && strings.HasPrefix(m.Tensors[i].Name, prefix); i++ {
		out = append(out, m.Tensors[i])
	}
	return out, nil
}

// Weight returns the 4-bit weight name ("X.weight") of model.
func (r *Registry) Weight(model, name string) (*QuantWeight, error) {
	m, err := r.model(model)
	if err != nil {
		return nil, err
	}
	w, ok := m.weights[name]
	if !ok {
		return nil, fmt.Errorf("model %q: 4-bit weight %q: %w", model, name, ErrNotFound)
	}
	return w, nil
}

// Unload removes the model and frees its regions. It waits for readers of
// the model's bytes (Save, View) to finish first. Descriptors handed out for
// its tensors go stale with the regions.
func (r *Registry) Unload(name string) error {
	r.mu.Lock()
	m, ok := r.models[name]
	if ok {
		delete(r.models, name)
	}
	r.mu.Unlock()
	if !ok {
		return fmt.Errorf("unload model %q: %w", name, ErrNotFound)
	}
	m.lifetime.Lock()
	defer m.lifetime.Unlock()
	var regions []arena.Region
	for _, t := range m.Tensors {
		if t.NBytes > 0 {
			regions = append(regions, t.Region)
		}
	}
	if err := errors.Join(freeAll(r.mem, regions), m.closeSource()); err != nil {
		return fmt.Errorf("unload model %q: %w", name, err)
	}
	r.log.Info("model unloaded", slog.String("model", name), slog.Any("bytes", arena.ByteSize(m.Bytes)))
	return nil
}

// View calls fn with the bytes of model's tensor name while the model cannot
// be unloaded. fn must not keep the slice, and must not write to it unless
// the caller owns the model's write access. On a device arena the bytes are
// a copy downloaded into a temporary buffer of the tensor's size: writes
// to it do not reach the tensor.
func (r *Registry) View(model, name string, fn func(t *Tensor, b []byte) error) error {
	m, err := r.model(model)
	if err != nil {
		return err
	}
	m.lifetime.RLock()
	defer m.lifetime.RUnlock()
	if cur, ok := r.Model(model); !ok || cur != m {
		return fmt.Errorf("model %q: %w (unloaded)", model, ErrNotFound)
	}
	t, ok := m.byName[name]
	if !ok {
		return fmt.Errorf("model %q: tensor %q: %w", model, name, ErrNotFound)
	}
	b, err := r.read(t, nil)
	if err != nil {
		return fmt.Errorf("model %q: tensor %q: %w", model, name, err)
	}
	return fn(t, b)
}

func (r *Registry) bytes(t *Tensor) ([]byte, error) {
	if t.NBytes == 0 {
		return []byte{}, nil
	}
	return r.mem.Bytes(t.Region)
}

// read returns t's bytes: the host's view of them, or, on memory the host
// cannot map, a copy downloaded into scratch (grown to the tensor's size
// when shorter).
func (r *Registry) read(t *Tensor, scratch *[]byte) ([]byte, error) {
	b, err := r.bytes(t)
	if !errors.Is(err, arena.ErrNoHostView) {
		return b, err
	}
	var buf []byte
	if scratch != nil {
		buf = *scratch
	}
	if uint64(cap(buf)) < t.NBytes {
		buf = make([]byte, t.NBytes)
		if scratch != nil {
			*scratch = buf
		}
	}
	buf = buf[:t.NBytes]
	if err := r.mem.Read(t.Region, 0, buf); err != nil {
		return nil, err
	}
	return buf, nil
}

// freeAll frees every region, joining the errors.
func freeAll(mem Memory, regions []arena.Region) error {
	var errs []error
	for _, reg := range regions {
		if err := mem.Free(reg); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
