package mergebench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/simd"
)

// run is one process's wall time and peak resident memory.
type run struct {
	wall   time.Duration
	maxRSS int64 // bytes
}

// timed runs cmd through rusage.py (see there why not from Go) and returns
// its wall time and peak RSS: the same measure for both sides. The output
// of the command goes to the benchmark's log on failure.
func timed(b *testing.B, py string, cmd *exec.Cmd) run {
	b.Helper()
	wrap := exec.Command(py, append([]string{filepath.Join(testenv.RepoRoot(b), "bench", "merge", "rusage.py")}, cmd.Args...)...)
	wrap.Env = cmd.Env
	var out, errb bytes.Buffer
	wrap.Stdout, wrap.Stderr = &out, &errb
	if err := wrap.Run(); err != nil {
		b.Fatalf("%s: %v\n%s%s", strings.Join(cmd.Args, " "), err, out.String(), errb.String())
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	var r struct {
		Seconds float64 `json:"seconds"`
		MaxRSS  int64   `json:"maxrss_kib"`
	}
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &r); err != nil {
		b.Fatalf("%s: rusage: %v: %s", strings.Join(cmd.Args, " "), err, out.String())
	}
	return run{wall: time.Duration(r.Seconds * float64(time.Second)), maxRSS: r.MaxRSS * 1024}
}

// pythonEnv is the environment of the baseline: OPENBLAS_CORETYPE and
// OPENBLAS_L2_SIZE unset (for that process only), so OpenBLAS picks its
// kernel and cache sizes from the CPU as it would for a user.
func pythonEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "OPENBLAS_CORETYPE=") || strings.HasPrefix(kv, "OPENBLAS_L2_SIZE=") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

func python(b *testing.B) string {
	b.Helper()
	for _, env := range []string{"ARENAHOST_PYTHON", "ARENAHOST_TORCH_PYTHON"} {
		if p := os.Getenv(env); p != "" {
			if !filepath.IsAbs(p) && strings.ContainsRune(p, filepath.Separator) {
				p = filepath.Join(testenv.RepoRoot(b), p) // relative to the checkout, not the package
			}
			return p
		}
	}
	p := filepath.Join(testenv.RepoRoot(b), ".venv", "bin", "python")
	if _, err := os.Stat(p); err != nil {
		b.Skipf("no Python with NumPy: set ARENAHOST_PYTHON (make venv)")
	}
	return p
}

// sgemmInfo is baseline.py sgemm's answer.
type sgemmInfo struct {
	SquareN         int     `json:"square_n"`
	Square          float64 `json:"square_gflops"`
	SquareCPU       float64 `json:"square_gflops_cpu"`
	DeltaShape16    float64 `json:"delta_shape_r16_gflops"`
	DeltaShape80    float64 `json:"delta_shape_r80_gflops"`
	DeltaShape16CPU float64 `json:"delta_shape_r16_gflops_cpu"`
	DeltaShape80CPU float64 `json:"delta_shape_r80_gflops_cpu"`
	Corename        string  `json:"corename"`
	Config          string  `json:"config"`
}

// deltaGFLOPs measures the fused pass's delta phase as lora.Fuse runs it:
// SetDeltaRows (as lora.Fuse calls it) over a Flux MLP-in layer [12288 × 3072] in row tiles of the
// default size, on GOMAXPROCS workers; 2·Σr flops per weight. It returns
// the best wall-clock rate of reps and the best rate per CPU-second.
func deltaGFLOPs(rank, reps int) (wall, cpu float64) {
	const out, in = 12288, 3072
	rows := max(1, simd.CacheSizes().L2/16/in)
	r := rand.New(rand.NewPCG(1, uint64(rank)))
	sl := &lora.SideLayer{Layer: lora.Layer{Out: out, In: in}, Rank: rank, A: make([]float32, rank*in), B: make([]float32, out*rank)}
	for i := range sl.A {
		sl.A[i] = float32(r.NormFloat64())
	}
	for i := range sl.B {
		sl.B[i] = float32(r.NormFloat64())
	}
	workers := runtime.GOMAXPROCS(0)
	tiles := (out + rows - 1) / rows
	bufs := make([][]float32, workers)
	for i := range bufs {
		bufs[i] = make([]float32, rows*in)
	}
	best, cpu := 0.0, 0.0
	for i := range reps + 1 { // the first warms up
		start, c0 := time.Now(), cpuTime()
		var wg sync.WaitGroup
		for w := range workers {
			wg.Go(func() {
				for t := w; t < tiles; t += workers {
					r0, r1 := t*rows, min(t*rows+rows, out)
					d := bufs[w][:(r1-r0)*in]
					sl.SetDeltaRows(d, r0, r1)
				}
			})
		}
		wg.Wait()
		if i > 0 {
			flops := 2 * float64(out*in*rank)
			best = max(best, flops/time.Since(start).Seconds()/1e9)
			cpu = max(cpu, flops/max(cpuTime()-c0, 1e-9)/1e9)
		}
	}
	return best, cpu
}

