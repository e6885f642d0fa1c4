package gpu

import (
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/layout"
)

func TestSimpleLaunches(t *testing.T) {
	tests := []struct {
		name string
		fn   func() (Launch, error)
		want Launch
		err  string
	}{
		{"dequantize odd", func() (Launch, error) { return DequantizeLaunch(1001, 64) }, Launch{Grid: 2, Block: 256}, ""},
		{"dequantize huge caps the grid", func() (Launch, error) { return DequantizeLaunch(3072*12288, 64) }, Launch{Grid: MaxGrid, Block: 256}, ""},
		{"dequantize one", func() (Launch, error) { return DequantizeLaunch(1, 64) }, Launch{Grid: 1, Block: 256}, ""},
		{"quantize warp per block", func() (Launch, error) { return QuantizeLaunch(64*9, 64) }, Launch{Grid: 2, Block: 256}, ""},
		{"quantize odd block", func() (Launch, error) { return QuantizeLaunch(100, 64) }, Launch{Grid: 1, Block: 256}, ""},
		{"quantize bad blocksize", func() (Launch, error) { return QuantizeLaunch(100, 63) }, Launch{}, "blocksize 63"},
		{"quantize empty", func() (Launch, error) { return QuantizeLaunch(0, 64) }, Launch{}, "0 elements"},
		{"nested quantize", func() (Launch, error) { return NestedQuantizeLaunch(257) }, Launch{Grid: 2, Block: 256}, ""},
		{"nested dequantize", func() (Launch, error) { return NestedDequantizeLaunch(589824) }, Launch{Grid: 2304, Block: 256}, ""},
		{"nested empty", func() (Launch, error) { return NestedQuantizeLaunch(0) }, Launch{}, "0 absmax"},
		{"sum caps at 1024 blocks", func() (Launch, error) { return SumLaunch(1 << 30) }, Launch{Grid: 1024, Block: 256}, ""},
		{"elementwise", func() (Launch, error) { return ElementwiseLaunch(3072 * 16) }, Launch{Grid: 192, Block: 256}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.fn()
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v %v, want %+v", got, err, tc.want)
			}
		})
	}
}

