package main

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// sample is one set of figures for the host: its process (RSS, open
// descriptors described by target, threads), its Go runtime as /metrics
// reports it (goroutines, heap), the arena, and the plugins' processes.
type sample struct {
	Phase   string    `json:"phase"`
	Host    procStats `json:"host"`
	Go      goStats   `json:"go"`
	Arena   uint64    `json:"arena_allocated"`
	Plugins procStats `json:"plugins"`
	// FDs are the host's descriptors by target (sockets resolved to their
	// TCP or unix endpoint, inode numbers dropped), for diffs between
	// phases.
	FDs map[string]int `json:"fds_by_target"`
	// PluginFDs are the plugins' descriptors, "plugin: target".
	PluginFDs map[string]int `json:"plugin_fds_by_target"`
	// GCsAwaited is how many garbage collections the host completed
	// between the end of the phase and the figures (awaitGC).
	GCsAwaited int `json:"gcs_awaited"`
}

// goStats are the host's Go runtime figures (prometheus' Go collector).
type goStats struct {
	Goroutines int `json:"goroutines"`
	// HeapAlloc is live objects plus garbage not yet collected: right
	// after the collections awaitGC waits for, it is the live heap.
	// HeapInuse counts whole spans (fragmentation included); HeapIdle −
	// HeapReleased is free heap the runtime keeps mapped for reuse.
	HeapAlloc    int64 `json:"heap_alloc_bytes"`
	HeapInuse    int64 `json:"heap_inuse_bytes"`
	HeapIdle     int64 `json:"heap_idle_bytes"`
	HeapReleased int64 `json:"heap_released_bytes"`
	NextGC       int64 `json:"next_gc_bytes"`
	StackInuse   int64 `json:"stack_inuse_bytes"`
}

// awaitGC drives the host through n garbage collections with read-only
// scrapes of GET /metrics (each allocates what it encodes), so the heap
// figures that follow are those of a collection that began after the
// phase: HeapAlloc is then the heap the host retains, not the garbage of
// the last requests. It gives up after 20 s or 5,000 scrapes and returns how
// many collections it saw.
func (c *client) awaitGC(n int) int {
	count := func() int {
		status, b, err := c.send(req{method: "GET", path: "/metrics"})
		if err != nil || status != 200 {
			return -1
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "go_gc_duration_seconds_count "); ok {
				k, _ := strconv.ParseFloat(v, 64)
				return int(k)
			}
		}
		return -1
	}
	start := count()
	if start < 0 {
		return 0
	}
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; i < 5000 && time.Now().Before(deadline); i++ {
		if k := count(); k-start >= n {
			return k - start
		}
	}
	return count() - start
}

// goMetrics reads the Go collector's figures from GET /metrics.
func (c *client) goMetrics() goStats {
	var g goStats
	status, b, err := c.send(req{method: "GET", path: "/metrics"})
	if err != nil || status != 200 {
		return g
	}
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		v, err := strconv.ParseFloat(f[1], 64)
		if err != nil {
			continue
		}
		switch f[0] {
		case "go_goroutines":
			g.Goroutines = int(v)
		case "go_memstats_heap_alloc_bytes":
			g.HeapAlloc = int64(v)
		case "go_memstats_heap_inuse_bytes":
			g.HeapInuse = int64(v)
		case "go_memstats_heap_idle_bytes":
			g.HeapIdle = int64(v)
		case "go_memstats_heap_released_bytes":
			g.HeapReleased = int64(v)
		case "go_memstats_next_gc_bytes":
			g.NextGC = int64(v)
		case "go_memstats_stack_inuse_bytes":
			g.StackInuse = int64(v)
		}
	}
	return g
}

// take samples the host (pid) and its plugins; the metrics and arena
// scrapes come first, so the descriptors they use are closed again
// (idle connections are dropped before the count).
func (c *client) take(phase string, pid int) sample {
	gcs := c.awaitGC(2)
	s := sample{Phase: phase, Go: c.goMetrics(), Arena: c.arenaAllocated(), GCsAwaited: gcs}
	s.Plugins, s.PluginFDs = c.pluginStats()
	c.http.CloseIdleConnections()
	waitClosed(pid)
	s.Host = stats(pid)
	s.FDs = fdTargets(pid)
	return s
}

