package main

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/arenahost/arenahost/sdk/plugintest"
	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/gpu/gpusim"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/lora/lorawire"
	"github.com/arenahost/arenahost/shared/nf4"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/tensor"
)

// The device path is tested against the CPU path with real plugin
// processes: the test acts as the host, once with its arena in a memfd
// (plugintest.FakeHost: CPU descriptors) and once in a gpusim slab (CUDA
// descriptors the plugin opens by IPC handle), hands the plugin the same
// model and LoRAs, and compares every byte the plugin wrote.
//
// plugintest.Start serves only a FakeHost, whose LookupTensors knows no
// models and whose Allocate and descriptors are CPU-only, so the host here
// is a pluginv1.HostServer of its own served on go-plugin's broker.

// testHost is a Host service over one memory: the FakeHost's memfd arena
// or one gpusim slab.
type testHost struct {
	pluginv1.UnimplementedHostServer

	cpu  *plugintest.FakeHost // CPU memory
	sim  *gpusim.Device       // device memory: one slab, bump-allocated
	slab gpu.Slab
	// handle, when set, replaces the slab's IPC handle in descriptors
	// (a real driver's handle, which no gpusim build can open).
	handle *[gpu.HandleSize]byte

	mu    sync.Mutex
	next  uint64
	gen   uint64
	model []*pluginv1.TensorDescriptor
	freed int
	// allocs counts the device regions Allocate handed out.
	allocs int
}

const testArena = 32 << 20

func newTestHost(t *testing.T, device bool) *testHost {
	t.Helper()
	if !device {
		return &testHost{cpu: plugintest.NewFakeHost(t, testArena)}
	}
	sim := gpusim.New(0)
	slab, err := sim.Alloc(testArena)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sim.Close(); err != nil {
			t.Errorf("close gpusim: %v", err)
		}
	})
	return &testHost{sim: sim, slab: slab, next: 0}
}

// allocDevice returns a zeroed region of n bytes in the slab.
func (h *testHost) allocDevice(name string, dtype pluginv1.DType, shape []int64, n uint64, access pluginv1.Access) (*pluginv1.TensorDescriptor, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	off := (h.next + 255) / 256 * 256
	if off+n > h.slab.Size {
		return nil, fmt.Errorf("test host: allocate %s: %d bytes at %d in a slab of %d", name, n, off, h.slab.Size)
	}
	h.next = off + n
	h.gen++
	loc := gpu.SlabLocation{ID: 1, Handle: h.slab.Handle, Size: h.slab.Size, Device: 0, HostPID: os.Getpid()}
	if h.handle != nil {
		loc.Handle = *h.handle
	}
	cs, err := loc.Proto()
	if err != nil {
		return nil, err
	}
	return &pluginv1.TensorDescriptor{Name: name, Dtype: dtype, Shape: shape, Nbytes: n, Access: access,
		Region: &pluginv1.Region{Segment: &pluginv1.Region_Cuda{Cuda: cs}, Offset: off, Length: n, Generation: h.gen}}, nil
}

// put allocates a region and fills it with data.
func (h *testHost) put(t testing.TB, name string, dtype pluginv1.DType, shape []int64, data []byte, access pluginv1.Access) *pluginv1.TensorDescriptor {
	t.Helper()
	if h.cpu != nil {
		return h.cpu.Put(t, name, dtype, shape, data, access)
	}
	d, err := h.allocDevice(name, dtype, shape, uint64(len(data)), access)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.sim.Upload(context.Background(), h.slab.Ptr+gpu.DevicePtr(d.Region.Offset), data); err != nil {
		t.Fatal(err)
	}
	return d
}

// write copies data into a region.
func (h *testHost) write(t testing.TB, r *pluginv1.Region, data []byte) {
	t.Helper()
	if h.cpu != nil {
		b, err := h.cpu.Bytes(&pluginv1.TensorDescriptor{Name: "write", Nbytes: uint64(len(data)), Region: r})
		if err != nil {
			t.Fatal(err)
		}
		copy(b, data)
		return
	}
	if err := h.sim.Upload(context.Background(), h.slab.Ptr+gpu.DevicePtr(r.GetOffset()), data); err != nil {
		t.Fatal(err)
	}
}

// read returns a copy of n bytes at a region.
func (h *testHost) read(t testing.TB, r *pluginv1.Region, n uint64) []byte {
	t.Helper()
	if h.cpu != nil {
		b, err := h.cpu.Bytes(&pluginv1.TensorDescriptor{Name: "read", Nbytes: n, Region: r})
		if err != nil {
			t.Fatal(err)
		}
		return bytes.Clone(b)
	}
	if _, ok := r.GetSegment().(*pluginv1.Region_Cuda); !ok {
		t.Fatalf("test host: region at %d is not on the device", r.GetOffset())
	}
	b := make([]byte, n)
	if err := h.sim.Download(b, h.slab.Ptr+gpu.DevicePtr(r.GetOffset())); err != nil {
		t.Fatal(err)
	}
	return b
}

func (h *testHost) LookupTensors(_ context.Context, req *pluginv1.LookupTensorsRequest) (*pluginv1.LookupTensorsResponse, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if req.GetModel() != "m" {
		return nil, status.Errorf(codes.NotFound, "test host: model %q not found", req.GetModel())
	}
	return &pluginv1.LookupTensorsResponse{Tensors: h.model}, nil
}

