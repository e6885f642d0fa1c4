package gpu

import (
	_ "embed"
	"fmt"
	"regexp"
	"strings"
)

// PTX is the kernels' PTX (kernels/kernels.cu compiled for compute_80 by
// kernels/build_ptx.py), loaded with cuModuleLoadData.
//
//go:embed kernels/kernels.ptx
var PTX string

// Kernel entry points and their parameter counts: the Go launch code and
// the .cu must agree, which TestPTXEntries checks against the PTX.
var Entries = map[string]int{
	"nf4_dequantize":    6,
	"nf4_quantize":      6,
	"nested_dequantize": 6,
	"nested_quantize":   6,
	"absmax_sum":        3,
	"nf4_fuse":          13,
	"nf4_fuse2d":        11,
	"nf4_fuse2d_direct": 11,
	"nf4_fuse_stats":    14,
	"nf4_fuse2d_stats":  12,
	"side_rows":         5,
	"side_cols":         10,
}

var entryRE = regexp.MustCompile(`(?s)\.visible \.entry (\w+)\((.*?)\)`)

// PTXEntries parses the entry points of a PTX module: name → the byte
// size of each parameter.
func PTXEntries(ptx string) (map[string][]int, error) {
	out := map[string][]int{}
	for _, m := range entryRE.FindAllStringSubmatch(ptx, -1) {
		var sizes []int
		for _, p := range strings.Split(m[2], ",") {
			p = strings.TrimSpace(p)
			if p == "" {
				continue
			}
			f := strings.Fields(p)
			if len(f) < 3 || f[0] != ".param" {
				return nil, fmt.Errorf("ptx: entry %s: parameter %q", m[1], p)
			}
			var size int
			switch f[1] {
			case ".u64", ".s64", ".f64", ".b64":
				size = 8
			case ".u32", ".s32", ".f32", ".b32":
				size = 4
			default:
				return nil, fmt.Errorf("ptx: entry %s: parameter type %s", m[1], f[1])
			}
			sizes = append(sizes, size)
		}
		out[m[1]] = sizes
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("ptx: no entry points")
	}
	return out, nil
}

var kernelRE = regexp.MustCompile(`extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(`)

// kernelNames lists the extern "C" kernels defined in CUDA source.
func kernelNames(src string) []string {
	var out []string
	for _, m := range kernelRE.FindAllStringSubmatch(src, -1) {
		out = append(out, m[1])
	}
	return out
}

func containsLine(s, line string) bool {
	for _, l := range strings.Split(s, "\n") {
		if strings.TrimSpace(l) == line {
			return true
		}
	}
	return false
}
