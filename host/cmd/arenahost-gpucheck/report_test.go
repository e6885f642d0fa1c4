package main

import (
	"strings"
	"testing"
)

func TestReport(t *testing.T) {
	var r Report
	r.Device = "NVIDIA H100 80GB HBM3 (device 0)"
	r.Check("correctness", "quantize n=1001 bs=64", Identical(1001, 1001), "≥ 99.99% identical", IdenticalOK(1001, 1001))
	r.Check("merge", "fused merge, 1 LoRA", "0.300 s", "< 0.25 s", false)
	r.Add("merge", "device-to-device copy", GBps(2e12, 1), "", Info)
	r.Note("pipe | in a note")
	if r.Failed() != 1 {
		t.Fatalf("failed %d", r.Failed())
	}
	tab := r.Table()
	for _, want := range []string{"1001/1001 (100.0000%)", "FAIL", "2000 GB/s", "3 checks, 1 failed"} {
		if !strings.Contains(tab, want) {
			t.Errorf("table lacks %q:\n%s", want, tab)
		}
	}
	md := r.Markdown("2026-11-26 23:00 UTC", "gpucheck")
	for _, want := range []string{"| merge | fused merge, 1 LoRA | 0.300 s | < 0.25 s | FAIL |", "| - |", "- pipe | in a note"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}

func TestIdenticalOK(t *testing.T) {
	tests := []struct {
		same, total int64
		ok          bool
	}{{9999, 10000, true}, {9998, 10000, false}, {0, 0, false}, {1, 1, true}, {99_989, 100_000, false}}
	for _, tc := range tests {
		if got := IdenticalOK(tc.same, tc.total); got != tc.ok {
			t.Errorf("IdenticalOK(%d, %d) = %v", tc.same, tc.total, got)
		}
	}
}

// TestCapTable: the capgen table shows every row kind (measured, out of
// memory, error, skipped) as a markdown table, and a section renders under
// its title after the notes.
func TestCapTable(t *testing.T) {
	rows := []capRow{
		{Who: "arenahost", CapGiB: 24, LoRAs: 5, Rank: 16, Mode: "side", ApplyS: 0.41, StepMS: 812, ArenaBytes: 7 << 30, TorchPeak: 9 << 30},
		{Who: "baseline", CapGiB: 12, LoRAs: 3, Rank: 64, Mode: "fuse", OOM: true, Err: "torch.OutOfMemoryError: CUDA out of memory | tried"},
		{Who: "arenahost", CapGiB: 16, LoRAs: 0, Mode: "side", Err: "job x failed: boom"},
		{Who: "baseline", CapGiB: 16, LoRAs: 5, Rank: 16, Mode: "unmerged", Skipped: "time budget"},
	}
	tab := capTable(rows)
	for _, want := range []string{
		"| arenahost | 24 GiB | 5 | 16 | side | 0.410 | 812 | 16384.0 MiB | 7168.0 MiB | 9216.0 MiB | no |",
		`| baseline | 12 GiB | 3 | 64 | fuse | 0.000 | 0 | 0.0 MiB | 0.0 MiB | 0.0 MiB | **yes**: torch.OutOfMemoryError: CUDA out of memory \| tried |`,
		"| arenahost | 16 GiB | 0 | - | side | error: job x failed: boom |",
		"| baseline | 16 GiB | 5 | 16 | unmerged | skipped: time budget |",
	} {
		if !strings.Contains(tab, want) {
			t.Errorf("table lacks %q:\n%s", want, tab)
		}
	}
	for _, m := range []string{"CUDA out of memory", "torch.OutOfMemoryError", "arena: capacity 8 GiB exceeded"} {
		if !isOOM(m) {
			t.Errorf("isOOM(%q) = false", m)
		}
	}
	if isOOM("job x failed: boom") {
		t.Error("isOOM of a plain failure")
	}
	small := smallestCaps(append(rows,
		capRow{Who: "arenahost", CapGiB: 16, LoRAs: 5, Rank: 16, Mode: "side", StepMS: 900},
		capRow{Who: "arenahost", CapGiB: 12, LoRAs: 5, Rank: 16, Mode: "side", OOM: true, Err: "out of memory"},
		capRow{Who: "baseline", CapGiB: 24, LoRAs: 5, Rank: 16, Mode: "unmerged", OOM: true, Err: "out of memory"}))
	for _, want := range []string{
		"- arenahost, side, 5 rank-16 LoRAs: generates down to **16 GiB** (caps tried: 24, 16, 12 GiB)",
		"- baseline, unmerged, 5 rank-16 LoRAs: generated under none of the caps tried (24 GiB)",
	} {
		if !strings.Contains(small, want) {
			t.Errorf("smallest caps lack %q:\n%s", want, small)
		}
	}
	var r Report
	r.Note("a note")
	r.AddSection("Capped generation", tab)
	md := r.Markdown("now", "gpucheck")
	if i, j := strings.Index(md, "- a note"), strings.Index(md, "## Capped generation\n\n| who |"); i < 0 || j < i {
		t.Errorf("section not after the notes:\n%s", md)
	}
}
