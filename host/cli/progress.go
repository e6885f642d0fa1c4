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
			fmt.Fprintf(p.w, "\r%s\n", p.render(p.done(), true))
			return
		case <-t.C:
			fmt.Fprintf(p.w, "\r%s", p.render(p.done(), false))
		}
	}
}

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
	if done < 0 {
		done = 0
	}
	if p.total > 0 && done > p.total {
		done = p.total
	}
	elapsed := p.now().Sub(p.start)
	frac := 0.0
	if p.total > 0 {
		frac = float64(done) / float64(p.total)
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
	case final || (p.total > 0 && done >= p.total):
		eta = "in " + elapsed.Round(time.Millisecond).String()
	case rate > 0:
		eta = "ETA " + time.Duration(float64(p.total-done)/rate*float64(time.Second)).Round(time.Second).String()
	}
	return fmt.Sprintf("%s [%s] %3.0f%% %s/%s %s/s %s", p.label, bar, frac*100, human(done), human(p.total), human(int64(rate)), eta)
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