func (h *testHost) Allocate(ctx context.Context, req *pluginv1.AllocateRequest) (*pluginv1.AllocateResponse, error) {
	if h.cpu != nil {
		return h.cpu.Allocate(ctx, req)
	}
	n, err := tensor.NBytes(req.GetDtype(), req.GetShape())
	if err != nil || n == 0 {
		return nil, status.Errorf(codes.InvalidArgument, "test host: allocate %q: %v", req.GetName(), err)
	}
	d, err := h.allocDevice(req.GetName(), req.GetDtype(), req.GetShape(), n, pluginv1.Access_ACCESS_READ_WRITE)
	if err != nil {
		return nil, status.Error(codes.ResourceExhausted, err.Error())
	}
	h.mu.Lock()
	h.allocs++
	h.mu.Unlock()
	return &pluginv1.AllocateResponse{Tensor: d}, nil
}

func (h *testHost) Free(_ context.Context, req *pluginv1.FreeRequest) (*pluginv1.FreeResponse, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.freed += len(req.GetRegions())
	return &pluginv1.FreeResponse{}, nil
}

// startPlugin starts the plugin as the host does (go-plugin, AutoMTLS)
// with h as its Host service.
func startPlugin(t *testing.T, h pluginv1.HostServer, env ...string) pluginv1.PluginClient {
	t.Helper()
	return startPluginLogs(t, h, env...).Client
}

// startPluginLogs is startPlugin that also gives the plugin's log (Logs).
func startPluginLogs(t *testing.T, h pluginv1.HostServer, env ...string) *plugintest.Plugin {
	t.Helper()
	return plugintest.Start(t, plugintest.Config{Cmd: []string{build(t)}, Env: env, HostServer: h})
}

func call(t *testing.T, p pluginv1.PluginClient, method string, args any, tensors []*pluginv1.TensorDescriptor, out any) (*pluginv1.InvokeResponse, error) {
	t.Helper()
	raw, err := msgpack.Marshal(args)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := p.Invoke(t.Context(), &pluginv1.InvokeRequest{Method: method, Args: raw, Tensors: tensors})
	if err != nil {
		return nil, err
	}
	if out != nil {
		if err := msgpack.Unmarshal(resp.GetResult(), out); err != nil {
			t.Fatal(err)
		}
	}
	return resp, nil
}

// testLayer is one 4-bit weight of the test model (Flux sample shapes).
type testLayer struct {
	name    string
	out, in int
}

var testLayers = []testLayer{
	{"double_blocks.0.img_attn.qkv", 768, 256},
	{"double_blocks.0.img_attn.proj", 256, 256},
	{"single_blocks.0.linear2", 256, 1280},
}

// modelOpts vary the stored weights.
type modelOpts struct {
	dtype  pluginv1.DType // logical dtype
	quant  string         // "nf4" or "fp4"
	nested bool           // double-quantized absmax, as bitsandbytes stores it
	// nestedBlocksize is the nested_blocksize the descriptors claim (0:
	// bitsandbytes' 256); refusal cases set another.
	nestedBlocksize uint32
}

// storedWeight is a weight as the host stores it: its descriptor (read
// only, as LookupTensors gives it) and original bytes.
type storedWeight struct {
	d              *pluginv1.TensorDescriptor
	packed, absmax []byte
	nestedAbsmax   []byte // nil unless nested
}

// putModel quantizes seeded random weights and stores them.
func (h *testHost) putModel(t *testing.T, o modelOpts) map[string]*storedWeight {
	t.Helper()
	const bs = 64
	out := map[string]*storedWeight{}
	for li, l := range testLayers {
		n := l.out * l.in
		rng := rand.New(rand.NewPCG(uint64(li), 99))
		w := make([]float32, n)
		for i := range w {
			w[i] = float32(rng.NormFloat64() * 0.05)
		}
		packed, absmax := make([]byte, nf4.PackedLen(n)), make([]float32, nf4.Blocks(n, bs))
		nf4.Quantize(packed, absmax, w, bs, nf4.QuantType(o.quant))
		key := l.name + ".weight"
		d := h.put(t, key, pluginv1.DType_DTYPE_U8, []int64{int64(len(packed)), 1}, packed, pluginv1.Access_ACCESS_READ_ONLY)
		d.Quant = &pluginv1.QuantInfo{QuantType: o.quant, Blocksize: bs, Dtype: o.dtype, Shape: []int64{int64(l.out), int64(l.in)}}
		sw := &storedWeight{d: d, packed: packed}
		if o.nested {
			q, nabs, off := nf4.QuantizeNested(absmax)
			code := nf4.DynamicMap()
			sw.absmax, sw.nestedAbsmax = q, f32LE(nabs)
			ad := h.put(t, key+".absmax", pluginv1.DType_DTYPE_U8, []int64{int64(len(q))}, q, pluginv1.Access_ACCESS_READ_ONLY)
			nd := h.put(t, key+".nested_absmax", pluginv1.DType_DTYPE_F32, []int64{int64(len(nabs))}, sw.nestedAbsmax, pluginv1.Access_ACCESS_READ_ONLY)
			md := h.put(t, key+".nested_quant_map", pluginv1.DType_DTYPE_F32, []int64{256}, f32LE(code[:]), pluginv1.Access_ACCESS_READ_ONLY)
			d.Quant.Nested, d.Quant.NestedOffset, d.Quant.NestedBlocksize = true, float64(off), nf4.NestedBlocksize
			if o.nestedBlocksize != 0 {
				d.Quant.NestedBlocksize = o.nestedBlocksize
			}
			d.Quant.Absmax = &pluginv1.TensorRef{Dtype: pluginv1.DType_DTYPE_U8, Shape: ad.Shape, Region: ad.Region}
			d.Quant.NestedAbsmax = &pluginv1.TensorRef{Dtype: pluginv1.DType_DTYPE_F32, Shape: nd.Shape, Region: nd.Region}
			d.Quant.NestedQuantMap = &pluginv1.TensorRef{Dtype: pluginv1.DType_DTYPE_F32, Shape: md.Shape, Region: md.Region}
		} else {
			sw.absmax = make([]byte, 4*len(absmax))
			half.EncodeF32(sw.absmax, absmax)
			ad := h.put(t, key+".absmax", pluginv1.DType_DTYPE_F32, []int64{int64(len(absmax))}, sw.absmax, pluginv1.Access_ACCESS_READ_ONLY)
			d.Quant.Absmax = &pluginv1.TensorRef{Dtype: pluginv1.DType_DTYPE_F32, Shape: ad.Shape, Region: ad.Region}
		}
		d.Model = "m"
		h.model = append(h.model, d)
		out[key] = sw
	}
	return out
}

