package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"time"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/shared/checkpoint"
	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/tensor"
)

// copyChunk bounds the bytes copied between two cancellation checks.
var copyChunk = 16 << 20

// Load maps the model at path (a safetensors file, or a diffusers model or
// pipeline folder whose shards are each mapped in place:
// safetensors.OpenSet), validates it (the safetensors
// header, every tensor's dtype, and the bitsandbytes 4-bit layout of each
// quantized weight), copies each stored tensor from the mapping into its own
// arena region, and registers the result as model name. The file is streamed
// through the mapping: no tensor is copied onto the Go heap. On memory the
// host cannot map (a device arena), each tensor is streamed from the file
// into its region with the arena's WriteFrom, which reads the mapping
// (fault-guarded) straight into the device's bounded staging buffer and
// uploads from there: one host copy per chunk. Memory without WriteFrom
// gets the tensor through one buffer of at most 16 MiB for the whole load
// and its Write (two host copies on a device that stages). Either way host
// memory stays bounded whatever the tensor's size.
//
// The registry keeps the file mapped read-only for the model's lifetime
// (until Unload or DetachSource), so the original bytes of every tensor
// can be read back (Model.ReadSource) without a copy in the arena: a file
// renamed over the path does not change what the mapping shows, while an
// in-place write to the file does, which is why readers checksum.
//
// Load is atomic: on any error, including cancellation of ctx and an arena
// that is full, every region allocated for this load is freed and nothing is
// registered. The error names the file and, where one is at fault, the key.
//
// opts go to checkpoint.OpenModel: safetensors.Within(modelsDir) confines
// every file a folder model opens (shards, component folders, config and
// index files) to the models folder, symlinks resolved.
func (r *Registry) Load(ctx context.Context, name, path string, opts ...safetensors.Option) (*Model, error) {
	if name == "" {
		return nil, fmt.Errorf("load %s: empty model name", path)
	}
	r.mu.Lock()
	if _, ok := r.models[name]; ok || r.pending[name] {
		r.mu.Unlock()
		return nil, fmt.Errorf("load model %q from %s: %w", name, path, ErrExists)
	}
	r.pending[name] = true
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.pending, name)
		r.mu.Unlock()
	}()

	start := time.Now()
	m, err := r.load(ctx, name, path, opts)
	if err != nil {
		return nil, fmt.Errorf("load model %q: %w", name, err)
	}
	r.mu.Lock()
	r.models[name] = m
	r.mu.Unlock()
	took := time.Since(start)
	r.log.Info("model loaded", slog.Any("model", m), slog.Duration("took", took),
		slog.Float64("MiB/s", float64(m.Bytes)/(1<<20)/took.Seconds()))
	return m, nil
}

