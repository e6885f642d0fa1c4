package registry

import (
	"errors"
	"fmt"
	"sort"
	"sync"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// Factors are the LoRA side factors bound to one 4-bit weight: y += (x·Aᵀ)·Bᵀ
// with A [Rank × In] and B [Out × Rank], of DType (F32, the zero value's,
// or BF16), in host-owned arena regions.
type Factors struct {
	Weight        string // the weight key, "X.weight"
	A, B          arena.Region
	Rank, Out, In int
	DType         safetensors.DType // "" is F32
}

// FactorDType returns the factors' dtype (F32 when unset) and its element
// size, or an error for any dtype but F32 and BF16.
func (f Factors) FactorDType() (safetensors.DType, int, error) {
	switch dt := f.DType; dt {
	case "":
		return safetensors.F32, safetensors.F32.Size(), nil
	case safetensors.F32, safetensors.BF16:
		return dt, dt.Size(), nil
	}
	return "", 0, fmt.Errorf("weight %s: factor dtype %s (want F32 or BF16)", f.Weight, f.DType)
}

// Tensors describes A and B as tensors named nameA and nameB.
func (f Factors) Tensors(nameA, nameB string) ([2]*Tensor, error) {
	dt, es, err := f.FactorDType()
	if err != nil {
		return [2]*Tensor{}, err
	}
	return [2]*Tensor{
		{Name: nameA, DType: dt, Shape: []int64{int64(f.Rank), int64(f.In)}, Region: f.A, NBytes: uint64(es * f.Rank * f.In)},
		{Name: nameB, DType: dt, Shape: []int64{int64(f.Out), int64(f.Rank)}, Region: f.B, NBytes: uint64(es * f.Out * f.Rank)},
	}, nil
}

// Binding is the set of factors bound to a model's weights at once, with
// the generation that changes on every swap.
type Binding struct {
	Generation uint64
	Layers     map[string]Factors // by weight key
}

// Freer returns arena regions; *arena.Arena satisfies it.
type Freer interface {
	Free(r arena.Region) error
}

// Bindings holds, per model, the side factors bound to its weights. A
// whole binding set is swapped atomically: a reader sees either the old
// set or the new one, never a mix, and the old set's regions are freed
// only after the swap. All methods are safe for concurrent use.
type Bindings struct {
	mem Freer

	mu   sync.RWMutex
	gen  uint64
	sets map[string]*Binding
}

// NewBindings returns empty bindings whose regions are freed through mem.
func NewBindings(mem Freer) *Bindings {
	return &Bindings{mem: mem, sets: map[string]*Binding{}}
}

// Swap binds layers to model in place of its current set (an empty layers
// unbinds the model) and frees the regions of the previous set that the
// new one does not reuse. It returns the new binding generation.
func (b *Bindings) Swap(model string, layers []Factors) (uint64, error) {
	next := &Binding{Layers: make(map[string]Factors, len(layers))}
	keep := map[arena.Region]bool{}
	for _, f := range layers {
		if _, dup := next.Layers[f.Weight]; dup {
			return 0, fmt.Errorf("bind model %q: weight %s bound twice", model, f.Weight)
		}
		_, es, err := f.FactorDType()
		if err != nil {
			return 0, fmt.Errorf("bind model %q: %w", model, err)
		}
		if f.Rank <= 0 || f.Out <= 0 || f.In <= 0 || f.A.Length < uint64(es*f.Rank*f.In) || f.B.Length < uint64(es*f.Out*f.Rank) {
			return 0, fmt.Errorf("bind model %q: weight %s: factors [%d %d]·[%d %d] do not fit regions of %d and %d bytes",
				model, f.Weight, f.Out, f.Rank, f.Rank, f.In, f.B.Length, f.A.Length)
		}
		next.Layers[f.Weight] = f
		keep[f.A], keep[f.B] = true, true
	}
	b.mu.Lock()
	old := b.sets[model]
	b.gen++
	next.Generation = b.gen
	if len(layers) == 0 {
		delete(b.sets, model)
	} else {
		b.sets[model] = next
	}
	b.mu.Unlock()
	return next.Generation, b.free(old, keep)
}

func (b *Bindings) free(old *Binding, keep map[arena.Region]bool) error {
	if old == nil {
		return nil
	}
	var regs []arena.Region
	for _, f := range old.Layers {
		for _, r := range []arena.Region{f.A, f.B} {
			if !keep[r] {
				regs = append(regs, r)
			}
		}
	}
	var errs []error
	for _, r := range regs {
		if err := b.mem.Free(r); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Touch gives model's binding a new generation without changing its
// regions: their bytes were rewritten in place (a strength change).
func (b *Bindings) Touch(model string) uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	cur := b.sets[model]
	if cur == nil {
		return 0
	}
	b.gen++
	nb := &Binding{Generation: b.gen, Layers: cur.Layers}
	b.sets[model] = nb
	return nb.Generation
}

// Get returns the factors bound to model's weight and the binding
// generation.
func (b *Bindings) Get(model, weight string) (Factors, uint64, bool) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	s := b.sets[model]
	if s == nil {
		return Factors{}, 0, false
	}
	f, ok := s.Layers[weight]
	return f, s.Generation, ok
}

// Current returns model's binding (nil when none), its factors sorted by
// weight key.
func (b *Bindings) Current(model string) (uint64, []Factors) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	s := b.sets[model]
	if s == nil {
		return 0, nil
	}
	out := make([]Factors, 0, len(s.Layers))
	for _, f := range s.Layers {
		out = append(out, f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Weight < out[j].Weight })
	return s.Generation, out
}

// Drop unbinds model and frees its regions (the model was unloaded).
func (b *Bindings) Drop(model string) error {
	_, err := b.Swap(model, nil)
	return err
}

// WriteLocked runs fn while model's bytes may be written: readers in this
// process (Save, View) and Unload wait until fn returns. Writers hold the
// model's write access for fn's duration only.
func (r *Registry) WriteLocked(model string, fn func(m *Model) error) error {
	m, err := r.model(model)
	if err != nil {
		return err
	}
	m.lifetime.Lock()
	defer m.lifetime.Unlock()
	if cur, ok := r.Model(model); !ok || cur != m {
		return fmt.Errorf("model %q: %w (unloaded)", model, ErrNotFound)
	}
	return fn(m)
}

// TensorBytes returns the bytes of t, a tensor of a registered model. The
// caller must hold the model's write lock (WriteLocked) or otherwise keep it
// from being unloaded while it uses them. On a device arena it fails with
// arena.ErrNoHostView: move the bytes of t.Region with the arena's Read,
// Write and Copy instead.
func (r *Registry) TensorBytes(t *Tensor) ([]byte, error) { return r.bytes(t) }