var inodeRE = regexp.MustCompile(`^(socket|pipe|anon_inode):\[?([^\]]*)\]?$`)

// fdTargets describes each open descriptor of pid: a path, "pipe",
// "anon_inode:[eventpoll]", or a socket as its endpoint ("tcp LISTEN
// 127.0.0.1:PORT", "tcp ESTABLISHED 127.0.0.1:A->127.0.0.1:B", "unix
// /path" or "unix (unnamed)").
func fdTargets(pid int) map[string]int {
	socks := sockets(pid)
	out := map[string]int{}
	es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return out
	}
	for _, e := range es {
		t, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		if m := inodeRE.FindStringSubmatch(t); m != nil {
			switch m[1] {
			case "socket":
				if d, ok := socks[m[2]]; ok {
					t = d
				} else {
					t = "socket (not in /proc/net)"
				}
			case "pipe":
				t = "pipe"
			}
		}
		// Temporary data directories and segment numbers differ by run.
		t = regexp.MustCompile(`arenahost-abuse-\d+`).ReplaceAllString(t, "DATA")
		out[t]++
	}
	return out
}

// sockets maps socket inodes of pid's network namespace to a description.
func sockets(pid int) map[string]string {
	out := map[string]string{}
	tcpState := map[string]string{"01": "ESTABLISHED", "02": "SYN_SENT", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "0A": "LISTEN"}
	for _, name := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, name))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 10 {
				continue
			}
			st := tcpState[f[3]]
			if st == "" {
				st = "state " + f[3]
			}
			d := "tcp " + st + " " + hexAddr(f[1])
			if st != "LISTEN" {
				// The peer's port is ephemeral: keep only the local end's.
				d += "->" + strings.Split(hexAddr(f[2]), ":")[0]
			}
			out[f[9]] = d
		}
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/unix", pid)); err == nil {
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 7 {
				continue
			}
			d := "unix (unnamed)"
			if len(f) >= 8 {
				d = "unix " + socketDir(f[7])
			}
			out[f[6]] = d
		}
	}
	return out
}

// socketDir keeps a unix socket's directory kind and file name, not the
// per-run random part (the host's $TMPDIR/arenahost-PID-RANDOM/).
func socketDir(p string) string {
	dir, file := filepath.Split(p)
	base := filepath.Base(dir)
	if i := strings.IndexByte(base, '-'); i > 0 {
		base = base[:i] + "-*"
	}
	file = regexp.MustCompile(`\d+`).ReplaceAllString(file, "N")
	return filepath.Join(base, file)
}

func hexAddr(s string) string {
	host, port, ok := strings.Cut(s, ":")
	if !ok {
		return s
	}
	p, _ := strconv.ParseUint(port, 16, 16)
	if len(host) == 8 {
		v, _ := strconv.ParseUint(host, 16, 32)
		return fmt.Sprintf("%d.%d.%d.%d:%d", v&0xff, v>>8&0xff, v>>16&0xff, v>>24, p)
	}
	return "[" + host + "]:" + strconv.FormatUint(p, 10)
}

// waitClosed gives the host a moment to close the connections the
// client just dropped (it sees their EOF asynchronously).
func waitClosed(pid int) {
	for range 20 {
		if !slices.ContainsFunc(mapKeys(fdTargets(pid)), func(t string) bool { return strings.HasPrefix(t, "tcp ESTABLISHED") }) {
			return
		}
		sleep100ms()
	}
}

func mapKeys(m map[string]int) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// fdDiff lists the targets whose count changed from a to b: "+1 path".
func fdDiff(a, b map[string]int) []string {
	var out []string
	for _, k := range mapKeys(union(a, b)) {
		if d := b[k] - a[k]; d != 0 {
			out = append(out, fmt.Sprintf("%+d %s", d, k))
		}
	}
	return out
}

func union(a, b map[string]int) map[string]int {
	u := map[string]int{}
	for k := range a {
		u[k] = 1
	}
	for k := range b {
		u[k] = 1
	}
	return u
}