func TestPlanFuse(t *testing.T) {
	tests := []struct {
		name string
		s    FuseShape
		want FusePlan
		err  string
	}{
		// 2-D: 64 rows × 64 columns (FuseDefaultTileCols); 9216/64 · 3072/64
		// tiles; deltas + A chunk + B chunk + staged absmax and codes in
		// shared memory.
		{"flux qkv rank 16", FuseShape{Out: 9216, In: 3072, Blocksize: 64, Rank: 16},
			FusePlan{Launch: Launch{Grid: 6912, Block: 256, Shared: 4*(4096+16*64+64*16) + 4*64 + 2048}, Kernel: "nf4_fuse2d",
				TileElems: 4096, Tiles: 6912, TileRows: 64, TileCols: 64}, ""},
		// Rank does not change the shared memory: ranks are staged 16 at a time.
		{"flux mlp down 5 LoRAs", FuseShape{Out: 3072, In: 12288, Blocksize: 64, Rank: 80},
			FusePlan{Launch: Launch{Grid: 9216, Block: 256, Shared: 4*(4096+16*64+64*16) + 4*64 + 2048}, Kernel: "nf4_fuse2d",
				TileElems: 4096, Tiles: 9216, TileRows: 64, TileCols: 64}, ""},
		// Round 1's 16×256 tile, which the GPU check times beside it.
		{"tile columns 256", FuseShape{Out: 9216, In: 3072, Blocksize: 64, Rank: 16, TileCols: 256},
			FusePlan{Launch: Launch{Grid: 6912, Block: 256, Shared: 4*(4096+16*256+16*16) + 4*64 + 2048}, Kernel: "nf4_fuse2d",
				TileElems: 4096, Tiles: 6912, TileRows: 16, TileCols: 256}, ""},
		{"direct body", FuseShape{Out: 9216, In: 3072, Blocksize: 64, Rank: 16, TileCols: 256, Direct: true},
			FusePlan{Launch: Launch{Grid: 6912, Block: 256, Shared: 4*(4096+16*256+16*16) + 4*64 + 2048}, Kernel: "nf4_fuse2d_direct",
				TileElems: 4096, Tiles: 6912, TileRows: 16, TileCols: 256}, ""},
		{"direct has no stats", FuseShape{Out: 64, In: 64, Blocksize: 64, Rank: 16, Stats: true, Direct: true}, FusePlan{}, "plans only the plain 2-D kernel"},
		{"direct is 2-D only", FuseShape{Out: 37, In: 77, Blocksize: 64, Rank: 5, Direct: true}, FusePlan{}, "plans only the plain 2-D kernel"},
		{"tile columns not a power of two", FuseShape{Out: 64, In: 64, Blocksize: 64, Rank: 16, TileCols: 48}, FusePlan{}, "tile columns 48"},
		{"tile columns too narrow", FuseShape{Out: 64, In: 64, Blocksize: 64, Rank: 16, TileCols: 8}, FusePlan{}, "tile columns 8"},
		{"narrow 2-D: In 64", FuseShape{Out: 1000, In: 64, Blocksize: 64, Rank: 3},
			FusePlan{Launch: Launch{Grid: 16, Block: 256, Shared: 4*(4096+16*64+64*16) + 4*64 + 2048}, Kernel: "nf4_fuse2d",
				TileElems: 4096, Tiles: 16, TileRows: 64, TileCols: 64}, ""},
		{"2-D: In 96 takes two 64-column tiles", FuseShape{Out: 10, In: 96, Blocksize: 32, Rank: 3},
			FusePlan{Launch: Launch{Grid: 2, Block: 256, Shared: 4*(4096+16*64+64*16) + 4*128 + 2048}, Kernel: "nf4_fuse2d",
				TileElems: 4096, Tiles: 2, TileRows: 64, TileCols: 64}, ""},
		{"2-D: In 96 with 256 preferred rounds the tile up", FuseShape{Out: 10, In: 96, Blocksize: 32, Rank: 3, TileCols: 256},
			FusePlan{Launch: Launch{Grid: 1, Block: 256, Shared: 4*(4096+16*128+32*16) + 4*128 + 2048}, Kernel: "nf4_fuse2d",
				TileElems: 4096, Tiles: 1, TileRows: 32, TileCols: 128}, ""},
		// Blocksize 2 on 2 columns: the tile is at least 16 wide, so the B
		// chunk (rows × 16) stays within shared memory.
		{"2-D: the narrowest tile", FuseShape{Out: 5, In: 2, Blocksize: 2, Rank: 3},
			FusePlan{Launch: Launch{Grid: 1, Block: 256, Shared: 4*(4096+16*16+256*16) + 4*2048 + 2048}, Kernel: "nf4_fuse2d",
				TileElems: 4096, Tiles: 1, TileRows: 256, TileCols: 16}, ""},
		// In=3: a 4096-element tile spans 1367 rows; 1367·64·4 bytes do not
		// fit, so the tile halves until tile + rows·rank fits in 48 KiB:
		// 1024 needs 4·(1024+343·64) = 91904 bytes, 512 needs 46080.
		{"narrow rows shrink the tile", FuseShape{Out: 5000, In: 3, Blocksize: 64, Rank: 64},
			FusePlan{Launch: Launch{Grid: 30, Block: 256, Shared: 4*512 + 4*172*64}, Kernel: "nf4_fuse",
				TileElems: 512, Tiles: 30, MaxRows: 172, BShared: true}, ""},
		// Rank 68: the plain kernel's 512-element tile needs 48832 bytes,
		// within 48 KiB, but not within the 48384 the measuring kernel's
		// reduction leaves, so its tile halves: 4·(256+87·68) bytes.
		{"plain kernel keeps the full budget", FuseShape{Out: 5000, In: 3, Blocksize: 64, Rank: 68},
			FusePlan{Launch: Launch{Grid: 30, Block: 256, Shared: 4*512 + 4*172*68}, Kernel: "nf4_fuse",
				TileElems: 512, Tiles: 30, MaxRows: 172, BShared: true}, ""},
		{"stats kernel leaves room for its reduction", FuseShape{Out: 5000, In: 3, Blocksize: 64, Rank: 68, Stats: true},
			FusePlan{Launch: Launch{Grid: 59, Block: 256, Shared: 4*256 + 4*87*68}, Kernel: "nf4_fuse_stats",
				TileElems: 256, Tiles: 59, MaxRows: 87, BShared: true}, ""},
		{"stats 2-D", FuseShape{Out: 9216, In: 3072, Blocksize: 64, Rank: 16, Stats: true},
			FusePlan{Launch: Launch{Grid: 6912, Block: 256, Shared: 4*(4096+16*64+64*16) + 4*64 + 2048}, Kernel: "nf4_fuse2d_stats",
				TileElems: 4096, Tiles: 6912, TileRows: 64, TileCols: 64}, ""},
		{"rank too large for shared B", FuseShape{Out: 100, In: 1, Blocksize: 64, Rank: 4096},
			FusePlan{Launch: Launch{Grid: 2, Block: 256, Shared: 4 * 64}, Kernel: "nf4_fuse", TileElems: 64, Tiles: 2, MaxRows: 65}, ""},
		{"tiny layer", FuseShape{Out: 3, In: 7, Blocksize: 64, Rank: 4},
			FusePlan{Launch: Launch{Grid: 1, Block: 256, Shared: 4*64 + 4*3*4}, Kernel: "nf4_fuse", TileElems: 64, Tiles: 1, MaxRows: 3, BShared: true}, ""},
		{"blocksize 4096 stays 1-D", FuseShape{Out: 3072, In: 3072, Blocksize: 4096, Rank: 16},
			FusePlan{Launch: Launch{Grid: 2304, Block: 256, Shared: 4*4096 + 4*3*16}, Kernel: "nf4_fuse",
				TileElems: 4096, Tiles: 2304, MaxRows: 3, BShared: true}, ""},
		{"blocks across rows stay 1-D", FuseShape{Out: 37, In: 77, Blocksize: 64, Rank: 5},
			FusePlan{Launch: Launch{Grid: 1, Block: 256, Shared: 4*2880 + 4*37*5}, Kernel: "nf4_fuse",
				TileElems: 2880, Tiles: 1, MaxRows: 37, BShared: true}, ""},
		{"rank 0", FuseShape{Out: 3, In: 7, Blocksize: 64}, FusePlan{}, "rank 0"},
		{"bad shape", FuseShape{Out: 0, In: 7, Blocksize: 64, Rank: 1}, FusePlan{}, "shape [0 7]"},
		{"odd blocksize", FuseShape{Out: 3, In: 7, Blocksize: 65, Rank: 1}, FusePlan{}, "blocksize 65"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := PlanFuse(tc.s)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v %v\nwant %+v", got, err, tc.want)
			}
		})
	}
}

