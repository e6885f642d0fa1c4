package lora_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/lora"
	"github.com/arenahost/arenahost/host/plugin"
	"github.com/arenahost/arenahost/host/registry"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/lora/lorawire"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/samples"
)

// fakePlugins is lora.Plugins without a process: each method is answered
// by a function of the test, and every call is recorded. It lets the
// coordinator's own logic (journal, rollback, freeing what a failed call
// returned) be tested on exactly the failures a test wants.
type fakePlugins struct {
	mu      sync.Mutex
	methods map[string]func(args []byte, ts []*pluginv1.TensorDescriptor) (any, []*pluginv1.TensorDescriptor, error)
	calls   []string
}

func (f *fakePlugins) Call(_ context.Context, name, method string, args []byte, ts []*pluginv1.TensorDescriptor) (*plugin.Reply, error) {
	f.mu.Lock()
	f.calls = append(f.calls, name+"."+method)
	fn := f.methods[method]
	f.mu.Unlock()
	if fn == nil {
		return nil, status.Errorf(codes.Unimplemented, "fake plugin %s: no method %q", name, method)
	}
	res, out, err := fn(args, ts)
	if err != nil {
		return &plugin.Reply{Tensors: out, Generation: 1}, err
	}
	b, merr := msgpack.Marshal(res)
	if merr != nil {
		return nil, merr
	}
	return &plugin.Reply{Result: b, Tensors: out, Generation: 1}, nil
}

func (f *fakePlugins) called() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return strings.Join(f.calls, ",")
}

// fakeWorld is a CPU arena with the sample model loaded and a coordinator
// calling fake plugins.
type fakeWorld struct {
	ar    *arena.Arena
	reg   *registry.Registry
	model *registry.Model
	fake  *fakePlugins
	c     *lora.Coordinator
}