// f32LE encodes float32s little-endian, as stored.
func f32LE(v []float32) []byte {
	b := make([]byte, 4*len(v))
	half.EncodeF32(b, v)
	return b
}

// fuseTensors is what the coordinator passes a fuse: each weight of the
// plan read-write (holding its original bytes: see restoreOriginals).
func (h *testHost) fuseTensors(t *testing.T, ws map[string]*storedWeight, names []string) []*pluginv1.TensorDescriptor {
	t.Helper()
	var out []*pluginv1.TensorDescriptor
	for _, w := range names {
		d := cloneDesc(ws[w].d)
		d.Access = pluginv1.Access_ACCESS_READ_WRITE
		out = append(out, d)
	}
	return out
}

// restoreOriginals is the coordinator's part of a fuse: before the call it
// puts back the originals of every weight fused earlier, and after a
// failed call those of every weight it passed.
func (h *testHost) restoreOriginals(t *testing.T, ws map[string]*storedWeight) {
	t.Helper()
	for _, sw := range ws {
		h.write(t, sw.d.Region, sw.packed)
		h.write(t, sw.d.Quant.Absmax.Region, sw.absmax)
		if sw.nestedAbsmax != nil {
			h.write(t, sw.d.Quant.NestedAbsmax.Region, sw.nestedAbsmax)
		}
	}
}

func cloneDesc(d *pluginv1.TensorDescriptor) *pluginv1.TensorDescriptor {
	return proto.Clone(d).(*pluginv1.TensorDescriptor)
}

// weightBytes reads a weight's packed codes and absmax as stored now.
func (h *testHost) weightBytes(t *testing.T, sw *storedWeight) []byte {
	t.Helper()
	p := h.read(t, sw.d.Region, uint64(len(sw.packed)))
	a := h.read(t, sw.d.Quant.Absmax.Region, uint64(len(sw.absmax)))
	if sw.nestedAbsmax != nil {
		a = append(a, h.read(t, sw.d.Quant.NestedAbsmax.Region, uint64(len(sw.nestedAbsmax)))...)
	}
	return append(p, a...)
}

// testLoRA is one kohya module of a test LoRA file.
type testLoRA struct {
	layer   string // kohya key after lora_unet_
	rank    int
	out, in int
	alpha   float32
	full    bool // a full-rank diff instead of factors
	dora    bool // with a DoRA magnitude per output row
	seed    uint64
}

// writeTestLoRA writes a LoRA file with seeded random BF16 factors.
func writeTestLoRA(t *testing.T, path string, mods ...testLoRA) {
	t.Helper()
	var ws []safetensors.WriteTensor
	for _, m := range mods {
		rng := rand.New(rand.NewPCG(m.seed, 5))
		bf := func(n int, s float64) []byte {
			v := make([]float32, n)
			for i := range v {
				v[i] = float32(rng.NormFloat64() * s)
			}
			b := make([]byte, 2*n)
			half.EncodeBF16(b, v)
			return b
		}
		key := "lora_unet_" + m.layer
		if m.full {
			ws = append(ws, safetensors.WriteTensor{Name: key + ".diff", DType: safetensors.BF16, Shape: []int64{int64(m.out), int64(m.in)}, Data: bf(m.out*m.in, 0.01)})
			continue
		}
		if m.dora {
			mag := make([]float32, m.out)
			for i := range mag {
				mag[i] = float32(0.5 + rng.Float64())
			}
			b := make([]byte, 2*m.out)
			half.EncodeBF16(b, mag)
			ws = append(ws, safetensors.WriteTensor{Name: key + ".dora_scale", DType: safetensors.BF16, Shape: []int64{int64(m.out), 1}, Data: b})
		}
		al := make([]byte, 2)
		half.EncodeBF16(al, []float32{m.alpha})
		ws = append(ws,
			safetensors.WriteTensor{Name: key + ".lora_down.weight", DType: safetensors.BF16, Shape: []int64{int64(m.rank), int64(m.in)}, Data: bf(m.rank*m.in, 0.1)},
			safetensors.WriteTensor{Name: key + ".lora_up.weight", DType: safetensors.BF16, Shape: []int64{int64(m.out), int64(m.rank)}, Data: bf(m.out*m.rank, 0.1)},
			safetensors.WriteTensor{Name: key + ".alpha", DType: safetensors.BF16, Shape: []int64{}, Data: al})
	}
	if err := safetensors.WriteFile(path, nil, ws); err != nil {
		t.Fatal(err)
	}
}

