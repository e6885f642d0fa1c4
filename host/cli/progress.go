package cli

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/term"
)

// Progress draws a one-line progress bar with rate and ETA on a terminal.
// It polls a done function rather than being pushed, so an operation that
// cannot report (a registry load) can be watched through a side figure (the
// arena's allocated bytes). On a writer that is not a terminal it prints
// nothing.
type Progress struct {
	w        io.Writer
	label    string
	total    int64
	done     func() int64
	interval time.Duration
	start    time.Time
	now      func() time.Time
	// totalFn, when set, is read at every draw instead of total (a total
	// known only once the operation has started).
	totalFn func() int64
	// detail, when set, is drawn after the bar ("12/57 layers").
	detail func() string
	// plain draws whole lines (no carriage return, no bar) and nothing at
	// the end: for a log file rather than a terminal.
	plain bool

	stopOnce sync.Once
	quit     chan struct{}
	exited   chan struct{}
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// StartProgress starts drawing on w when w is a terminal and returns the
// function that ends the bar (drawing it one last time, then a newline).
// On any other writer it draws nothing and the returned function is a no-op.
func StartProgress(w io.Writer, label string, total int64, done func() int64) (stop func()) {
	if !isTerminal(w) {
		return func() {}
	}
	p := newProgress(w, label, total, done)
	go p.run()
	return p.Stop
}

func newProgress(w io.Writer, label string, total int64, done func() int64) *Progress {
	return &Progress{w: w, label: label, total: total, done: done, interval: 100 * time.Millisecond,
		start: time.Now(), now: time.Now, quit: make(chan struct{}), exited: make(chan struct{})}
}

func (p *Progress) run() {
	defer close(p.exited)
	t := time.NewTicker(p.interval)
	defer t.Stop()
	for {
		select {
		case <-p.quit:
			if !p.plain {
				fmt.Fprintf(p.w, "\r%s\n", p.render(p.done(), true))
			}
			return
		case <-t.C:
			if p.plain {
				fmt.Fprintf(p.w, "%s\n", p.render(p.done(), false))
			} else {
				fmt.Fprintf(p.w, "\r%s", p.render(p.done(), false))
			}
		}
	}
}

// startMergeProgress shows a running merge's layers and bytes on w: a bar
// with rate and ETA redrawn ten times a second on a terminal, else a plain
// line every plainInterval (so a short merge prints none and a long one
// logs where it is). The returned function ends it.
func startMergeProgress(w io.Writer, c *MergeProgress) (stop func()) {
	p := newProgress(w, "merge", 0, c.Bytes.Load)
	p.totalFn = c.BytesTotal.Load
	p.detail = func() string { return fmt.Sprintf("%d/%d layers", c.Layers.Load(), c.LayersTotal.Load()) }
	if !isTerminal(w) {
		p.plain, p.interval = true, plainInterval
	}
	go p.run()
	return p.Stop
}

// plainInterval is how often a progress off a terminal prints a line.
var plainInterval = 5 * time.Second

// Stop draws the final state and ends the line. It may be called twice.
func (p *Progress) Stop() {
	p.stopOnce.Do(func() {
		close(p.quit)
		<-p.exited
	})
}

const barWidth = 30

// line renders "label [=====>    ]  42% 1.2 GiB/2.8 GiB 512.0 MiB/s ETA 3s".
func (p *Progress) line(done int64) string { return p.render(done, false) }

// render draws the bar; the final line says how long it took instead of
// an ETA.
func (p *Progress) render(done int64, final bool) string {
	total := p.total
	if p.totalFn != nil {
		total = p.totalFn()
	}
	if done < 0 {
		done = 0
	}
	if total > 0 && done > total {
		done = total
	}
	elapsed := p.now().Sub(p.start)
	frac := 0.0
	if total > 0 {
		frac = float64(done) / float64(total)
	}
	filled := int(frac * barWidth)
	bar := strings.Repeat("=", filled)
	if filled < barWidth {
		bar += ">" + strings.Repeat(" ", barWidth-filled-1)
	}
	rate := 0.0
	if s := elapsed.Seconds(); s > 0 {
		rate = float64(done) / s
	}
	eta := "ETA --"
	switch {
	case final || (total > 0 && done >= total):
		eta = "in " + elapsed.Round(time.Millisecond).String()
	case rate > 0:
		eta = "ETA " + time.Duration(float64(total-done)/rate*float64(time.Second)).Round(time.Second).String()
	}
	detail := ""
	if p.detail != nil {
		detail = " " + p.detail()
	}
	if p.plain {
		return fmt.Sprintf("%s: %3.0f%%%s, %s/%s, %s/s, %s", p.label, frac*100, detail, human(done), human(total), human(int64(rate)), eta)
	}
	return fmt.Sprintf("%s [%s] %3.0f%%%s %s/%s %s/s %s", p.label, bar, frac*100, detail, human(done), human(total), human(int64(rate)), eta)
}

func human(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