func newFakeWorld(t *testing.T) *fakeWorld {
	t.Helper()
	b, err := arena.NewCPUBackend(arena.CPUConfig{Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	ar, err := arena.New(t.Context(), b, arena.Config{Capacity: 256 << 20, SegmentSize: 4 << 20, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ar.Close() })
	path := filepath.Join(t.TempDir(), samples.ModelFile)
	if err := samples.WriteModel(path, samples.ModelOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	reg := registry.New(ar, quietLog)
	m, err := reg.Load(t.Context(), lora.DefaultModel, path)
	if err != nil {
		t.Fatal(err)
	}
	fake := &fakePlugins{methods: map[string]func([]byte, []*pluginv1.TensorDescriptor) (any, []*pluginv1.TensorDescriptor, error){}}
	return &fakeWorld{ar: ar, reg: reg, model: m, fake: fake, c: lora.New(reg, registry.NewBindings(ar), ar, fake, quietLog)}
}

// packed returns the bytes of the model's first n 4-bit weights.
func (w *fakeWorld) packed(t *testing.T, n int) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for _, qw := range w.model.Weights[:n] {
		b := make([]byte, qw.Packed.NBytes)
		if err := w.ar.Read(qw.Packed.Region, 0, b); err != nil {
			t.Fatal(err)
		}
		out[qw.Name] = b
	}
	return out
}

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

var oneLoRA = []api.AppliedLoRA{{Name: "a", Path: "/loras/a.safetensors", Strength: 1}}

// A fused pass that fails after writing garbage into every weight it was
// given (a plugin killed mid-pass) leaves every byte as it was and the
// state empty; the coordinator fences before it restores.
func TestFakeFuseFailureRestoresEveryByte(t *testing.T) {
	w := newFakeWorld(t)
	before := w.packed(t, 3)
	var planned []string
	for name := range before {
		planned = append(planned, name)
	}
	w.fake.methods["plan"] = func([]byte, []*pluginv1.TensorDescriptor) (any, []*pluginv1.TensorDescriptor, error) {
		return lorawire.PlanResult{Weights: planned}, nil, nil
	}
	w.fake.methods["fence"] = func([]byte, []*pluginv1.TensorDescriptor) (any, []*pluginv1.TensorDescriptor, error) {
		return map[string]any{}, nil, nil
	}
	var got int
	w.fake.methods["apply"] = func(args []byte, ts []*pluginv1.TensorDescriptor) (any, []*pluginv1.TensorDescriptor, error) {
		for _, d := range ts {
			if d.GetAccess() != pluginv1.Access_ACCESS_READ_WRITE {
				return nil, nil, fmt.Errorf("weight %s passed read-only", d.GetName())
			}
			r, err := arena.RegionFromProto(d.GetRegion())
			if err != nil {
				return nil, nil, err
			}
			if err := w.ar.Write(context.Background(), r, 0, bytes.Repeat([]byte{0xAB}, int(r.Length))); err != nil {
				return nil, nil, err
			}
			got++
		}
		return nil, nil, fmt.Errorf("fake: %w", plugin.ErrPluginExited)
	}
	_, err := w.c.Apply(t.Context(), lora.Request{LoRAs: oneLoRA, Mode: lora.ModeFuse})
	if err == nil || !errors.Is(err, plugin.ErrPluginExited) || !strings.Contains(err.Error(), "apply fuse") {
		t.Fatalf("apply: %v, want the plugin's exit reported", err)
	}
	if got != len(planned) {
		t.Fatalf("the plugin got %d writable weights, want the %d planned", got, len(planned))
	}
	for name, b := range w.packed(t, 3) {
		if !bytes.Equal(b, before[name]) {
			t.Errorf("weight %s not restored after a failed pass", name)
		}
	}
	st, err := w.c.State("")
	if err != nil || st.Mode != "" || len(st.LoRAs) != 0 || len(st.Fused) != 0 || st.JournalBytes != 0 {
		t.Fatalf("state after a failed pass: %+v, %v", st, err)
	}
	if calls := w.fake.called(); calls != "lora-nf4.plan,lora-nf4.apply,lora-nf4.fence" {
		t.Fatalf("calls %s, want plan, apply, then fence before the rollback", calls)
	}
}

// A side apply whose plugin returns factors for a weight the model does
// not have is refused, and every region the plugin handed back is freed.
func TestFakeSideApplyFreesWhatItWasGiven(t *testing.T) {
	w := newFakeWorld(t)
	base := w.ar.Stats().Allocated
	w.fake.methods["apply"] = func(args []byte, ts []*pluginv1.TensorDescriptor) (any, []*pluginv1.TensorDescriptor, error) {
		var out []*pluginv1.TensorDescriptor
		for _, name := range []string{"fA", "fB"} {
			r, err := w.ar.Alloc(arena.Owner("plugin/lora-nf4/1"), name, 4096)
			if err != nil {
				return nil, nil, err
			}
			loc, err := w.ar.Location(r)
			if err != nil {
				return nil, nil, err
			}
			out = append(out, &pluginv1.TensorDescriptor{Name: name, Dtype: pluginv1.DType_DTYPE_F32, Shape: []int64{1024}, Nbytes: 4096,
				Access: pluginv1.Access_ACCESS_READ_WRITE, Region: arena.RegionProto(r, loc)})
		}
		return lorawire.ApplyResult{Factors: []lorawire.Factor{{Weight: "no.such.weight", A: "fA", B: "fB", Rank: 1, Out: 1024, In: 1}}}, out, nil
	}
	_, err := w.c.Apply(t.Context(), lora.Request{LoRAs: oneLoRA})
	if err == nil || !strings.Contains(err.Error(), "no.such.weight") {
		t.Fatalf("apply: %v, want the unknown weight named", err)
	}
	if got := w.ar.Stats().Allocated; got != base {
		t.Fatalf("arena holds %d bytes after a refused apply, %d before: the plugin's regions leaked", got, base)
	}
	if st, _ := w.c.State(""); st.Mode != "" || st.BindingGeneration != 0 {
		t.Fatalf("state after a refused apply: %+v", st)
	}
}

// The plugin's gRPC codes become the coordinator's errors: a bad LoRA is
// ErrBadLoRA (a client's mistake, 4xx), a lost plan ErrUnsupported.
func TestFakeErrorClasses(t *testing.T) {
	w := newFakeWorld(t)
	w.fake.methods["apply"] = func([]byte, []*pluginv1.TensorDescriptor) (any, []*pluginv1.TensorDescriptor, error) {
		return nil, nil, status.Error(codes.InvalidArgument, "lora /loras/a.safetensors: key x: bad shape")
	}
	_, err := w.c.Apply(t.Context(), lora.Request{LoRAs: oneLoRA})
	if !errors.Is(err, lora.ErrBadLoRA) || !strings.Contains(err.Error(), "key x: bad shape") {
		t.Fatalf("apply: %v, want ErrBadLoRA with the plugin's words", err)
	}
	_, err = w.c.Apply(t.Context(), lora.Request{LoRAs: []api.AppliedLoRA{{Path: "/x", Strength: 1}}, Mode: "merge"})
	if !errors.Is(err, lora.ErrBadLoRA) || !strings.Contains(err.Error(), `mode "merge"`) {
		t.Fatalf("apply with mode merge: %v", err)
	}
	if calls := w.fake.called(); calls != "lora-nf4.apply" {
		t.Fatalf("calls %s: a bad mode must not reach the plugin", calls)
	}
}

// Side factors may be bound to a plain weight only when it is a bundled
// text encoder's [out, in] weight: a plugin binding them to any other
// plain tensor of the model (here the sample transformer's own, which no
// side forward reads with factors) is refused, naming the tensor, and
// nothing it returned is kept.
func TestFakeSideApplyRefusesPlainNonEncoderWeight(t *testing.T) {
	w := newFakeWorld(t)
	var plain *registry.Tensor
	for _, tn := range w.model.Tensors {
		if tn.Quant == nil && tn.QuantOf == "" && tn.NBytes > 0 {
			plain = tn
			break
		}
	}
	if plain == nil {
		t.Fatal("the sample model has no plain tensor")
	}
	out, in := int(plain.Shape[0]), 1
	if len(plain.Shape) == 2 {
		in = int(plain.Shape[1])
	}
	base := w.ar.Stats().Allocated
	w.fake.methods["apply"] = func(args []byte, ts []*pluginv1.TensorDescriptor) (any, []*pluginv1.TensorDescriptor, error) {
		var descs []*pluginv1.TensorDescriptor
		for _, name := range []string{"fA", "fB"} {
			r, err := w.ar.Alloc(arena.Owner("plugin/lora-nf4/1"), name, uint64(4*max(out, in)))
			if err != nil {
				return nil, nil, err
			}
			loc, err := w.ar.Location(r)
			if err != nil {
				return nil, nil, err
			}
			descs = append(descs, &pluginv1.TensorDescriptor{Name: name, Dtype: pluginv1.DType_DTYPE_F32, Shape: []int64{int64(max(out, in))},
				Nbytes: uint64(4 * max(out, in)), Access: pluginv1.Access_ACCESS_READ_WRITE, Region: arena.RegionProto(r, loc)})
		}
		return lorawire.ApplyResult{Factors: []lorawire.Factor{{Weight: plain.Name, A: "fA", B: "fB", Rank: 1, Out: out, In: in}}}, descs, nil
	}
	_, err := w.c.Apply(t.Context(), lora.Request{LoRAs: oneLoRA})
	if err == nil || !strings.Contains(err.Error(), plain.Name) || !strings.Contains(err.Error(), "no 4-bit weight (or plain text-encoder weight)") {
		t.Fatalf("apply: %v, want %s refused", err, plain.Name)
	}
	if got := w.ar.Stats().Allocated; got != base {
		t.Fatalf("arena holds %d bytes after a refused apply, %d before", got, base)
	}
}

// A plugin that answers a bf16 side apply with F32 factors (or says F32
// in the result) is refused naming the dtype: a forward reads factors by
// their descriptors' dtype, so a mismatch is never bound; its regions are
// freed.
func TestFakeSideApplyWrongFactorDType(t *testing.T) {
	for _, tc := range []struct {
		name       string
		descDType  pluginv1.DType
		resultType string
	}{
		{"F32 descriptors", pluginv1.DType_DTYPE_F32, lorawire.FactorBF16},
		{"result says f32", pluginv1.DType_DTYPE_BF16, lorawire.FactorF32},
		{"result says nothing", pluginv1.DType_DTYPE_BF16, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFakeWorld(t)
			qw := w.model.Weights[0]
			out, in := int(qw.State.Shape[0]), int(qw.State.Shape[1])
			base := w.ar.Stats().Allocated
			var asked lorawire.ApplyArgs
			w.fake.methods["apply"] = func(args []byte, ts []*pluginv1.TensorDescriptor) (any, []*pluginv1.TensorDescriptor, error) {
				if err := msgpack.Unmarshal(args, &asked); err != nil {
					return nil, nil, err
				}
				var descs []*pluginv1.TensorDescriptor
				for _, d := range []struct {
					name string
					n    int
				}{{"fA", in}, {"fB", out}} {
					r, err := w.ar.Alloc(arena.Owner("plugin/lora-nf4/1"), d.name, uint64(4*d.n))
					if err != nil {
						return nil, nil, err
					}
					loc, err := w.ar.Location(r)
					if err != nil {
						return nil, nil, err
					}
					descs = append(descs, &pluginv1.TensorDescriptor{Name: d.name, Dtype: tc.descDType, Shape: []int64{int64(d.n)},
						Nbytes: uint64(4 * d.n), Access: pluginv1.Access_ACCESS_READ_WRITE, Region: arena.RegionProto(r, loc)})
				}
				return lorawire.ApplyResult{Factors: []lorawire.Factor{{Weight: qw.Name, A: "fA", B: "fB", Rank: 1, Out: out, In: in, DType: tc.resultType}}}, descs, nil
			}
			_, err := w.c.Apply(t.Context(), lora.Request{LoRAs: oneLoRA, FactorDType: lora.FactorBF16})
			if asked.FactorDType != lora.FactorBF16 {
				t.Fatalf("the plugin was asked for factor dtype %q, want bf16", asked.FactorDType)
			}
			if err == nil || !strings.Contains(err.Error(), "returned factors of dtype") || !strings.Contains(err.Error(), qw.Name) {
				t.Fatalf("apply: %v, want the dtype mismatch named", err)
			}
			if got := w.ar.Stats().Allocated; got != base {
				t.Fatalf("arena holds %d bytes after a refused apply, %d before", got, base)
			}
		})
	}
}