// testLoRAs writes the two LoRAs of the tests: A on all three layers
// (rank 8, 5 and 16: rank tails of the kernels' four-rank groups), B on
// qkv and proj (rank 4 and 3).
func testLoRAs(t *testing.T) []string {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.safetensors"), filepath.Join(dir, "b.safetensors")
	writeTestLoRA(t, a,
		testLoRA{layer: "double_blocks_0_img_attn_qkv", rank: 8, out: 768, in: 256, alpha: 4, seed: 1},
		testLoRA{layer: "double_blocks_0_img_attn_proj", rank: 5, out: 256, in: 256, alpha: 5, seed: 2},
		testLoRA{layer: "single_blocks_0_linear2", rank: 16, out: 256, in: 1280, alpha: 8, seed: 3})
	writeTestLoRA(t, b,
		testLoRA{layer: "double_blocks_0_img_attn_qkv", rank: 4, out: 768, in: 256, alpha: 4, seed: 4},
		testLoRA{layer: "double_blocks_0_img_attn_proj", rank: 3, out: 256, in: 256, alpha: 1, seed: 5})
	return []string{a, b}
}

// fuseRun is what one memory's run of the fuse sequence produced.
type fuseRun struct {
	orig   map[string][]byte // weight → packed+absmax before any fuse
	first  map[string][]byte // after fusing A and B
	second map[string][]byte // after fusing B alone over the first
	report lorawire.ApplyResult
}

// runFuse fuses LoRAs A+B, then B alone (the host restores all three
// first, so A's extra layer is back to its original), on one memory.
func runFuse(t *testing.T, device bool, o modelOpts, loras []string, env ...string) fuseRun {
	t.Helper()
	h := newTestHost(t, device)
	ws := h.putModel(t, o)
	p := startPlugin(t, h, env...)
	r := fuseRun{orig: map[string][]byte{}, first: map[string][]byte{}, second: map[string][]byte{}}
	for w, sw := range ws {
		r.orig[w] = h.weightBytes(t, sw)
	}
	set := []lorawire.LoRASpec{{Path: loras[0], Strength: 0.8}, {Path: loras[1], Strength: -1.3}}
	var plan lorawire.PlanResult
	if _, err := call(t, p, "plan", lorawire.ApplyArgs{Model: "m", LoRAs: set, Mode: lorawire.ModeFuse}, nil, &plan); err != nil {
		t.Fatalf("plan: %v", err)
	}
	if len(plan.Weights) != 3 {
		t.Fatalf("plan: weights %v, want the three layers", plan.Weights)
	}
	if _, err := call(t, p, "apply", lorawire.ApplyArgs{Model: "m", LoRAs: set, Mode: lorawire.ModeFuse}, h.fuseTensors(t, ws, plan.Weights), &r.report); err != nil {
		t.Fatalf("apply fuse A+B: %v", err)
	}
	for w, sw := range ws {
		r.first[w] = h.weightBytes(t, sw)
	}
	// B alone: the host puts back all three, then passes B's two.
	h.restoreOriginals(t, ws)
	if _, err := call(t, p, "plan", lorawire.ApplyArgs{Model: "m", LoRAs: set[1:], Mode: lorawire.ModeFuse}, nil, &plan); err != nil {
		t.Fatalf("plan B: %v", err)
	}
	var res lorawire.ApplyResult
	if _, err := call(t, p, "apply", lorawire.ApplyArgs{Model: "m", LoRAs: set[1:], Mode: lorawire.ModeFuse}, h.fuseTensors(t, ws, plan.Weights), &res); err != nil {
		t.Fatalf("apply fuse B: %v", err)
	}
	if len(res.Fused) != 2 {
		t.Fatalf("fuse B: fused %v, want qkv and proj", res.Fused)
	}
	for w, sw := range ws {
		r.second[w] = h.weightBytes(t, sw)
	}
	return r
}