// TestPlanFuseInvariants checks every Flux-dev linear and a sweep of odd
// shapes, for the plain and the measuring entry points. Both kernels: the
// tiles cover the layer and fit shared memory with the kernel's static
// arrays (the 2-D LUT; the sums' reduction of the _stats variants).
// 1-D: tiles start on a block and MaxRows bounds the rows a tile touches.
// 2-D: a tile row holds whole blocks and every thread owns 16 elements.
func TestPlanFuseInvariants(t *testing.T) {
	var shapes []FuseShape
	for _, l := range fluxLinears(t) {
		for _, r := range []int{16, 80} {
			shapes = append(shapes, FuseShape{Out: l.Out, In: l.In, Blocksize: 64, Rank: r},
				FuseShape{Out: l.Out, In: l.In, Blocksize: 64, Rank: r, Stats: true})
		}
	}
	for _, out := range []int{1, 2, 7, 63, 130} {
		for _, in := range []int{1, 3, 31, 64, 65, 96, 1000, 4096} {
			for _, bs := range []int{2, 16, 32, 64, 256, 1024} {
				for _, r := range []int{3, 68, 300} {
					for _, cols := range []int{0, 16, 64, 256} {
						shapes = append(shapes, FuseShape{Out: out, In: in, Blocksize: bs, Rank: r, TileCols: cols},
							FuseShape{Out: out, In: in, Blocksize: bs, Rank: r, Stats: true, TileCols: cols})
					}
				}
			}
		}
	}
	twoD := 0
	for _, s := range shapes {
		p, err := PlanFuse(s)
		if err != nil {
			t.Fatalf("%+v: %v", s, err)
		}
		n := s.Out * s.In
		static := 0
		if p.TwoD() {
			static += 64 // the LUT
		}
		if s.Stats {
			static += FuseStaticShared
			if !strings.HasSuffix(p.Kernel, "_stats") {
				t.Fatalf("%+v: kernel %s", s, p.Kernel)
			}
		} else if strings.HasSuffix(p.Kernel, "_stats") {
			t.Fatalf("%+v: kernel %s", s, p.Kernel)
		}
		if p.Shared+static > MaxSharedBytes {
			t.Fatalf("%+v: shared %d + static %d", s, p.Shared, static)
		}
		if p.TwoD() {
			twoD++
			if p.Shared != Fuse2DShared(p.TileCols, s.Blocksize) || p.TileCols < FuseMinTileCols || p.TileCols > FuseTileCols ||
				s.In%s.Blocksize != 0 || p.TileCols%s.Blocksize != 0 || p.TileRows*p.TileCols != FuseTile ||
				FuseTile != 16*p.Block || p.Tiles != (s.Out+p.TileRows-1)/p.TileRows*((s.In+p.TileCols-1)/p.TileCols) {
				t.Fatalf("%+v: 2-D plan %+v", s, p)
			}
			continue
		}
		if p.TileElems%s.Blocksize != 0 || p.Tiles*p.TileElems < n || (p.Tiles-1)*p.TileElems >= n {
			t.Fatalf("%+v: tiles %+v do not cover %d elements on block boundaries", s, p, n)
		}
		if p.Shared < 4*p.TileElems {
			t.Fatalf("%+v: shared %d", s, p.Shared)
		}
		for tile := 0; tile < p.Tiles; tile++ {
			e0, e1 := tile*p.TileElems, min((tile+1)*p.TileElems, n)
			if rows := (e1-1)/s.In - e0/s.In + 1; rows > p.MaxRows {
				t.Fatalf("%+v: tile %d touches %d rows, plan says at most %d", s, tile, rows, p.MaxRows)
			}
		}
	}
	if twoD < 4*304 {
		t.Fatalf("only %d shapes use the 2-D kernel; every Flux linear should", twoD)
	}
}

func fluxLinears(t *testing.T) []layout.Linear {
	t.Helper()
	ls, err := BlockLinears(layout.FluxDev())
	if err != nil {
		t.Fatal(err)
	}
	return ls
}

// TestBlockLinears pins the merge workload: the 304 Flux-dev
// block linears, as shared/layout counts them, 11.8 G elements.
func TestBlockLinears(t *testing.T) {
	ls := fluxLinears(t)
	var elems int64
	for _, l := range ls {
		elems += int64(l.Out) * int64(l.In)
	}
	if len(ls) != 304 || len(ls) != layout.FluxDev().BlockLinears(layout.FluxBFL) {
		t.Fatalf("%d block linears", len(ls))
	}
	// 19 double blocks: 2×(6h·h + 3h·h + h·h + m·h + h·m); 38 single: (3h+m)·h + h·(h+m) + 3h·h.
	h, m := int64(3072), int64(12288)
	want := 19*2*(6*h*h+3*h*h+h*h+2*m*h) + 38*((3*h+m)*h+h*(h+m)+3*h*h)
	if elems != want {
		t.Fatalf("%d elements, want %d", elems, want)
	}
}