// cpuTime is the CPU time this process has used, all threads, in seconds.
func cpuTime() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// codesAgree compares the 4-bit codes of every NF4 weight in two merged
// files: the share of codes that are equal.
func codesAgree(b *testing.B, x, y string) (same, total int64) {
	b.Helper()
	fx, err := safetensors.Open(x)
	if err != nil {
		b.Fatal(err)
	}
	defer fx.Close()
	fy, err := safetensors.Open(y)
	if err != nil {
		b.Fatal(err)
	}
	defer fy.Close()
	for _, t := range fx.Tensors {
		if !strings.HasSuffix(t.Name, ".weight") || t.DType != safetensors.U8 {
			continue
		}
		dx, err := fx.TensorData(t)
		if err != nil {
			b.Fatal(err)
		}
		dy, err := fy.Data(t.Name)
		if err != nil {
			b.Fatal(err)
		}
		if len(dy) != len(dx) {
			b.Fatalf("%s: %s holds %d bytes, %s %d", t.Name, x, len(dx), y, len(dy))
		}
		for i := range dx {
			if dx[i]>>4 == dy[i]>>4 {
				same++
			}
			if dx[i]&15 == dy[i]&15 {
				same++
			}
		}
		total += 2 * int64(len(dx))
	}
	return same, total
}

func rounds() int {
	if n, err := strconv.Atoi(os.Getenv("ARENAHOST_BENCH_ROUNDS")); err == nil && n > 0 {
		return n
	}
	return 2
}

func best(rs []run) run {
	out := rs[0]
	for _, r := range rs[1:] {
		if r.wall < out.wall {
			out.wall = r.wall
		}
		out.maxRSS = max(out.maxRSS, r.maxRSS)
	}
	return out
}

func walls(rs []run) string {
	var s []string
	for _, r := range rs {
		s = append(s, fmt.Sprintf("%.2f", r.wall.Seconds()))
	}
	return strings.Join(s, "/")
}

