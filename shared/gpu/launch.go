package gpu

import (
	"fmt"
	"strings"
)

// Element types of kernel inputs and outputs (the kernels' dtype codes).
const (
	DTypeF32  = 0
	DTypeBF16 = 1
	DTypeF16  = 2
)

// Launch geometry limits the plans respect (every CUDA GPU since compute
// capability 3.0): threads per block and the static shared memory a block
// may use without opting in to more.
const (
	ThreadsPerBlock = 256
	MaxSharedBytes  = 48 << 10
	// MaxGrid caps the grid of grid-stride kernels: enough blocks to fill
	// any current GPU many times over.
	MaxGrid = 1 << 16
	// NestedBlocksize is the block of the nested (double) quantization.
	NestedBlocksize = 256
	// DefaultTileElems is the fused merge's preferred tile: 4096 fp32 values
	// (16 KiB of shared memory), 64 blocks of 64.
	DefaultTileElems = 4096
)

// Launch is one kernel launch's geometry (one-dimensional).
type Launch struct {
	Grid, Block int
	Shared      int // dynamic shared memory bytes
}

func gridFor(work int) int {
	return max(1, min(MaxGrid, (work+ThreadsPerBlock-1)/ThreadsPerBlock))
}

func checkQuant(n, blocksize int) error {
	switch {
	case n <= 0:
		return fmt.Errorf("%d elements", n)
	case blocksize <= 0 || blocksize%2 != 0 || blocksize > 4096:
		return fmt.Errorf("blocksize %d (want an even size up to 4096)", blocksize)
	}
	return nil
}

// DequantizeLaunch plans nf4_dequantize: one thread per packed byte,
// grid-stride.
func DequantizeLaunch(n, blocksize int) (Launch, error) {
	if err := checkQuant(n, blocksize); err != nil {
		return Launch{}, fmt.Errorf("dequantize: %w", err)
	}
	return Launch{Grid: gridFor((n + 1) / 2), Block: ThreadsPerBlock}, nil
}

// QuantizeLaunch plans nf4_quantize: one warp per quantization block,
// eight per CUDA block, grid-stride.
func QuantizeLaunch(n, blocksize int) (Launch, error) {
	if err := checkQuant(n, blocksize); err != nil {
		return Launch{}, fmt.Errorf("quantize: %w", err)
	}
	blocks := (n + blocksize - 1) / blocksize
	return Launch{Grid: gridFor(blocks * 32), Block: ThreadsPerBlock}, nil
}

// NestedDequantizeLaunch plans nested_dequantize over nb absmax values.
func NestedDequantizeLaunch(nb int) (Launch, error) {
	if nb <= 0 {
		return Launch{}, fmt.Errorf("nested dequantize: %d absmax values", nb)
	}
	return Launch{Grid: gridFor(nb), Block: ThreadsPerBlock}, nil
}

// NestedQuantizeLaunch plans nested_quantize: one CUDA block of
// NestedBlocksize threads per nested block (the kernel relies on it).
func NestedQuantizeLaunch(nb int) (Launch, error) {
	if nb <= 0 {
		return Launch{}, fmt.Errorf("nested quantize: %d absmax values", nb)
	}
	return Launch{Grid: min(MaxGrid, (nb+NestedBlocksize-1)/NestedBlocksize), Block: NestedBlocksize}, nil
}

// SumLaunch plans absmax_sum (the kernel's shared reduction assumes
// ThreadsPerBlock threads).
func SumLaunch(nb int) (Launch, error) {
	if nb <= 0 {
		return Launch{}, fmt.Errorf("absmax sum: %d values", nb)
	}
	return Launch{Grid: min(1024, gridFor(nb)), Block: ThreadsPerBlock}, nil
}

// ElementwiseLaunch plans side_rows and side_cols over n elements.
func ElementwiseLaunch(n int) (Launch, error) {
	if n <= 0 {
		return Launch{}, fmt.Errorf("elementwise: %d elements", n)
	}
	return Launch{Grid: gridFor(n), Block: ThreadsPerBlock}, nil
}