// table prints the samples side by side, and what the descriptors did
// between consecutive phases.
func table(ss []sample) string {
	var b strings.Builder
	mb := func(kib int64) string { return fmt.Sprintf("%.1f MB", float64(kib)/1000) }
	mbb := func(n int64) string { return fmt.Sprintf("%.1f MB", float64(n)/1e6) }
	row := func(name string, f func(s sample) string) {
		fmt.Fprintf(&b, "%-34s", name)
		for _, s := range ss {
			fmt.Fprintf(&b, " %22s", f(s))
		}
		b.WriteByte('\n')
	}
	row("", func(s sample) string { return s.Phase })
	row("host RSS", func(s sample) string { return mb(s.Host.RSSKiB) })
	row("host RSS anon / shmem", func(s sample) string { return mb(s.Host.AnonKiB) + " / " + mb(s.Host.ShmemKiB) })
	row("host open files", func(s sample) string { return strconv.Itoa(s.Host.FDs) })
	row("host threads", func(s sample) string { return strconv.Itoa(s.Host.Threads) })
	row("host goroutines", func(s sample) string { return strconv.Itoa(s.Go.Goroutines) })
	row("Go heap live (alloc after GCs)", func(s sample) string { return mbb(s.Go.HeapAlloc) })
	row("Go heap spans in use", func(s sample) string { return mbb(s.Go.HeapInuse) })
	row("Go heap idle, not released", func(s sample) string { return mbb(s.Go.HeapIdle - s.Go.HeapReleased) })
	row("GCs awaited before the figures", func(s sample) string { return strconv.Itoa(s.GCsAwaited) })
	row("arena allocated", func(s sample) string { return strconv.FormatUint(s.Arena, 10) + " B" })
	row("plugins RSS / files / threads", func(s sample) string {
		return fmt.Sprintf("%s / %d / %d", mb(s.Plugins.RSSKiB), s.Plugins.FDs, s.Plugins.Threads)
	})
	for i := 1; i < len(ss); i++ {
		d := fdDiff(ss[i-1].FDs, ss[i].FDs)
		if len(d) == 0 {
			d = []string{"none"}
		}
		fmt.Fprintf(&b, "host descriptors, %s -> %s: %s\n", ss[i-1].Phase, ss[i].Phase, strings.Join(d, "; "))
		d = fdDiff(ss[i-1].PluginFDs, ss[i].PluginFDs)
		if len(d) == 0 {
			d = []string{"none"}
		}
		fmt.Fprintf(&b, "plugin descriptors, %s -> %s: %s\n", ss[i-1].Phase, ss[i].Phase, strings.Join(d, "; "))
	}
	return b.String()
}

func sleep100ms() { time.Sleep(100 * time.Millisecond) }

// leakCheck compares the figures after the last pass with those after the
// first: the same descriptors and arena bytes, and no more than noise in
// threads, goroutines and retained Go heap (measured after two
// collections). Growth between start and the first pass is one-time
// (reported, not a failure).
func leakCheck(ss []sample) []string {
	if len(ss) < 3 {
		return nil
	}
	a, b := ss[1], ss[len(ss)-1]
	var out []string
	if d := fdDiff(a.FDs, b.FDs); len(d) > 0 {
		out = append(out, fmt.Sprintf("leak: host descriptors, %s -> %s: %s", a.Phase, b.Phase, strings.Join(d, "; ")))
	}
	if a.Arena != b.Arena {
		out = append(out, fmt.Sprintf("leak: arena allocated %d -> %d B", a.Arena, b.Arena))
	}
	if b.Host.Threads > a.Host.Threads+2 {
		out = append(out, fmt.Sprintf("leak: host threads %d -> %d", a.Host.Threads, b.Host.Threads))
	}
	if b.Go.Goroutines > a.Go.Goroutines+3 {
		out = append(out, fmt.Sprintf("leak: host goroutines %d -> %d", a.Go.Goroutines, b.Go.Goroutines))
	}
	if b.Go.HeapAlloc > a.Go.HeapAlloc+heapNoise {
		out = append(out, fmt.Sprintf("leak: host Go heap %.1f -> %.1f MB after collections", float64(a.Go.HeapAlloc)/1e6, float64(b.Go.HeapAlloc)/1e6))
	}
	return out
}

// heapNoise is the heap growth between passes taken as noise: bounded
// buffers that fill over the first passes (1,000 log lines per plugin, the
// console's ten minutes of arena samples) and the requests in flight
// during the collections.
const heapNoise = 1_500_000