// TestDeviceFuseMatchesCPU: the fused pass on gpusim slabs writes exactly
// the bytes the CPU pass writes into shared memory.
func TestDeviceFuseMatchesCPU(t *testing.T) {
	loras := testLoRAs(t)
	// A layer's scratch slot: A_cat [rank × in] then B_cat [out × rank],
	// fp32, each 256-byte aligned; set B is rank 16 on two layers, qkv
	// [768 256] and linear2 [256 1280].
	slot := func(out, in, rank int) int64 { return int64(4*rank*in+4*out*rank+255) / 256 * 256 }
	allLayers := slot(768, 256, 16) + slot(256, 1280, 16)
	for _, c := range []struct {
		name  string
		o     modelOpts
		batch string // EnvDeviceBatch; empty: the default (the whole set fits)
		peak  int64  // the device pass's scratch for set B
	}{
		{"nf4 bf16", modelOpts{dtype: pluginv1.DType_DTYPE_BF16, quant: "nf4"}, "", allLayers},
		{"nf4 f16", modelOpts{dtype: pluginv1.DType_DTYPE_F16, quant: "nf4"}, "", allLayers},
		{"nf4 f32", modelOpts{dtype: pluginv1.DType_DTYPE_F32, quant: "nf4"}, "", allLayers},
		// Nested absmax: decoded into an fp32 scratch after the factors,
		// as large as the largest layer's absmax (linear2: 5120 blocks).
		{"nf4 bf16 nested", modelOpts{dtype: pluginv1.DType_DTYPE_BF16, quant: "nf4", nested: true}, "", allLayers + 4*5120},
		{"nf4 f16 nested one layer per upload", modelOpts{dtype: pluginv1.DType_DTYPE_F16, quant: "nf4", nested: true}, "1", slot(256, 1280, 16) + 4*5120},
		// One layer per upload: the scratch holds the largest layer only
		// (linear2), and each batch's kernel must read its own factors.
		{"nf4 bf16 one layer per upload", modelOpts{dtype: pluginv1.DType_DTYPE_BF16, quant: "nf4"}, "1", slot(256, 1280, 16)},
		// A batch as large as linear2's slot: qkv goes alone, then
		// linear2 (set A+B: proj and qkv together, then linear2).
		{"nf4 bf16 two batches", modelOpts{dtype: pluginv1.DType_DTYPE_BF16, quant: "nf4"}, fmt.Sprint(slot(256, 1280, 16)), slot(256, 1280, 16)},
	} {
		t.Run(c.name, func(t *testing.T) {
			var env []string
			if c.batch != "" {
				env = append(env, EnvDeviceBatch+"="+c.batch)
			}
			cpu := runFuse(t, false, c.o, loras)
			dev := runFuse(t, true, c.o, loras, env...)
			stale := "single_blocks.0.linear2.weight"
			for w, orig := range cpu.orig {
				if !bytes.Equal(orig, dev.orig[w]) {
					t.Fatalf("%s: the two hosts stored different originals", w)
				}
				if bytes.Equal(cpu.first[w], orig) {
					t.Errorf("%s: the CPU fuse left the weight unchanged", w)
				}
				for _, s := range []struct {
					step     string
					cpu, dev []byte
				}{{"fuse A+B", cpu.first[w], dev.first[w]}, {"fuse B", cpu.second[w], dev.second[w]}} {
					if i := firstDiff(s.cpu, s.dev); i >= 0 {
						t.Errorf("%s after %s: device differs from CPU at byte %d of %d", w, s.step, i, len(s.cpu))
					}
				}
			}
			if !bytes.Equal(dev.second[stale], dev.orig[stale]) {
				t.Errorf("%s: not restored to its original bytes when B alone was fused", stale)
			}
			if dev.report.Report == nil || dev.report.Report.Mode != "fuse" || dev.report.Report.PeakScratchBytes <= 0 || len(dev.report.Fused) != 3 {
				t.Errorf("device report %+v fused %v", dev.report.Report, dev.report.Fused)
			} else if got := dev.report.Report.PeakScratchBytes; got != c.peak {
				t.Errorf("peak scratch %d bytes, want %d", got, c.peak)
			}
			for _, r := range []struct {
				rep  *lora.Report
				want []string
			}{
				{cpu.report.Report, []string{"parse and plan", "cpu fused pass"}},
				{dev.report.Report, []string{"parse and plan", "check weights", "write factors", "upload factors (after the previous batch's kernels)", "launch kernels", "last kernels and retention sums"}},
			} {
				var got []string
				for _, ph := range r.rep.Phases {
					got = append(got, ph.Name)
					if ph.Elapsed <= 0 {
						t.Errorf("phase %q took %v", ph.Name, ph.Elapsed)
					}
				}
				if !slices.Equal(got, r.want) {
					t.Errorf("%s pass phases %q, want %q", r.rep.Mode, got, r.want)
				}
			}
			sameFit(t, cpu.report.Report, dev.report.Report)
		})
	}
}

// sameFit: the device pass reports the CPU pass's retention and relative
// error, overall and per layer, to 1e-6 relative (the kernels add the same
// terms in another order), and warns about the same layers.
func sameFit(t *testing.T, cpu, dev *lora.Report) {
	t.Helper()
	if cpu == nil || dev == nil {
		t.Fatalf("reports: CPU %v, device %v", cpu, dev)
	}
	near := func(what string, c, d float64) {
		if c <= 0 || math.Abs(d-c) > 1e-6*c {
			t.Errorf("%s: device %.12g, CPU %.12g", what, d, c)
		}
	}
	near("retention", cpu.Retention, dev.Retention)
	near("rel_error", cpu.RelError, dev.RelError)
	if len(cpu.Layers) != len(dev.Layers) || len(cpu.Warnings) != len(dev.Warnings) {
		t.Fatalf("layers %d and %d, warnings %q and %q", len(cpu.Layers), len(dev.Layers), cpu.Warnings, dev.Warnings)
	}
	for i, cl := range cpu.Layers {
		dl := dev.Layers[i]
		if cl.Layer != dl.Layer || (cl.Warning == "") != (dl.Warning == "") {
			t.Errorf("layer %d: CPU %+v, device %+v", i, cl, dl)
		}
		near(cl.Layer+" retention", cl.Retention, dl.Retention)
		near(cl.Layer+" rel_error", cl.RelError, dl.RelError)
	}
}

