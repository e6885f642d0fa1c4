//go:build cuda

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"math"
	"math/rand/v2"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/nf4"
)

const (
	benchBlocksize = 64
	maxLoRAs       = 5
	// benchDType is the Flux weights' logical dtype: the fused merge rounds
	// the dequantized base to it before adding the delta.
	benchDType = gpu.DTypeBF16
)

// benchLayer is one Flux-dev linear on the device: NF4 weight, journal,
// side factors (room for maxLoRAs), each LoRA's bf16 factors, and nested
// absmax storage for the nested merge.
type benchLayer struct {
	name             string
	out, in, n, nb   int
	packed, absmax   gpu.DevicePtr
	jPacked, jAbsmax gpu.DevicePtr
	acat, bcat       gpu.DevicePtr
	srcA, srcB       [maxLoRAs]gpu.DevicePtr
	nq, nabs         gpu.DevicePtr
}

// bump carves one device allocation into 256-byte aligned pieces.
type bump struct {
	base gpu.DevicePtr
	size uint64
	off  uint64
}

func (b *bump) take(n int) gpu.DevicePtr {
	p := b.base + gpu.DevicePtr(b.off)
	b.off += (uint64(n) + 255) &^ 255
	if b.off > b.size {
		panic(fmt.Sprintf("gpucheck: bump overflow: %d > %d", b.off, b.size)) // sizes are computed just above; a bug, not input
	}
	return p
}

func align(n int) uint64 { return (uint64(n) + 255) &^ 255 }