// FuseShape is one layer of a fused merge.
type FuseShape struct {
	Out, In   int // the weight is [Out × In]
	Blocksize int // quantization blocksize (even, ≤ 4096)
	Rank      int // Σr, the columns of B_cat and rows of A_cat
	// Stats plans the measuring entry point (nf4_fuse2d_stats,
	// nf4_fuse_stats), whose block reduction takes FuseStaticShared more
	// static shared memory.
	Stats bool
	// TileCols, for the 2-D kernel: the preferred tile width, a power of
	// two from 16 to FuseTileCols (0: FuseDefaultTileCols). The GPU check
	// times the Flux pass at each width; the plan still widens it to the
	// blocksize and narrows it to the layer.
	TileCols int
	// Direct plans nf4_fuse2d_direct, the 2-D kernel that reads and writes
	// codes in global memory block by block (round 1's), for the GPU
	// check's comparison; not with Stats, and only where the 2-D kernel
	// applies.
	Direct bool
}

// FusePlan is a fused merge's launch. For a layer whose rows hold whole
// blocks (In a multiple of a power-of-two blocksize ≤ FuseTileCols) it is
// nf4_fuse2d: 2-D tiles of TileRows × TileCols, rank chunks staged in
// shared memory. Otherwise it is nf4_fuse: runs of TileElems elements (a
// multiple of the blocksize), MaxRows rows of B_cat per tile staged in
// shared memory when BShared. With FuseShape.Stats the entry point is the
// measuring one, nf4_fuse2d_stats or nf4_fuse_stats (same geometry and
// tiles; only the 1-D budget for the dynamic shared memory is smaller).
type FusePlan struct {
	Launch
	Kernel    string // "nf4_fuse2d", "nf4_fuse", either with "_stats", or "nf4_fuse2d_direct"
	TileElems int
	Tiles     int
	TileRows  int  // nf4_fuse2d
	TileCols  int  // nf4_fuse2d
	MaxRows   int  // nf4_fuse: most rows of the weight one tile touches
	BShared   bool // nf4_fuse: B rows staged in shared memory (else read through the cache)
}

// nf4_fuse2d's constants (FUSE_TILE, FUSE_RC in kernels.cu): a tile is
// FuseTile elements, 16 per thread of a 256-thread block, and ranks are
// staged FuseRankChunk at a time.
//
// FuseDefaultTileCols: a 64×64 tile reads the fewest factor bytes per
// element from L2 (4·rank/rows of A plus 4·rank/cols of B: 0.125·rank
// against 0.27·rank for round 1's 16×256), each row's codes still a whole
// 32-byte sector. Chosen by that count, not yet by a GPU timing: the GPU
// check times 64, 128 and 256 side by side.
const (
	FuseTile            = 4096
	FuseRankChunk       = 16
	FuseTileCols        = 256
	FuseMinTileCols     = 16
	FuseDefaultTileCols = 64
	// FuseStaticShared is the static shared memory the measuring entry
	// points (nf4_fuse_stats, nf4_fuse2d_stats) add (the retention sums'
	// block reduction: 3 doubles per warp of up to 1024 threads), which
	// their 1-D plan leaves free of MaxSharedBytes. The plain entry points
	// have none of it.
	FuseStaticShared = 3 * 32 * 8
)