func firstDiff(a, b []byte) int {
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// sideRun is the factors one memory's side apply and strength change wrote.
type sideRun struct {
	applied, changed map[string][]byte
}

// sideCase is a side apply and a strength change of its second LoRA.
type sideCase struct {
	name      string
	loras     []string
	strengths []float64 // applied; the second LoRA's then changes to 0.25
	layers    int       // layers bound
	touched   int       // layers the change touches
	changed   int       // factor tensors the change rewrites
}

func runSide(t *testing.T, device bool, c sideCase) sideRun {
	t.Helper()
	h := newTestHost(t, device)
	h.putModel(t, modelOpts{dtype: pluginv1.DType_DTYPE_BF16, quant: "nf4"})
	p := startPlugin(t, h)
	var set []lorawire.LoRASpec
	for i, path := range c.loras {
		set = append(set, lorawire.LoRASpec{Path: path, Strength: c.strengths[i]})
	}
	var res lorawire.ApplyResult
	resp, err := call(t, p, "apply", lorawire.ApplyArgs{Model: "m", LoRAs: set, Mode: lorawire.ModeSide}, nil, &res)
	if err != nil {
		t.Fatalf("apply side: %v", err)
	}
	if len(res.Factors) != c.layers || len(resp.GetTensors()) != 2*c.layers {
		t.Fatalf("apply side: %d factors, %d tensors, want %d layers", len(res.Factors), len(resp.GetTensors()), c.layers)
	}
	read := func() map[string][]byte {
		out := map[string][]byte{}
		for _, d := range resp.GetTensors() {
			if got := isCUDA(d.GetRegion()); got != device {
				t.Fatalf("%s: returned on CUDA %v, the host allocated on CUDA %v", d.GetName(), got, device)
			}
			out[d.GetName()] = h.read(t, d.GetRegion(), d.GetNbytes())
		}
		return out
	}
	r := sideRun{applied: read()}
	var sres lorawire.SetStrengthsResult
	strengths := append([]float64(nil), c.strengths...)
	strengths[1] = 0.25
	if _, err := call(t, p, "set_strengths", lorawire.SetStrengthsArgs{Model: "m", Strengths: strengths}, resp.GetTensors(), &sres); err != nil {
		t.Fatalf("set_strengths: %v", err)
	}
	if len(sres.Touched) != c.touched {
		t.Fatalf("set_strengths touched %+v, want %d layers", sres.Touched, c.touched)
	}
	r.changed = read()
	return r
}

// TestDeviceSideMatchesCPU: side factors written to device regions equal
// those written to shared memory, after apply and after a strength change.
// A DoRA module's delta needs the base weight, which the device path
// downloads and dequantizes; it is bound as dense rows of A'.
func TestDeviceSideMatchesCPU(t *testing.T) {
	loras := testLoRAs(t)
	dora := filepath.Join(t.TempDir(), "dora.safetensors")
	writeTestLoRA(t, dora, testLoRA{layer: "double_blocks_0_img_attn_proj", rank: 4, out: 256, in: 256, alpha: 4, dora: true, seed: 7})
	for _, c := range []sideCase{
		// B' of qkv and proj change with B's strength.
		{name: "lora", loras: loras, strengths: []float64{0.8, -1.3}, layers: 3, touched: 2, changed: 2},
		// The DoRA layer's dense rows of A' change with its strength.
		{name: "dora", loras: []string{loras[0], dora}, strengths: []float64{0.8, 0.6}, layers: 3, touched: 1, changed: 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			cpu, dev := runSide(t, false, c), runSide(t, true, c)
			changed := 0
			for name, b := range cpu.applied {
				if i := firstDiff(b, dev.applied[name]); i >= 0 {
					t.Errorf("%s after apply: device differs from CPU at byte %d", name, i)
				}
				if i := firstDiff(cpu.changed[name], dev.changed[name]); i >= 0 {
					t.Errorf("%s after set_strengths: device differs from CPU at byte %d", name, i)
				}
				if !bytes.Equal(b, cpu.changed[name]) {
					changed++
				}
				if bytes.Count(b, []byte{0}) == len(b) {
					t.Errorf("%s: all zero", name)
				}
			}
			if changed != c.changed {
				t.Errorf("%d factors changed with the second LoRA's strength, want %d", changed, c.changed)
			}
		})
	}
}