func (r *Registry) load(ctx context.Context, name, path string, opts []safetensors.Option) (m *Model, err error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	// A pipeline folder's text encoders and VAE come with its transformer
	// (mapped in place, under the prefixes a bundled file uses).
	f, notes, err := checkpoint.OpenModel(path, opts...)
	if err != nil {
		return nil, err
	}
	// The mappings stay open for the model's lifetime (Model.ReadSource):
	// it is closed here only when the load fails.
	defer func() {
		if err != nil {
			_ = f.Close()
		}
	}()

	meta := make(map[string]nf4.TensorMeta, len(f.Tensors))
	names := make([]string, 0, len(f.Tensors))
	for _, t := range f.Tensors {
		if _, err := tensor.ParseDType(string(t.DType)); err != nil {
			return nil, fmt.Errorf("%s: tensor %s: dtype %s cannot be held in the registry (no protocol dtype)", path, t.Name, t.DType)
		}
		meta[t.Name] = nf4.TensorMeta{DType: string(t.DType), Shape: t.Shape}
		names = append(names, t.Name)
	}
	// The 4-bit layout is validated before anything is allocated; it reads
	// only the small side tensors (quant-state JSON, quant maps).
	weights, _, err := nf4.GroupWeights(path, meta, func(key string) ([]byte, error) {
		info, ok := f.Lookup(key)
		if !ok {
			return nil, fmt.Errorf("no tensor %q", key)
		}
		b := make([]byte, info.End-info.Begin)
		if err := f.CopyTensor(b, info); err != nil {
			return nil, err
		}
		return b, nil
	})
	if err != nil {
		return nil, err
	}
	if err := checkQuantFinite(path, f, weights); err != nil {
		return nil, err
	}

	m = &Model{
		Name:     name,
		Source:   path,
		source:   f,
		Format:   formatOf(weights),
		Metadata: f.Metadata,
		byName:   make(map[string]*Tensor, len(f.Tensors)),
		weights:  make(map[string]*QuantWeight, len(weights)),
	}
	// The layout, the Flux-family variant, and a diffusers folder's
	// config.json checked against the weights (a disagreeing config is
	// refused before anything is allocated).
	desc, err := checkpoint.Describe(f, weights)
	if err != nil {
		return nil, err
	}
	if desc.LayoutError == "" {
		m.Layout, m.LayoutPrefix = desc.Layout.Layout.String(), desc.Layout.Prefix
	} else {
		r.log.Debug("no known layout", slog.String("file", path), slog.Any("error", desc.LayoutError))
	}
	m.Variant, m.Container, m.Components, m.Notes = desc.Variant, string(desc.Container), desc.Components, notes

	var regions []arena.Region
	var buf []byte // the streaming buffer for unmapped memory
	defer func() {
		if err == nil {
			return
		}
		if ferr := freeAll(r.mem, regions); ferr != nil {
			r.log.Error("free regions of a failed load", slog.String("file", path), slog.Any("error", ferr))
			err = errors.Join(err, fmt.Errorf("free regions of the failed load: %w", ferr))
		}
		m = nil
	}()

	_ = f.AdviseSequential()         // only read-ahead advice
	for _, info := range f.Tensors { // data order: the mapping is read front to back
		t := &Tensor{Name: info.Name, DType: info.DType, Shape: info.Shape, NBytes: uint64(info.End - info.Begin)}
		if t.NBytes > 0 {
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("%s: tensor %s: %w", path, info.Name, err)
			}
			reg, err := r.mem.Alloc(arena.HostOwner, name+"/"+info.Name, t.NBytes)
			if err != nil {
				return nil, fmt.Errorf("%s: tensor %s: %w", path, info.Name, err)
			}
			regions = append(regions, reg)
			t.Region = reg
			shard, _ := f.FileOf(info.Name) // the file of a sharded folder that holds it
			dst, err := r.mem.Bytes(reg)
			switch {
			case err == nil:
				t.crc, err = copyTensor(ctx, dst, shard, info)
			case errors.Is(err, arena.ErrNoHostView):
				t.crc, err = streamTensor(ctx, r.mem, reg, shard, info, &buf)
			}
			if err != nil {
				return nil, fmt.Errorf("%s: tensor %s: %w", path, info.Name, err)
			}
		}
		m.Tensors = append(m.Tensors, t)
		m.byName[t.Name] = t
		m.Bytes += t.NBytes
	}
	sort.Slice(m.Tensors, func(i, j int) bool { return m.Tensors[i].Name < m.Tensors[j].Name })

	for _, w := range weights {
		qw := &QuantWeight{
			Name:           w.Name,
			State:          w.State,
			Packed:         m.byName[w.Keys.Weight],
			Absmax:         m.byName[w.Keys.Absmax],
			QuantMap:       m.byName[w.Keys.QuantMap],
			NestedAbsmax:   m.byName[w.Keys.NestedAbsmax],
			NestedQuantMap: m.byName[w.Keys.NestedQuantMap],
			StateJSON:      m.byName[w.Keys.QuantState],
		}
		qw.Packed.Quant = qw
		for _, k := range w.Keys.All()[1:] {
			m.byName[k].QuantOf = w.Name
		}
		m.Weights = append(m.Weights, qw)
		m.weights[w.Name] = qw
	}
	return m, nil
}

// loadCRCOn lets the load benchmarks measure what the load CRC costs; off,
// LoadCRC is wrong (benchmarks only).
var loadCRCOn = true

// copyTensor copies a tensor from the mapping into dst in chunks, checking
// ctx between them, and returns the CRC-32C of what it copied (each chunk
// checksummed while it is still in cache).
func copyTensor(ctx context.Context, dst []byte, f *safetensors.File, info safetensors.TensorInfo) (uint32, error) {
	if int64(len(dst)) != info.End-info.Begin {
		return 0, fmt.Errorf("region of %d bytes for a %d-byte tensor", len(dst), info.End-info.Begin)
	}
	var crc uint32
	for off := 0; off < len(dst); off += copyChunk {
		if off > 0 {
			if err := ctx.Err(); err != nil {
				return 0, err
			}
		}
		end := min(off+copyChunk, len(dst))
		prefault(dst[off:end])
		if _, err := f.ReadAt(dst[off:end], f.DataStart+info.Begin+int64(off)); err != nil {
			return 0, err
		}
		if loadCRCOn {
			crc = updateCRC(crc, dst[off:end])
		}
	}
	return crc, nil
}

// crcReader is the file as WriteFrom reads it, checksumming each chunk
// right after reading it (before it goes up to the device): the tensor's
// CRC-32C when the reads covered it once, in order.
type crcReader struct {
	f         *safetensors.File
	next, end int64 // the offset the next read must start at; the tensor's end
	crc       uint32
	broken    bool // a read out of order: the sum is unknown
}

func (c *crcReader) ReadAt(p []byte, off int64) (int, error) {
	if off != c.next {
		c.broken = true
	}
	if !loadCRCOn {
		n, err := c.f.ReadAt(p, off)
		c.next = off + int64(n)
		return n, err
	}
	// The file's mapping is read, and checksummed, in parallel pieces.
	crc, err := ReadCRC(c.crc, p, off, func(q []byte, o int64) error {
		_, err := c.f.ReadAt(q, o)
		return err
	})
	if err != nil {
		c.broken = true
		return 0, err
	}
	c.crc, c.next = crc, off+int64(len(p))
	return len(p), nil
}