// PlanFuse sizes the fused merge of one layer. The 2-D kernel is used when
// In is a multiple of the blocksize and the blocksize a power of two no
// larger than FuseTileCols: TileCols is the smallest power of two ≥ the
// blocksize, FuseMinTileCols and min(In, s.TileCols or
// FuseDefaultTileCols). Otherwise the 1-D tile starts at
// DefaultTileElems rounded to the blocksize and halves, never below one
// block, until the merged tile plus the B rows it spans fit MaxSharedBytes
// (less FuseStaticShared for the measuring kernel, s.Stats); when even one
// block's rows do not fit, B stays in global memory.
func PlanFuse(s FuseShape) (FusePlan, error) {
	n := s.Out * s.In
	switch {
	case s.Out <= 0 || s.In <= 0:
		return FusePlan{}, fmt.Errorf("fuse: shape [%d %d]", s.Out, s.In)
	case s.Rank <= 0:
		return FusePlan{}, fmt.Errorf("fuse: rank %d", s.Rank)
	}
	if err := checkQuant(n, s.Blocksize); err != nil {
		return FusePlan{}, fmt.Errorf("fuse: %w", err)
	}
	pref := s.TileCols
	switch {
	case pref == 0:
		pref = FuseDefaultTileCols
	case pref < FuseMinTileCols || pref > FuseTileCols || pref&(pref-1) != 0:
		return FusePlan{}, fmt.Errorf("fuse: tile columns %d (want a power of two from %d to %d)", pref, FuseMinTileCols, FuseTileCols)
	}
	twoD := s.Blocksize&(s.Blocksize-1) == 0 && s.Blocksize <= FuseTileCols && s.In%s.Blocksize == 0
	if s.Direct && (!twoD || s.Stats) {
		return FusePlan{}, fmt.Errorf("fuse: nf4_fuse2d_direct plans only the plain 2-D kernel (shape [%d %d], blocksize %d, stats %v)", s.Out, s.In, s.Blocksize, s.Stats)
	}
	if twoD {
		cols := max(s.Blocksize, FuseMinTileCols)
		for cols < min(s.In, pref) {
			cols *= 2
		}
		rows := FuseTile / cols
		tiles := (s.Out + rows - 1) / rows * ((s.In + cols - 1) / cols)
		kernel := fuseKernel("nf4_fuse2d", s.Stats)
		if s.Direct {
			kernel = "nf4_fuse2d_direct"
		}
		return FusePlan{
			Launch:    Launch{Grid: min(MaxGrid, tiles), Block: ThreadsPerBlock, Shared: Fuse2DShared(cols, s.Blocksize)},
			Kernel:    kernel,
			TileElems: FuseTile, Tiles: tiles, TileRows: rows, TileCols: cols,
		}, nil
	}
	tile := max(s.Blocksize, DefaultTileElems/s.Blocksize*s.Blocksize)
	tile = min(tile, (n+s.Blocksize-1)/s.Blocksize*s.Blocksize)
	budget := MaxSharedBytes
	if s.Stats {
		budget -= FuseStaticShared
	}
	for {
		rows := maxRows(tile, s.In, s.Out)
		if 4*(tile+rows*s.Rank) <= budget {
			return fusePlan(n, tile, rows, s.Rank, true, s.Stats), nil
		}
		if tile == s.Blocksize {
			return fusePlan(n, tile, rows, s.Rank, false, s.Stats), nil
		}
		tile = max(s.Blocksize, tile/2/s.Blocksize*s.Blocksize)
	}
}

// Fuse2DShared is the dynamic shared memory nf4_fuse2d takes for a tile
// cols wide at blocksize bs: the deltas (FuseTile floats), a rank chunk of
// A (FuseRankChunk × cols) and of B (rows × FuseRankChunk), and the tile's
// staged absmax (FuseTile/bs floats) and codes (FuseTile/2 bytes). At most
// 44,032 bytes for any cols from FuseMinTileCols to FuseTileCols and bs ≥ 2.
func Fuse2DShared(cols, bs int) int {
	rows := FuseTile / cols
	return 4*(FuseTile+FuseRankChunk*cols+rows*FuseRankChunk) + 4*(FuseTile/bs) + FuseTile/2
}

// fuseKernel names the plain or the measuring entry point of a fused kernel.
func fuseKernel(base string, stats bool) string {
	if stats {
		return base + "_stats"
	}
	return base
}

// TwoD reports whether the plan is for the 2-D kernel (nf4_fuse2d or
// nf4_fuse2d_stats).
func (p FusePlan) TwoD() bool { return strings.HasPrefix(p.Kernel, "nf4_fuse2d") }

func fusePlan(n, tile, rows, rank int, bShared, stats bool) FusePlan {
	tiles := (n + tile - 1) / tile
	shared := 4 * tile
	if bShared {
		shared += 4 * rows * rank
	}
	return FusePlan{
		Launch:    Launch{Grid: min(MaxGrid, tiles), Block: ThreadsPerBlock, Shared: shared},
		Kernel:    fuseKernel("nf4_fuse", stats),
		TileElems: tile, Tiles: tiles, MaxRows: rows, BShared: bShared,
	}
}

// maxRows is the most rows of an [out × in] weight that a run of tile
// elements starting on a multiple of tile can touch.
func maxRows(tile, in, out int) int {
	return min(out, (tile-1)/in+2)
}