func benchMerge(ctx context.Context, dev *gpu.Device, r *Report, o options) error {
	cfg, ok := mergeModels[o.mergeModel]
	if !ok {
		return fmt.Errorf("-merge-model %q: want dev or tiny", o.mergeModel)
	}
	lin, err := gpu.BlockLinears(cfg)
	if err != nil {
		return err
	}
	timeCheck := timeTarget(r, "merge", o.mergeModel)
	rank := o.rank
	var wSize, jSize, fSize, sSize, nSize uint64
	var elems, maxNB int
	layers := make([]*benchLayer, len(lin))
	for i, l := range lin {
		n := l.Out * l.In
		nb := nf4.Blocks(n, benchBlocksize)
		layers[i] = &benchLayer{name: l.Name, out: l.Out, in: l.In, n: n, nb: nb}
		elems += n
		maxNB = max(maxNB, nb)
		wSize += align(nf4.PackedLen(n)) + align(4*nb)
		jSize += align(nf4.PackedLen(n)) + align(4*nb)
		fSize += align(4*maxLoRAs*rank*l.In) + align(4*l.Out*maxLoRAs*rank)
		sSize += maxLoRAs * (align(2*rank*l.In) + align(2*l.Out*rank))
		nSize += align(nb) + align(4*nf4.Blocks(nb, nf4.NestedBlocksize))
	}
	r.Note("merge workload: %d block linears of Flux %s (shared/layout, BFL; Flux-dev has the issue's 304), %d elements, blocksize %d, rank %d per LoRA",
		len(layers), o.mergeModel, elems, benchBlocksize, rank)
	p := newPool(dev)
	defer p.free()
	alloc := func(size uint64) (*bump, error) {
		d, err := dev.MemAlloc(size)
		if err != nil {
			return nil, err
		}
		p.ptrs = append(p.ptrs, d)
		return &bump{base: d, size: size}, nil
	}
	wb, err := alloc(wSize)
	if err != nil {
		return fmt.Errorf("weights (%s): %w", MiB(int64(wSize)), err)
	}
	jb, err := alloc(jSize)
	if err != nil {
		return fmt.Errorf("journal (%s): %w", MiB(int64(jSize)), err)
	}
	fb, err := alloc(fSize)
	if err != nil {
		return fmt.Errorf("side factors: %w", err)
	}
	sb, err := alloc(sSize)
	if err != nil {
		return fmt.Errorf("LoRA factors: %w", err)
	}
	nbuf, err := alloc(nSize)
	if err != nil {
		return fmt.Errorf("nested absmax: %w", err)
	}
	for _, l := range layers {
		l.packed, l.absmax = wb.take(nf4.PackedLen(l.n)), wb.take(4*l.nb)
		l.jPacked, l.jAbsmax = jb.take(nf4.PackedLen(l.n)), jb.take(4*l.nb)
		l.acat, l.bcat = fb.take(4*maxLoRAs*rank*l.in), fb.take(4*l.out*maxLoRAs*rank)
		for i := range maxLoRAs {
			l.srcA[i], l.srcB[i] = sb.take(2*rank*l.in), sb.take(2*l.out*rank)
		}
		l.nq, l.nabs = nbuf.take(l.nb), nbuf.take(4*nf4.Blocks(l.nb, nf4.NestedBlocksize))
	}

	// Fill: random codes, absmax in [0.005, 0.05], bf16 factors of std 0.01,
	// through one pinned 64 MiB pattern per kind.
	pin, err := dev.Pinned(64 << 20)
	if err != nil {
		return err
	}
	defer pin.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	buf := pin.Bytes()
	fillRandomBytes := func() {
		for i := 0; i+8 <= len(buf); i += 8 {
			v := rng.Uint64()
			for k := 0; k < 8; k++ {
				buf[i+k] = byte(v >> (8 * k))
			}
		}
	}
	fill := func(dst gpu.DevicePtr, n int) error {
		for done := 0; done < n; done += len(buf) {
			if err := dev.Upload(ctx, dst+gpu.DevicePtr(done), buf[:min(len(buf), n-done)]); err != nil {
				return err
			}
		}
		return nil
	}
	t0 := time.Now()
	fillRandomBytes()
	for _, l := range layers {
		if err := fill(l.packed, nf4.PackedLen(l.n)); err != nil {
			return err
		}
		if err := fill(l.nq, l.nb); err != nil {
			return err
		}
	}
	putF32s := func(gen func() float32) {
		for i := 0; i+4 <= len(buf); i += 4 {
			b := math.Float32bits(gen())
			buf[i], buf[i+1], buf[i+2], buf[i+3] = byte(b), byte(b>>8), byte(b>>16), byte(b>>24)
		}
	}
	putF32s(func() float32 { return 0.005 + 0.045*rng.Float32() })
	for _, l := range layers {
		if err := fill(l.absmax, 4*l.nb); err != nil {
			return err
		}
		if err := fill(l.nabs, 4*nf4.Blocks(l.nb, nf4.NestedBlocksize)); err != nil {
			return err
		}
	}
	for i := 0; i+2 <= len(buf); i += 2 {
		h := half.F32ToBF16(float32(rng.NormFloat64()) * 0.01)
		buf[i], buf[i+1] = byte(h), byte(h>>8)
	}
	for _, l := range layers {
		for i := range maxLoRAs {
			if err := fill(l.srcA[i], 2*rank*l.in); err != nil {
				return err
			}
			if err := fill(l.srcB[i], 2*l.out*rank); err != nil {
				return err
			}
		}
	}
	dmap := nf4.DynamicMap()
	mapPtr, err := p.putF32(dmap[:])
	if err != nil {
		return err
	}
	if err := dev.Sync(); err != nil {
		return err
	}
	r.Note("device buffers: weights %s, journal %s, side factors %s, LoRA factors %s, nested absmax %s; filled in %.1f s",
		MiB(int64(wSize)), MiB(int64(jSize)), MiB(int64(fSize)), MiB(int64(sSize)), MiB(int64(nSize)), time.Since(t0).Seconds())

	timed := func(fn func() error) (float64, error) {
		if err := dev.Sync(); err != nil {
			return 0, err
		}
		t := time.Now()
		if err := fn(); err != nil {
			return 0, err
		}
		if err := dev.Sync(); err != nil {
			return 0, err
		}
		return time.Since(t).Seconds(), nil
	}
	best := func(runs int, fn func() error) (float64, error) {
		b := math.Inf(1)
		for range runs {
			s, err := timed(fn)
			if err != nil {
				return 0, err
			}
			b = min(b, s)
		}
		return b, nil
	}

	// Device-to-device copy: the bandwidth yardstick.
	copyBytes := min(wSize, jSize, uint64(4<<30))
	tc, err := best(3, func() error { return dev.CopyAsync(jb.base, wb.base, copyBytes) })
	if err != nil {
		return err
	}
	copyBW := 2 * float64(copyBytes) / tc
	r.Add("merge", fmt.Sprintf("device-to-device copy %s", MiB(int64(copyBytes))), fmt.Sprintf("%.1f ms, %s (read+write)", tc*1e3, GBps(2*float64(copyBytes), tc)), "", Info)

	// Journal: original packed bytes and absmax of every layer.
	var jBytes float64
	for _, l := range layers {
		jBytes += 2 * float64(nf4.PackedLen(l.n)+4*l.nb)
	}
	tj, err := best(2, func() error { return journalCopy(dev, layers, true) })
	if err != nil {
		return err
	}
	r.Add("merge", fmt.Sprintf("journal copy, %d layers", len(layers)), fmt.Sprintf("%.1f ms, %s", tj*1e3, GBps(jBytes, tj)), "", Info)

	// The retention sums the measuring kernels add to: 3 float64 per layer,
	// as lora-nf4 allocates them (their values are not read here).
	stats, err := p.alloc(24 * len(layers))
	if err != nil {
		return fmt.Errorf("retention sums: %w", err)
	}
	free0, _, _ := dev.MemInfo()
	for _, k := range o.loras {
		R := k * rank
		ts, err := best(3, func() error {
			q := dev.Queue()
			for _, l := range layers {
				for i := 0; i < k; i++ {
					if err := q.SideRows(l.srcA[i], gpu.DTypeBF16, rank*l.in, 1, l.acat+gpu.DevicePtr(4*i*rank*l.in)); err != nil {
						return err
					}
					if err := q.SideCols(l.srcB[i], gpu.DTypeBF16, 0, l.out, rank, 0.8, l.bcat, 0, R, i*rank); err != nil {
						return err
					}
				}
			}
			return q.Flush()
		})
		if err != nil {
			return err
		}
		name := fmt.Sprintf("side-factor build, %d LoRA(s) rank %d", k, rank)
		if k == 5 {
			timeCheck(name, fmt.Sprintf("%.1f ms (%d launches, one submission)", ts*1e3, 2*k*len(layers)), "< 50 ms", ts < 0.050)
		} else {
			r.Add("merge", name, fmt.Sprintf("%.1f ms (%d launches, one submission)", ts*1e3, 2*k*len(layers)), "", Info)
		}

		// Both fused kernels over every layer: the plain entry points
		// (nf4_fuse2d/nf4_fuse) and the measuring ones (_stats), which
		// lora-nf4 launches since it reports retention. Each gets a first
		// run and the best of two more, plain first.
		var mBytes float64
		fuseAll := func(measure bool) func() error {
			return func() error {
				mBytes = 0
				q := dev.Queue()
				for i, l := range layers {
					fl := gpu.FuseLayer{Packed: l.packed, Absmax: l.absmax, Out: l.out, In: l.in, Blocksize: benchBlocksize,
						A: l.acat, B: l.bcat, Rank: R, DType: benchDType}
					if measure {
						fl.Stats = stats + gpu.DevicePtr(24*i)
					}
					if err := q.Fuse(fl); err != nil {
						return fmt.Errorf("layer %s: %w", l.name, err)
					}
					mBytes += float64(2*nf4.PackedLen(l.n) + 2*4*l.nb + 4*R*(l.in+l.out))
				}
				return q.Flush()
			}
		}
		var tf [2]float64 // plain, measuring
		var res [2]string
		for v, measure := range []bool{false, true} {
			first, err := timed(fuseAll(measure))
			if err != nil {
				return err
			}
			t, err := best(2, fuseAll(measure))
			if err != nil {
				return err
			}
			tf[v] = min(t, first)
			res[v] = fmt.Sprintf("%.3f s (first run %.3f s), %s = %.0f%% of the copy", tf[v], first, GBps(mBytes, tf[v]), 100*mBytes/tf[v]/copyBW)
		}
		ratio := tf[1] / tf[0]
		r.Add("merge", fmt.Sprintf("fused merge without retention sums (nf4_fuse2d/nf4_fuse), %d LoRA(s) rank %d, all %d layers", k, rank, len(layers)),
			res[0], "", Info)
		name = fmt.Sprintf("fused merge measuring retention (nf4_fuse2d_stats/nf4_fuse_stats, lora-nf4's default), %d LoRA(s) rank %d, all %d layers", k, rank, len(layers))
		measured := fmt.Sprintf("%s; %.2f× the plain kernels' time", res[1], ratio)
		if k == 1 {
			timeCheck(name, measured, "< 0.25 s", tf[1] < 0.25)
		} else {
			r.Add("merge", name, measured, "", Info)
		}
		if err := fuseVariants(dev, r, layers, k, rank, R, timed, best); err != nil {
			return err
		}
	}
	free1, _, _ := dev.MemInfo()
	extra := int64(free0) - int64(free1)
	r.Check("merge", "peak extra device memory, fused merge (beyond weights, journal, factors)",
		fmt.Sprintf("%s allocated by the merge (free before %s, after %s)", MiB(max(extra, 0)), MiB(int64(free0)), MiB(int64(free1))),
		"≤ 64 MiB", extra <= 64<<20)

	// Nested absmax, as lora-nf4 fuses it: decode into a scratch of the
	// largest layer's absmax, fuse, re-encode around the stored offset.
	scratch, err := p.alloc(4 * maxNB)
	if err != nil {
		return err
	}
	tn, err := timed(func() error {
		for _, l := range layers {
			if err := dev.FuseNested(gpu.FuseLayer{Packed: l.packed, Absmax: scratch, Out: l.out, In: l.in, Blocksize: benchBlocksize,
				A: l.acat, B: l.bcat, Rank: rank, DType: benchDType}, gpu.Nested{Q: l.nq, Absmax: l.nabs, Map: mapPtr, Offset: 0.02}); err != nil {
				return fmt.Errorf("layer %s: %w", l.name, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	r.Check("merge", "fused merge, nested absmax, 1 LoRA", fmt.Sprintf("%.3f s; scratch %s", tn, MiB(int64(4*maxNB))), "scratch ≤ 64 MiB", 4*maxNB <= 64<<20)

	if o.skipTorch {
		r.Add("merge", "PyTorch baseline", "skipped (-skip-torch)", "", Info)
		return nil
	}
	shapes := make([][2]int, len(layers))
	for i, l := range layers {
		shapes[i] = [2]int{l.out, l.in}
	}
	// Free this process's buffers first so torch has the same device.
	if err := p.free(); err != nil {
		return err
	}
	for _, k := range o.loras {
		req, _ := json.Marshal(map[string]any{"rank": rank, "loras": k, "blocksize": benchBlocksize, "layers": shapes})
		cctx, cancel := context.WithTimeout(ctx, 150*time.Second)
		out, err := exec.CommandContext(cctx, o.python, o.torchScript, "merge", string(req)).CombinedOutput()
		cancel()
		if err != nil {
			r.Add("merge", fmt.Sprintf("PyTorch baseline, %d LoRA(s)", k), fmt.Sprintf("failed: %v: %s", err, lastLine(string(out))), "", Fail)
			continue
		}
		var res struct {
			Seconds   float64 `json:"seconds"`
			PeakExtra int64   `json:"peak_extra_bytes"`
			Torch     string  `json:"torch"`
		}
		if err := json.Unmarshal([]byte(lastLine(string(out))), &res); err != nil {
			r.Add("merge", fmt.Sprintf("PyTorch baseline, %d LoRA(s)", k), "bad output: "+strings.TrimSpace(string(out)), "", Fail)
			continue
		}
		r.Add("merge", fmt.Sprintf("PyTorch baseline (torch %s: dequantize layer, W += B·A, requantize), %d LoRA(s)", res.Torch, k),
			fmt.Sprintf("%.3f s, peak extra %s", res.Seconds, MiB(res.PeakExtra)), "", Info)
	}
	return nil
}

// journalCopy copies every layer's packed codes and absmax into its
// journal (in) or back from it (a restore), in one submission.
func journalCopy(dev *gpu.Device, layers []*benchLayer, in bool) error {
	q := dev.Queue()
	for _, l := range layers {
		for _, c := range []struct {
			journal, weight gpu.DevicePtr
			n               int
		}{{l.jPacked, l.packed, nf4.PackedLen(l.n)}, {l.jAbsmax, l.absmax, 4 * l.nb}} {
			dst, src := c.journal, c.weight
			if !in {
				dst, src = src, dst
			}
			if err := q.JournalCopy(dst, src, uint64(c.n)); err != nil {
				return err
			}
		}
	}
	return q.Flush()
}

// fuseVariant is one way of running the plain 2-D fused kernel.
type fuseVariant struct {
	name     string
	tileCols int
	direct   bool
}

// fuseVariants times the plain fused pass over every layer with each
// variant of the 2-D kernel (round 1's nf4_fuse2d_direct, the reference,
// and the staged codes of nf4_fuse2d at three tile widths), from the same
// codes (restored from the journal before each) and factors, and requires
// of each the reference's bytes (every layer's codes and absmax
// downloaded, CRC-32C): the tile width that lora-nf4 takes by default
// (gpu.FuseDefaultTileCols) is chosen from these rows.
func fuseVariants(dev *gpu.Device, r *Report, layers []*benchLayer, k, rank, R int,
	timed func(func() error) (float64, error), best func(int, func() error) (float64, error)) error {
	variants := []fuseVariant{
		{"round 1's direct body, 16×256 tiles", 256, true},
		{"staged codes, 64×64 tiles", 64, false},
		{"staged codes, 32×128 tiles", 128, false},
		{"staged codes, 16×256 tiles", 256, false},
	}
	restore := func() error { return journalCopy(dev, layers, false) }
	fuse := func(v fuseVariant) func() error {
		return func() error {
			q := dev.Queue()
			for _, l := range layers {
				fl := gpu.FuseLayer{Packed: l.packed, Absmax: l.absmax, Out: l.out, In: l.in, Blocksize: benchBlocksize,
					A: l.acat, B: l.bcat, Rank: R, DType: benchDType, TileCols: v.tileCols}
				// The direct body exists for the 2-D kernel only; other
				// layers (none in Flux) run nf4_fuse either way.
				if p, err := gpu.PlanFuse(gpu.FuseShape{Out: l.out, In: l.in, Blocksize: benchBlocksize, Rank: R}); err == nil && p.TwoD() {
					fl.Direct = v.direct
				}
				if err := q.Fuse(fl); err != nil {
					return fmt.Errorf("layer %s: %w", l.name, err)
				}
			}
			return q.Flush()
		}
	}
	digest := func() (string, error) {
		h := crc32.New(crc32.MakeTable(crc32.Castagnoli))
		var buf []byte
		for _, l := range layers {
			for _, part := range []struct {
				p gpu.DevicePtr
				n int
			}{{l.packed, nf4.PackedLen(l.n)}, {l.absmax, 4 * l.nb}} {
				buf = slices.Grow(buf[:0], part.n)[:part.n]
				if err := dev.Download(buf, part.p); err != nil {
					return "", err
				}
				h.Write(buf)
			}
		}
		return fmt.Sprintf("%08x", h.Sum32()), nil
	}
	var times []float64
	var ref string
	for i, v := range variants {
		if err := restore(); err != nil {
			return err
		}
		if _, err := timed(fuse(v)); err != nil {
			return err
		}
		d, err := digest()
		if err != nil {
			return err
		}
		name := fmt.Sprintf("fused merge, %s, %d LoRA(s): CRC-32C of every layer's codes and absmax", v.name, k)
		if i == 0 {
			ref = d
			r.Add("merge", name, d+" (the reference)", "", Info)
		} else {
			r.Check("merge", name, d, fmt.Sprintf("%s (%s)", ref, variants[0].name), d == ref)
		}
		t, err := best(2, fuse(v))
		if err != nil {
			return err
		}
		times = append(times, t)
	}
	direct := times[0]
	for i, v := range variants {
		r.Add("merge", fmt.Sprintf("fused merge without retention sums, %s, %d LoRA(s) rank %d, all %d layers", v.name, k, rank, len(layers)),
			fmt.Sprintf("%.1f ms, %.2f× round 1's direct body's time", times[i]*1e3, times[i]/direct), "", Info)
	}
	return nil
}