// TestDeviceFuseRefusals: what the device pass cannot do is refused before
// any byte changes, with the CPU path's message where the CPU refuses too.
func TestDeviceFuseRefusals(t *testing.T) {
	loras := testLoRAs(t)
	full := filepath.Join(t.TempDir(), "full.safetensors")
	writeTestLoRA(t, full, testLoRA{layer: "double_blocks_0_img_attn_proj", out: 256, in: 256, full: true, seed: 9})
	for _, c := range []struct {
		name     string
		o        modelOpts
		lora     string
		code     codes.Code
		want     string
		sameText bool // the CPU pass refuses with the same message
	}{
		{"nested blocksize 128", modelOpts{dtype: pluginv1.DType_DTYPE_BF16, quant: "nf4", nested: true, nestedBlocksize: 128}, loras[1], codes.FailedPrecondition,
			"nested_blocksize 128, want 256", true},
		{"fp4", modelOpts{dtype: pluginv1.DType_DTYPE_BF16, quant: "fp4"}, loras[1], codes.FailedPrecondition,
			`"fp4" in CUDA device memory: the device fused pass has NF4 kernels only`, false},
		{"full-rank diff", modelOpts{dtype: pluginv1.DType_DTYPE_BF16, quant: "nf4"}, full, codes.FailedPrecondition,
			"layer double_blocks.0.img_attn.proj: a full-rank (dense) delta", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			var msgs [2]string
			for i, device := range []bool{false, true} {
				h := newTestHost(t, device)
				ws := h.putModel(t, c.o)
				p := startPlugin(t, h)
				set := []lorawire.LoRASpec{{Path: c.lora, Strength: 1}}
				var plan lorawire.PlanResult
				if _, err := call(t, p, "plan", lorawire.ApplyArgs{Model: "m", LoRAs: set}, nil, &plan); err != nil {
					t.Fatal(err)
				}
				_, err := call(t, p, "apply", lorawire.ApplyArgs{Model: "m", LoRAs: set, Mode: lorawire.ModeFuse}, h.fuseTensors(t, ws, plan.Weights), nil)
				msgs[i] = status.Convert(err).Message()
				if !device {
					continue
				}
				if status.Code(err) != c.code || !strings.Contains(err.Error(), c.want) {
					t.Fatalf("device: %v, want %v containing %q", err, c.code, c.want)
				}
				for w, sw := range ws {
					if !bytes.Equal(h.weightBytes(t, sw), slices.Concat(sw.packed, sw.absmax, sw.nestedAbsmax)) {
						t.Errorf("%s changed by a refused fuse", w)
					}
				}
			}
			if c.sameText && msgs[0] != msgs[1] {
				t.Errorf("messages differ:\ncpu:    %s\ndevice: %s", msgs[0], msgs[1])
			}
		})
	}
}

// TestFuseCancelledStopsWriting: a fused pass cancelled between layers
// returns having written only the layers before the cancellation, and
// writes nothing afterwards, on either memory, so the host's rollback
// (here: restoreOriginals) cannot be overwritten by a pass still running.
func TestFuseCancelledStopsWriting(t *testing.T) {
	loras := testLoRAs(t)
	for _, c := range []struct {
		name    string
		device  bool
		env     []string
		written int // weights written when the pass stops
	}{
		{"cpu", false, nil, 1},
		// One layer per upload: the first layer's kernel ran before the
		// cancellation.
		{"device one layer per upload", true, []string{EnvDeviceBatch + "=1"}, 1},
		// The default batch holds all three layers: they go up in one
		// upload, and the delay comes before each layer's launch, so the
		// first layer's kernel ran before the cancellation.
		{"device batched", true, nil, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newTestHost(t, c.device)
			ws := h.putModel(t, modelOpts{dtype: pluginv1.DType_DTYPE_BF16, quant: "nf4"})
			const delay = 300 * time.Millisecond
			started := startPluginLogs(t, h, append(c.env, EnvLayerDelay+"="+delay.String())...)
			p, logs := started.Client, started
			set := []lorawire.LoRASpec{{Path: loras[0], Strength: 1}}
			names := []string{"double_blocks.0.img_attn.proj.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear2.weight"}
			raw, err := msgpack.Marshal(lorawire.ApplyArgs{Model: "m", LoRAs: set, Mode: lorawire.ModeFuse})
			if err != nil {
				t.Fatal(err)
			}
			// Cancel while the pass waits before its second layer: the
			// first is written by then.
			ctx, cancel := context.WithTimeout(t.Context(), delay*3/2)
			defer cancel()
			_, err = p.Invoke(ctx, &pluginv1.InvokeRequest{Method: "apply", Args: raw, Tensors: h.fuseTensors(t, ws, names)})
			if status.Code(err) != codes.DeadlineExceeded {
				t.Fatalf("apply: %v, want DeadlineExceeded", err)
			}
			// fence returns once the pass has stopped: what the weights hold
			// then stays (checked below).
			if _, err := call(t, p, "fence", lorawire.FenceArgs{Model: "m"}, nil, nil); err != nil {
				t.Fatalf("fence: %v", err)
			}
			deadline := time.Now().Add(10 * time.Second)
			for !strings.Contains(logs.Logs(), "fuse failed; it stopped writing") {
				if time.Now().After(deadline) {
					t.Fatalf("no failure logged 10 s after the cancelled fuse")
				}
				time.Sleep(20 * time.Millisecond)
			}
			if l := logs.Logs(); !strings.Contains(l, "context canceled") && !strings.Contains(l, "context deadline exceeded") {
				t.Errorf("the failure was not the cancellation")
			}
			after := map[string][]byte{}
			changed := 0
			for w, sw := range ws {
				after[w] = h.weightBytes(t, sw)
				if !bytes.Equal(after[w], append(bytes.Clone(sw.packed), sw.absmax...)) {
					changed++
				}
			}
			if changed != c.written {
				t.Errorf("%d weights written before the cancellation, want %d", changed, c.written)
			}
			// Nothing is written after the failure: the host's rollback
			// stays.
			time.Sleep(2 * delay)
			for w, sw := range ws {
				if !bytes.Equal(h.weightBytes(t, sw), after[w]) {
					t.Errorf("%s written after the pass returned its error", w)
				}
			}
			h.restoreOriginals(t, ws)
			for w, sw := range ws {
				if !bytes.Equal(h.weightBytes(t, sw), append(bytes.Clone(sw.packed), sw.absmax...)) {
					t.Errorf("%s differs from its original after the host's rollback", w)
				}
			}
		})
	}
}