// BenchmarkMergeVsNumPy prints the table: the delta phase against
// the machine's SGEMM, and `arenahost merge --as nf4` with 1 and 5 rank-16
// LoRAs against the NumPy/OpenBLAS baseline, wall time and peak RSS, with
// ratios; the baseline runs in the same benchmark, alternating with ours.
func BenchmarkMergeVsNumPy(b *testing.B) {
	py := python(b)
	model, loras := fixtures(b)
	root := testenv.RepoRoot(b)
	bin := filepath.Join(b.TempDir(), "arenahost")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/arenahost/arenahost/host/cmd/arenahost").CombinedOutput(); err != nil {
		b.Fatalf("go build arenahost: %v\n%s", err, out)
	}
	script := filepath.Join(root, "bench", "merge", "baseline.py")
	dir := b.TempDir()
	n := rounds()

	// The roofline: OpenBLAS SGEMM in a process of its own, alternating
	// with ours round by round so both see the same machine; the best of
	// each is kept, and the rates per CPU-second, which time-sharing with
	// other work hardly moves.
	var blas sgemmInfo
	var d16, d80, d16c, d80c float64
	for range 4 {
		sg := exec.Command(py, script, "sgemm", "--reps", "3")
		sg.Env = pythonEnv()
		raw, err := sg.Output()
		if err != nil {
			b.Fatalf("baseline sgemm: %v", err)
		}
		var r sgemmInfo
		if err := json.Unmarshal(raw, &r); err != nil {
			b.Fatalf("baseline sgemm: %v: %s", err, raw)
		}
		blas.SquareN, blas.Corename, blas.Config = r.SquareN, r.Corename, r.Config
		blas.Square, blas.SquareCPU = max(blas.Square, r.Square), max(blas.SquareCPU, r.SquareCPU)
		blas.DeltaShape16, blas.DeltaShape80 = max(blas.DeltaShape16, r.DeltaShape16), max(blas.DeltaShape80, r.DeltaShape80)
		blas.DeltaShape16CPU, blas.DeltaShape80CPU = max(blas.DeltaShape16CPU, r.DeltaShape16CPU), max(blas.DeltaShape80CPU, r.DeltaShape80CPU)
		w16, c16 := deltaGFLOPs(16, 3)
		w80, c80 := deltaGFLOPs(80, 3)
		d16, d80, d16c, d80c = max(d16, w16), max(d80, w80), max(d16c, c16), max(d80c, c80)
	}

	for range b.N {
		type row struct {
			name       string
			ours, base []run
			agree      float64
		}
		var rows []row
		for _, k := range []int{1, 5} {
			r := row{name: fmt.Sprintf("%d LoRA", k)}
			if k > 1 {
				r.name += "s"
			}
			ourOut, baseOut := filepath.Join(dir, "ours.safetensors"), filepath.Join(dir, "numpy.safetensors")
			for range n {
				args := []string{"merge", "--model", model, "--out", ourOut, "--as", "nf4"}
				bargs := []string{script, "merge", "--model", model, "--out", baseOut}
				for _, l := range loras[:k] {
					args = append(args, "--lora", l)
					bargs = append(bargs, "--lora", l)
				}
				r.ours = append(r.ours, timed(b, py, exec.Command(bin, args...)))
				c := exec.Command(py, bargs...)
				c.Env = pythonEnv()
				r.base = append(r.base, timed(b, py, c))
			}
			same, total := codesAgree(b, ourOut, baseOut)
			r.agree = float64(same) / float64(total)
			rows = append(rows, r)
		}
		fmt.Printf("\nmachine: %d cores (GOMAXPROCS %d), %s; simd path %s; caches L1D %d KiB, L2 %d KiB (%s)\n",
			runtime.NumCPU(), runtime.GOMAXPROCS(0), cpuModel(), simd.Current(), simd.CacheSizes().L1D>>10, simd.CacheSizes().L2>>10, simd.CacheSizes().Source)
		fmt.Printf("OpenBLAS: %s (kernel %s)\n", blas.Config, blas.Corename)
		fmt.Printf("\n| GEMM roofline, fp32, both cores (best of 4 alternating rounds) | GFLOP/s, wall | of SGEMM | GFLOP per CPU-second | of SGEMM |\n|---|---|---|---|---|\n")
		fmt.Printf("| OpenBLAS SGEMM %d² (the machine's fp32 GEMM) | %.1f | 100%% | %.1f | 100%% |\n", blas.SquareN, blas.Square, blas.SquareCPU)
		fmt.Printf("| OpenBLAS on the delta's shape [12288×r]·[r×3072], r=16 / 80 | %.1f / %.1f | %.0f%% / %.0f%% | %.1f / %.1f | %.0f%% / %.0f%% |\n",
			blas.DeltaShape16, blas.DeltaShape80, 100*blas.DeltaShape16/blas.Square, 100*blas.DeltaShape80/blas.Square,
			blas.DeltaShape16CPU, blas.DeltaShape80CPU, 100*blas.DeltaShape16CPU/blas.SquareCPU, 100*blas.DeltaShape80CPU/blas.SquareCPU)
		fmt.Printf("| arenahost delta phase (DeltaRows, %s), Σr=16 / 80 | %.1f / %.1f | %.0f%% / %.0f%% | %.1f / %.1f | %.0f%% / %.0f%% |\n", simd.Current(),
			d16, d80, 100*d16/blas.Square, 100*d80/blas.Square, d16c, d80c, 100*d16c/blas.SquareCPU, 100*d80c/blas.SquareCPU)
		fmt.Printf("\n| merge --as nf4, 340M-param Flux block | arenahost | NumPy/OpenBLAS | speed-up | peak RSS arenahost / NumPy | ratio | codes equal |\n|---|---|---|---|---|---|---|\n")
		for _, r := range rows {
			o, bb := best(r.ours), best(r.base)
			fmt.Printf("| %s (best of %s s / %s s) | %.2f s | %.2f s | %.1f× | %d / %d MiB | %.2f | %.2f%% |\n",
				r.name, walls(r.ours), walls(r.base), o.wall.Seconds(), bb.wall.Seconds(), bb.wall.Seconds()/o.wall.Seconds(),
				o.maxRSS>>20, bb.maxRSS>>20, float64(o.maxRSS)/float64(bb.maxRSS), 100*r.agree)
		}
		one, five := best(rows[0].ours), best(rows[1].ours)
		fmt.Printf("\n5-LoRA time / 1-LoRA time: %.2f (target < 2)\n", five.wall.Seconds()/one.wall.Seconds())
		b.ReportMetric(d80/blas.Square, "delta/sgemm")
		b.ReportMetric(d80c/blas.SquareCPU, "delta/sgemm-cpu")
		b.ReportMetric(best(rows[0].base).wall.Seconds()/one.wall.Seconds(), "speedup-1")
		b.ReportMetric(best(rows[1].base).wall.Seconds()/five.wall.Seconds(), "speedup-5")
	}
}

func cpuModel() string {
	raw, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return runtime.GOARCH
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
		}
	}
	return runtime.GOARCH
}