func (c *crcReader) sum() (uint32, error) {
	if c.broken || c.next != c.end {
		return 0, fmt.Errorf("the tensor was not read once front to back (up to byte %d of %d)", c.next, c.end)
	}
	return c.crc, nil
}

// fillMemory is memory that fills a region straight from a reader
// ((*arena.Arena).WriteFrom): on a device arena each chunk goes from the
// file's mapping into the device's staging buffer and is uploaded from
// there, one host copy instead of two.
type fillMemory interface {
	WriteFrom(ctx context.Context, r arena.Region, off uint64, src io.ReaderAt, srcOff, n int64) error
}

// writeFromOn lets BenchmarkDeviceLoad and the tests compare WriteFrom with
// the buffer + Write path it replaces.
var writeFromOn = true

// streamTensor copies a tensor from the file into reg: with the memory's
// WriteFrom when it has one, reading the mapping through f's fault-guarded
// ReadAt (so a file truncated under the load is an error, not SIGBUS);
// otherwise with its Write, in chunks of at most copyChunk bytes through
// *buf (made on first use). ctx is checked between chunks. It returns the
// CRC-32C of the bytes it wrote.
func streamTensor(ctx context.Context, mem Memory, reg arena.Region, f *safetensors.File, info safetensors.TensorInfo, buf *[]byte) (uint32, error) {
	n := uint64(info.End - info.Begin)
	if reg.Length != n {
		return 0, fmt.Errorf("region of %d bytes for a %d-byte tensor", reg.Length, n)
	}
	if fm, ok := mem.(fillMemory); ok && writeFromOn {
		cr := &crcReader{f: f, next: f.DataStart + info.Begin, end: f.DataStart + info.End}
		if err := fm.WriteFrom(ctx, reg, 0, cr, f.DataStart+info.Begin, int64(n)); err != nil {
			return 0, err
		}
		return cr.sum()
	}
	if want := min(n, uint64(copyChunk)); uint64(len(*buf)) < want {
		*buf = make([]byte, want)
	}
	var crc uint32
	for off := uint64(0); off < n; {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		chunk := (*buf)[:min(n-off, uint64(len(*buf)))]
		if _, err := f.ReadAt(chunk, f.DataStart+info.Begin+int64(off)); err != nil {
			return 0, err
		}
		crc = updateCRC(crc, chunk)
		if err := mem.Write(ctx, reg, off, chunk); err != nil {
			return 0, err
		}
		off += uint64(len(chunk))
	}
	return crc, nil
}

// formatOf names the checkpoint format from its 4-bit weights.
func formatOf(weights []nf4.Weight) Format {
	if len(weights) == 0 {
		return FormatSafetensors
	}
	types := map[nf4.QuantType]bool{}
	nested := 0
	for _, w := range weights {
		types[w.State.QuantType] = true
		if w.State.Nested {
			nested++
		}
	}
	f := "bnb-" + string(weights[0].State.QuantType)
	if len(types) > 1 {
		f = "bnb-nf4+fp4"
	}
	switch {
	case nested == len(weights):
		f += " nested"
	case nested > 0:
		f += " partly nested"
	}
	return Format(f)
}

// Save writes model's stored tensors and metadata to path as safetensors,
// atomically (temporary file and rename). A model loaded from a file the
// reference writer produced (Python safetensors, so bitsandbytes'
// checkpoints) is written back byte for byte; metadata keys are written
// sorted, so a file with several metadata keys may differ in their order.
// On a device arena each tensor is downloaded in turn into one host buffer
// (the largest tensor's size) and written from it.
func (r *Registry) Save(ctx context.Context, model, path string) error {
	m, err := r.model(model)
	if err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	m.lifetime.RLock()
	defer m.lifetime.RUnlock()
	if cur, ok := r.Model(model); !ok || cur != m {
		return fmt.Errorf("save %s: model %q: %w (unloaded)", path, model, ErrNotFound)
	}
	infos := make([]safetensors.TensorInfo, len(m.Tensors))
	for i, t := range m.Tensors {
		infos[i] = safetensors.TensorInfo{Name: t.Name, DType: t.DType, Shape: t.Shape}
	}
	fw, err := safetensors.Create(path, m.Metadata, infos)
	if err != nil {
		return fmt.Errorf("save model %q: %w", model, err)
	}
	var scratch []byte
	for _, info := range fw.Layout() {
		err := ctx.Err()
		var b []byte
		if err == nil {
			b, err = r.read(m.byName[info.Name], &scratch)
		}
		if err == nil {
			err = fw.WriteTensor(info.Name, b)
		}
		if err != nil {
			fw.Abort()
			return fmt.Errorf("save model %q to %s: tensor %s: %w", model, path, info.Name, err)
		}
	}
	if err := fw.Commit(); err != nil {
		return fmt.Errorf("save model %q: %w", model, err)
	}
	return nil
}
