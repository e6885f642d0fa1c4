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
