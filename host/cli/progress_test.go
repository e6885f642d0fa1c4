package cli

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

func TestProgressLine(t *testing.T) {
	start := time.Unix(1000, 0)
	tests := []struct {
		done    int64
		elapsed time.Duration
		want    []string
	}{
		{0, 0, []string{"[>", "  0%", "0 B/100.0 MiB", "ETA --"}},
		{50 << 20, 2 * time.Second, []string{"[===============>", " 50%", "50.0 MiB/100.0 MiB", "25.0 MiB/s", "ETA 2s"}},
		{100 << 20, 4 * time.Second, []string{"[==============================]", "100%", "in 4s"}},
		{200 << 20, 4 * time.Second, []string{"100%", "100.0 MiB/100.0 MiB"}}, // clamped
	}
	for _, tt := range tests {
		p := newProgress(&bytes.Buffer{}, "load m", 100<<20, nil)
		p.start, p.now = start, func() time.Time { return start.Add(tt.elapsed) }
		got := p.line(tt.done)
		for _, w := range tt.want {
			if !strings.Contains(got, w) {
				t.Errorf("line(%d after %s) = %q, want it to contain %q", tt.done, tt.elapsed, got, w)
			}
		}
	}
}

func TestProgressQuietOffTerminal(t *testing.T) {
	var buf bytes.Buffer
	stop := StartProgress(&buf, "load", 10, func() int64 { return 5 })
	time.Sleep(150 * time.Millisecond)
	stop()
	if buf.Len() != 0 {
		t.Fatalf("drew on a non-terminal: %q", buf.String())
	}
	f, err := os.CreateTemp(t.TempDir(), "out")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	StartProgress(f, "load", 10, func() int64 { return 5 })()
	if st, _ := f.Stat(); st.Size() != 0 {
		t.Fatalf("drew %d bytes into a regular file", st.Size())
	}
}

func TestProgressDrawsAndStops(t *testing.T) {
	var buf bytes.Buffer
	var n int64
	p := newProgress(&buf, "copy", 1000, func() int64 { n += 100; return n })
	p.interval = 5 * time.Millisecond
	go p.run()
	time.Sleep(30 * time.Millisecond)
	p.Stop()
	p.Stop()
	out := buf.String()
	if !strings.HasPrefix(out, "\rcopy [") || !strings.HasSuffix(out, "\n") || strings.Count(out, "\n") != 1 {
		t.Fatalf("output %q", out)
	}
	last := out[strings.LastIndex(out, "\r"):]
	if !strings.Contains(last, " in ") || strings.Contains(last, "ETA") {
		t.Fatalf("final line %q: want the time taken, not an ETA", last)
	}
}

// A merge's bar shows layers and bytes done, rate and ETA against a total
// known only once the merge has opened its input.
func TestMergeProgressLine(t *testing.T) {
	start := time.Unix(1000, 0)
	var c MergeProgress
	p := newProgress(&bytes.Buffer{}, "merge", 0, c.Bytes.Load)
	p.totalFn = c.BytesTotal.Load
	p.detail = func() string { return fmt.Sprintf("%d/%d layers", c.Layers.Load(), c.LayersTotal.Load()) }
	p.start, p.now = start, func() time.Time { return start.Add(2 * time.Second) }
	c.totals(40, 80<<20)
	for range 10 {
		c.layer(4 << 20)
	}
	got := p.render(c.Bytes.Load(), false)
	want := "merge [===============>              ]  50% 10/40 layers 40.0 MiB/80.0 MiB 20.0 MiB/s ETA 2s"
	if got != want {
		t.Fatalf("line %q\nwant %q", got, want)
	}
	p.plain = true
	if got, want := p.render(c.Bytes.Load(), false), "merge:  50% 10/40 layers, 40.0 MiB/80.0 MiB, 20.0 MiB/s, ETA 2s"; got != want {
		t.Fatalf("plain line %q\nwant %q", got, want)
	}
}

// Off a terminal a merge's progress is whole lines, one per interval, and
// nothing when it ends (the summary follows).
func TestMergeProgressPlainOffTerminal(t *testing.T) {
	old := plainInterval
	plainInterval = 10 * time.Millisecond
	t.Cleanup(func() { plainInterval = old })
	var buf bytes.Buffer
	var c MergeProgress
	c.totals(2, 100)
	c.layer(50)
	stop := startMergeProgress(&buf, &c)
	time.Sleep(60 * time.Millisecond)
	stop()
	out := buf.String()
	if out == "" || strings.Contains(out, "\r") || strings.Contains(out, "[") || !strings.HasSuffix(out, "\n") {
		t.Fatalf("output %q: want plain lines", out)
	}
	for _, l := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		if !strings.HasPrefix(l, "merge:  50% 1/2 layers, 50 B/100 B, ") {
			t.Fatalf("line %q", l)
		}
	}
}
