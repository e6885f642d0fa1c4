//go:build cuda

package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/arenahost/arenahost/shared/gpu"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "ipc-child" {
		os.Exit(ipcChild(os.Args[2:]))
	}
	os.Exit(run())
}

type options struct {
	device      int
	python      string
	torchScript string
	out         string
	skipTorch   bool
	loras       []int
	rank        int
	cpuHost     string
	deviceHost  string
	steps       string
	mergeModel  string
	// the capgen step (capgen.go)
	capgenModel    string
	capgenCaps     string
	capgenSize     int
	capgenSteps    int
	capgenBudget   time.Duration
	capgenScript   string
	capgenBaseline bool
	sdk            string
}

// runLimit is when the capgen step starts its last configuration,
// whatever -capgen-budget says: scripts/gpu-check.sh interrupts the check
// at 290 s (SIGINT: the running step stops and the report is written), so
// 35 s are left for a Flux-dev generation that started just before.
const runLimit = 255 * time.Second

func run() int {
	var o options
	flag.IntVar(&o.device, "device", 0, "CUDA device ordinal")
	flag.StringVar(&o.python, "python", "python3", "Python with torch and cupy (IPC check and the PyTorch baseline)")
	flag.StringVar(&o.torchScript, "torch-script", "host/cmd/arenahost-gpucheck/torch_check.py", "the Python side of the check")
	flag.StringVar(&o.out, "out", "bench/gpu-results.md", "markdown report to write")
	flag.BoolVar(&o.skipTorch, "skip-torch", false, "skip the Python IPC check and the PyTorch baseline")
	flag.IntVar(&o.rank, "rank", 16, "rank of each LoRA in the merge benchmark")
	flag.StringVar(&o.cpuHost, "cpu-host", "bin/arenahost", "arenahost built without CUDA (make build): the served check's CPU host; empty skips the served check")
	flag.StringVar(&o.deviceHost, "device-host", "bin/cuda/arenahost", "arenahost built with -tags cuda (make cuda), with its plugins under bin/cuda/plugins")
	flag.StringVar(&o.mergeModel, "merge-model", "dev", "the scale and merge steps' model: dev (Flux-dev, the targets) or tiny (one block of each kind, for fakecuda)")
	flag.StringVar(&o.steps, "steps", "correctness,ipc,load,served,two-hosts,merge,scale,capgen", "the steps to run, comma-separated")
	flag.StringVar(&o.capgenModel, "capgen-model", "dev", "the capgen step's transformer: dev (Flux-dev) or tiny")
	flag.StringVar(&o.capgenCaps, "capgen-caps", "24,16,12", "the capgen step's device-memory caps in GiB, largest first (the full matrix runs at the first, rank 16 only at the others)")
	flag.IntVar(&o.capgenSize, "capgen-size", 1024, "the capgen step's image side")
	flag.IntVar(&o.capgenSteps, "capgen-steps", 8, "the capgen step's denoising steps")
	flag.DurationVar(&o.capgenBudget, "capgen-budget", 210*time.Second, "the capgen step's time budget (configurations not started by then are reported as skipped; the step also starts nothing after 255 s into the check)")
	flag.StringVar(&o.capgenScript, "capgen-script", "host/cmd/arenahost-gpucheck/capgen.py", "the capgen step's Python side (fixture, baseline)")
	flag.BoolVar(&o.capgenBaseline, "capgen-baseline", true, "run diffusers + PEFT on bitsandbytes under each cap too")
	flag.StringVar(&o.sdk, "sdk", "sdk/python", "the Python SDK the pipeline plugin and the baseline import")
	flag.Parse()
	o.loras = []int{1, 5}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	start := time.Now()
	dev, err := gpu.Open(o.device)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gpucheck:", err)
		return 1
	}
	defer dev.Close()
	r := &Report{Device: deviceName(o.device)}
	_, total, _ := dev.MemInfo()
	r.Note("device %d, %s of device memory; kernels JIT-compiled from the embedded compute_80 PTX", o.device, MiB(int64(total)))

	steps := []struct {
		name string
		fn   func() error
	}{
		{"correctness", func() error { return checkKernels(dev, r) }},
		{"ipc", func() error { return checkIPC(ctx, dev, r, o, log) }},
		{"load", func() error { return checkLoad(ctx, dev, r, log) }},
		{"served", func() error {
			if o.cpuHost == "" {
				return nil
			}
			return CheckServed(ctx, r, ServedOptions{CPU: o.cpuHost, Device: o.deviceHost,
				DeviceArgs: []string{"--arena-backend", "cuda", "--arena-device", strconv.Itoa(o.device)}})
		}},
		// One host per device: two hosts side by side where the machine
		// has a second device (noted and skipped otherwise).
		{"two-hosts", func() error {
			n, err := deviceCount()
			if err != nil {
				return err
			}
			if n < 2 {
				r.Note("two-hosts: %d device(s); the check needs two, skipped", n)
				return nil
			}
			other := 1
			if o.device == 1 {
				other = 0
			}
			return CheckTwoHosts(ctx, r, TwoHostOptions{Bin: o.deviceHost, Backend: "cuda", Devices: [2]int{o.device, other}})
		}},
		{"merge", func() error { return benchMerge(ctx, dev, r, o) }},
		// Last: the kernel targets above matter most if time runs out.
		{"scale", func() error {
			return CheckScale(ctx, r, ScaleOptions{Device: o.deviceHost, Model: o.mergeModel, Rank: o.rank,
				DeviceArgs: []string{"--arena-backend", "cuda", "--arena-device", strconv.Itoa(o.device)}})
		}},
		// A whole generation under 24/16/12 GiB, after every kernel figure.
		{"capgen", func() error {
			if o.skipTorch {
				r.Note("capgen: skipped (-skip-torch: it needs a Python with torch, diffusers, peft and bitsandbytes)")
				return nil
			}
			var caps []float64
			for _, c := range strings.Split(o.capgenCaps, ",") {
				v, err := strconv.ParseFloat(strings.TrimSpace(c), 64)
				if err != nil || v <= 1 {
					return fmt.Errorf("-capgen-caps %q: want GiB figures above 1, comma-separated", o.capgenCaps)
				}
				caps = append(caps, v)
			}
			budget := min(o.capgenBudget, time.Until(start.Add(runLimit)))
			if budget <= 0 {
				r.Note("capgen: skipped, no time left in the check's %s", runLimit)
				return nil
			}
			abs := func(p string) string { a, _ := filepath.Abs(p); return a }
			return CheckCapGen(ctx, r, CapGenOptions{Device: o.deviceHost, TorchDev: "cuda:" + strconv.Itoa(o.device),
				DeviceArgs: []string{"--arena-backend", "cuda", "--arena-device", strconv.Itoa(o.device)},
				Python:     o.python, Script: abs(o.capgenScript), SDK: abs(o.sdk), Model: o.capgenModel, Size: o.capgenSize, Steps: o.capgenSteps,
				DType: "bfloat16", Tokens: 512, CapsGiB: caps, LoRAs: []int{0, 3, 5}, Ranks: []int{16, 64}, Baseline: o.capgenBaseline, Budget: budget})
		}},
	}
	want := map[string]bool{}
	for _, s := range strings.Split(o.steps, ",") {
		want[strings.TrimSpace(s)] = true
	}
	for _, s := range steps {
		if !want[s.name] {
			continue
		}
		delete(want, s.name)
		t0 := time.Now()
		if err := s.fn(); err != nil {
			r.Add(s.name, "error", err.Error(), "", Fail)
		}
		fmt.Fprintf(os.Stderr, "gpucheck: %s done in %.1f s\n", s.name, time.Since(t0).Seconds())
		if ctx.Err() != nil {
			break
		}
	}
	for s := range want {
		r.Add(s, "error", fmt.Sprintf("no step %q (steps: correctness, ipc, load, served, two-hosts, merge, scale, capgen)", s), "", Fail)
	}
	r.Note("total run time %.1f s", time.Since(start).Seconds())
	fmt.Print(r.Table())
	md := r.Markdown(time.Now().UTC().Format("2006-01-02 15:04 UTC"), "arenahost-gpucheck "+joinArgs(os.Args[1:]))
	if err := os.WriteFile(o.out, []byte(md), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "gpucheck: write report:", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "gpucheck: wrote %s\n", o.out)
	if r.Failed() > 0 {
		return 1
	}
	return 0
}

func joinArgs(a []string) string {
	s := ""
	for i, x := range a {
		if i > 0 {
			s += " "
		}
		s += x
	}
	return s
}