// TestBatches: the fused pass's upload batches cover every layer once, in
// order, each within the limit unless one layer alone exceeds it.
func TestBatches(t *testing.T) {
	layer := func(out, in, rank int) *lora.SideLayer {
		return &lora.SideLayer{Layer: lora.Layer{Out: out, In: in}, Rank: rank}
	}
	small, big := layer(64, 64, 4), layer(4096, 4096, 64) // 2 KiB slots; 2 MiB
	for _, c := range []struct {
		name   string
		layers []*lora.SideLayer
		limit  uint64
		want   []span
	}{
		{"none", nil, 1 << 20, nil},
		{"all fit", []*lora.SideLayer{small, small, small}, 1 << 20, []span{{0, 3}}},
		{"two per batch", []*lora.SideLayer{small, small, small}, 2 * slotBytes(small), []span{{0, 2}, {2, 3}}},
		{"a layer over the limit goes alone", []*lora.SideLayer{small, big, small}, 1 << 20, []span{{0, 1}, {1, 2}, {2, 3}}},
		{"limit below every layer", []*lora.SideLayer{small, small}, 1, []span{{0, 1}, {1, 2}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := batches(c.layers, c.limit); !slices.Equal(got, c.want) {
				t.Fatalf("batches = %v, want %v", got, c.want)
			}
		})
	}
}

// countingOpener stands in for the driver's IPC opens: it counts them.
type countingOpener struct {
	mu     sync.Mutex
	opened map[[gpu.HandleSize]byte]int
}

func (o *countingOpener) OpenIPC(h [gpu.HandleSize]byte) (gpu.DevicePtr, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.opened[h]++
	return gpu.DevicePtr(1<<32 + len(o.opened)<<24), nil
}

func (o *countingOpener) CloseIPC(gpu.DevicePtr) error { return nil }

func (o *countingOpener) counts() (slabs, opens int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, n := range o.opened {
		opens += n
	}
	return len(o.opened), opens
}

// TestPrefetchOpensSlabs: a plan's prefetch opens the slabs of the
// weights, absmax included, in the background, each once, and nothing for
// weights in CPU memory.
func TestPrefetchOpensSlabs(t *testing.T) {
	sim := gpusim.New(0)
	t.Cleanup(func() { sim.Close() })
	region := func(t *testing.T, id uint32) *pluginv1.Region {
		t.Helper()
		s, err := sim.Alloc(1 << 20)
		if err != nil {
			t.Fatal(err)
		}
		loc := gpu.SlabLocation{ID: id, Handle: s.Handle, Size: s.Size, HostPID: os.Getpid()}
		p, err := loc.Proto()
		if err != nil {
			t.Fatal(err)
		}
		return &pluginv1.Region{Offset: 4096, Length: 4096, Segment: &pluginv1.Region_Cuda{Cuda: p}}
	}
	cpu := &pluginv1.Region{Length: 4096, Segment: &pluginv1.Region_Cpu{Cpu: &pluginv1.CPUSegment{Id: 1}}}
	for _, c := range []struct {
		name string
		ws   func(t *testing.T) map[string]*pluginv1.TensorDescriptor
		want int
	}{
		{"weights and absmax on three slabs", func(t *testing.T) map[string]*pluginv1.TensorDescriptor {
			a, b, c := region(t, 1), region(t, 2), region(t, 3)
			return map[string]*pluginv1.TensorDescriptor{
				"x.weight": {Region: a, Quant: &pluginv1.QuantInfo{Absmax: &pluginv1.TensorRef{Region: b}}},
				"y.weight": {Region: a, Quant: &pluginv1.QuantInfo{Absmax: &pluginv1.TensorRef{Region: c}}},
			}
		}, 3},
		{"cpu memory", func(*testing.T) map[string]*pluginv1.TensorDescriptor {
			return map[string]*pluginv1.TensorDescriptor{"x.weight": {Region: cpu, Quant: &pluginv1.QuantInfo{Absmax: &pluginv1.TensorRef{Region: cpu}}}}
		}, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			// The device is already open (a simulated one, as the handles
			// say), its slab cache over the counting opener.
			ws := c.ws(t)
			o := &countingOpener{opened: map[[gpu.HandleSize]byte]int{}}
			g := &gpuState{dev: sim, sim: true, slabs: gpu.NewSlabCache(o)}
			// In the background (the plan call's prefetch)…
			g.prefetch(ws)
			deadline := time.Now().Add(10 * time.Second)
			for slabs, _ := o.counts(); slabs < c.want; slabs, _ = o.counts() {
				if time.Now().After(deadline) {
					t.Fatalf("%d slabs opened 10 s after the prefetch, want %d", slabs, c.want)
				}
				time.Sleep(10 * time.Millisecond)
			}
			// …then synchronously (prepare): the same slabs, each opened once.
			n, err := g.openAll(ws)
			if err != nil {
				t.Fatal(err)
			}
			if slabs, opens := o.counts(); n != c.want || slabs != c.want || opens != c.want {
				t.Fatalf("openAll says %d open; %d slabs opened %d times; want %d, once each", n, slabs, opens, c.want)
			}
		})
	}
}
