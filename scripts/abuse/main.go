// Command abuse is the bounded abuse run of issue 15: it starts a real
// `arenahost serve` on loopback with a fresh data directory, sends it
// hostile requests across every category the issue lists (internal plugin
// methods through /v1/jobs, rebinding Hosts and foreign Origins, malformed
// bodies, escaping and special paths, huge strengths, image-count overflow,
// websockets) plus malformed model and LoRA files of each kind, and runs the
// CLI's inspect on every malformed file. It reports the responses of 500,
// hangs over the timeout, panics, the model digest before and after, and
// the resources after start (and a warm-up) and after each pass over the
// whole request set (--passes, 2 by default): the host's RSS (anon and
// shmem), open descriptors listed by target, threads, goroutines and Go
// heap (after driving the host through two garbage collections, so garbage
// is not counted as retained), the arena's allocated bytes, and the
// plugins' processes. The first pass may grow what is created once (the
// arena's spare segment, Go runtime threads, pools); a leak shows as growth
// from one pass to the next, which the run checks (leakCheck). Everything
// stays on 127.0.0.1. It exits 1 when a 500, a hang, a panic, a digest
// change or a leak occurred.
//
//	go run ./scripts/abuse --bin bin/arenahost [--requests 1200] [--files 50] [--passes 2]
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/arenahost/arenahost/shared/safetensors"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "abuse:", err)
		os.Exit(1)
	}
}

type options struct {
	bin      string
	requests int
	files    int
	timeout  time.Duration
	seed     uint64
	passes   int
}

// result counts what the run saw.
type result struct {
	Requests   int            `json:"requests"`
	ByCategory map[string]int `json:"by_category"`
	ByStatus   map[int]int    `json:"by_status"`
	Status500  int            `json:"status_500"`
	Hangs      int            `json:"hangs"`
	NotJSON    int            `json:"not_json"`
	Panics     int            `json:"panics"`
	HostAlive  bool           `json:"host_alive"`
	CLIRuns    int            `json:"cli_runs"`
	CLIHangs   int            `json:"cli_hangs"`
	CLICrashes int            `json:"cli_crashes"`
	Files      map[string]int `json:"malformed_files"`
	// LoadedCorrupt are malformed models that loaded (corruptions that
	// leave a valid checkpoint); they are unloaded before the figures.
	LoadedCorrupt []string  `json:"loaded_corrupt,omitempty"`
	Digest        [2]string `json:"digest_before_after"`
	// Samples are the figures after start (and a warm-up), after the
	// first pass and after each later one.
	Samples  []sample `json:"samples"`
	Failures []string `json:"failures,omitempty"`
}

type procStats struct {
	RSSKiB int64 `json:"rss_kib"`
	// AnonKiB is private memory (heap, stacks); ShmemKiB the arena's
	// shared-memory pages the process has touched.
	AnonKiB  int64 `json:"rss_anon_kib"`
	ShmemKiB int64 `json:"rss_shmem_kib"`
	FDs      int   `json:"fds"`
	Threads  int   `json:"threads"`
}

func run() error {
	var o options
	flag.StringVar(&o.bin, "bin", "bin/arenahost", "the arenahost binary (make build)")
	flag.IntVar(&o.requests, "requests", 1200, "hostile requests to send (at least 1000 for the issue's bound)")
	flag.IntVar(&o.files, "files", 50, "malformed files of each kind (models, LoRAs)")
	flag.DurationVar(&o.timeout, "timeout", 5*time.Second, "a request or CLI run longer than this is a hang")
	flag.Uint64Var(&o.seed, "seed", 15, "random seed of the corruptions")
	flag.IntVar(&o.passes, "passes", 2, "passes over the requests; figures are taken after the first and the last (a leak grows between them)")
	flag.Parse()
	bin, err := filepath.Abs(o.bin)
	if err != nil {
		return err
	}
	data, err := os.MkdirTemp("", "arenahost-abuse-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(data)
	port, err := freePort()
	if err != nil {
		return err
	}
	base := "http://127.0.0.1:" + strconv.Itoa(port)
	var stderr bytes.Buffer
	cmd := exec.Command(bin, "serve", "--listen", "127.0.0.1:"+strconv.Itoa(port), "--data", data, "--arena-capacity", "4GiB")
	cmd.Stdout, cmd.Stderr = io.Discard, &stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}()
	c := &client{base: base, http: &http.Client{Timeout: o.timeout}}
	if err := c.waitReady(90 * time.Second); err != nil {
		return fmt.Errorf("%w\n%s", err, tail(stderr.String(), 2000))
	}
	var res result
	res.ByCategory, res.ByStatus, res.Files = map[string]int{}, map[int]int{}, map[string]int{}
	model := c.firstModel()
	if model == "" {
		return errors.New("the host loaded no sample model")
	}
	res.Digest[0] = c.digest(model)
	// Warm up what legitimate traffic allocates once (the reference
	// pipeline's step buffer, a side plan and its removal), so the start
	// figures are those of a host that has served.
	c.warmUp()
	time.Sleep(time.Second)
	c.http.CloseIdleConnections()
	res.Samples = append(res.Samples, c.take("after start", cmd.Process.Pid))

	files, err := writeMalformed(data, o)
	if err != nil {
		return err
	}
	for k, v := range files.count {
		res.Files[k] = v
	}
	reqs := requests(files, model, base, port)
	rng := rand.New(rand.NewPCG(o.seed, 1))
	// Every request once, then random ones until the count.
	order := make([]int, 0, max(o.requests, len(reqs)))
	for i := range reqs {
		order = append(order, i)
	}
	for len(order) < o.requests {
		order = append(order, rng.IntN(len(reqs)))
	}
	pass := func() {
		for _, i := range order {
			c.one(&res, reqs[i])
		}
	}
	for p := range o.passes {
		pass()
		c.settle(model, &res)
		res.Samples = append(res.Samples, c.take(fmt.Sprintf("after pass %d", p+1), cmd.Process.Pid))
	}
	// The CLI on every malformed file: no hang, no crash (exit 2 is a Go
	// panic; 1 is the one-line error).
	for _, f := range files.all {
		res.CLIRuns++
		ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
		out, err := exec.CommandContext(ctx, bin, "inspect", f).CombinedOutput()
		hung := errors.Is(ctx.Err(), context.DeadlineExceeded)
		cancel()
		var ee *exec.ExitError
		switch {
		case hung:
			res.CLIHangs++
			res.Failures = append(res.Failures, "cli hang: inspect "+f)
		case errors.As(err, &ee) && ee.ExitCode() != 1:
			res.CLICrashes++
			res.Failures = append(res.Failures, fmt.Sprintf("cli exit %d: inspect %s: %s", ee.ExitCode(), f, tail(string(out), 300)))
		}
	}

	res.Digest[1] = c.digest(model)
	select {
	case err := <-exited:
		res.Failures = append(res.Failures, fmt.Sprintf("host exited: %v", err))
		exited <- err
	default:
		res.HostAlive = true
	}
	res.Panics = strings.Count(stderr.String(), "panic:")
	res.Failures = append(res.Failures, leakCheck(res.Samples)...)
	sort.Strings(res.Failures)
	b, _ := json.MarshalIndent(res, "", "  ")
	fmt.Println(string(b))
	fmt.Print("\n" + table(res.Samples))
	if res.Status500 > 0 || res.Hangs > 0 || res.Panics > 0 || res.CLIHangs > 0 || res.CLICrashes > 0 || !res.HostAlive ||
		res.Digest[0] == "" || res.Digest[0] != res.Digest[1] || len(leakCheck(res.Samples)) > 0 {
		return errors.New("the host failed the abuse run (see failures)")
	}
	return nil
}

// one sends r and counts what it got.
func (c *client) one(res *result, r req) {
	status, body, err := c.send(r)
	res.Requests++
	res.ByCategory[r.category]++
	switch {
	case isTimeout(err):
		res.Hangs++
		res.Failures = append(res.Failures, fmt.Sprintf("hang: %s %s %s", r.category, r.method, r.path))
		return
	case err != nil:
		res.Failures = append(res.Failures, fmt.Sprintf("error: %s %s %s: %v", r.category, r.method, r.path, err))
		return
	}
	res.ByStatus[status]++
	if status == http.StatusInternalServerError {
		res.Status500++
		res.Failures = append(res.Failures, fmt.Sprintf("500: %s %s %s: %s", r.category, r.method, r.path, tail(string(body), 300)))
	}
	if !r.stream && !json.Valid(body) {
		res.NotJSON++
		res.Failures = append(res.Failures, fmt.Sprintf("not JSON: %s %s %s (%d): %q", r.category, r.method, r.path, status, tail(string(body), 100)))
	}
	if r.want != 0 && status != r.want && !(r.want == 400 && status == 404) {
		res.Failures = append(res.Failures, fmt.Sprintf("status %d, want %d: %s %s %s: %s", status, r.want, r.category, r.method, r.path, tail(string(body), 200)))
	}
}

// settle removes what the run left (LoRAs, corrupt models that loaded),
// closes idle connections and waits, so the figures that follow compare
// with those after start.
func (c *client) settle(model string, res *result) {
	_, _, _ = c.send(req{method: "DELETE", path: "/v1/loras"})
	var ms []struct{ Name string }
	_ = c.getJSON("/v1/models", &ms)
	for _, m := range ms {
		if m.Name != model {
			if !slices.Contains(res.LoadedCorrupt, m.Name) {
				res.LoadedCorrupt = append(res.LoadedCorrupt, m.Name)
			}
			_, _, _ = c.send(req{method: "DELETE", path: "/v1/models/" + m.Name})
		}
	}
	c.http.CloseIdleConnections()
	time.Sleep(2 * time.Second)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// stats reads a process's RSS, open descriptors and threads from /proc.
func stats(pid int) procStats {
	var s procStats
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			switch f[0] {
			case "VmRSS:":
				s.RSSKiB, _ = strconv.ParseInt(f[1], 10, 64)
			case "RssAnon:":
				s.AnonKiB, _ = strconv.ParseInt(f[1], 10, 64)
			case "RssShmem:":
				s.ShmemKiB, _ = strconv.ParseInt(f[1], 10, 64)
			case "Threads:":
				s.Threads, _ = strconv.Atoi(f[1])
			}
		}
	}
	if es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		s.FDs = len(es)
	}
	return s
}

// req is one request and the status it should get (0: any non-500).
type req struct {
	category     string
	method, path string
	body         []byte
	header       map[string]string
	want         int
	stream       bool
}

type client struct {
	base string
	http *http.Client
}

func (c *client) send(r req) (int, []byte, error) {
	hr, err := http.NewRequest(r.method, c.base+r.path, bytes.NewReader(r.body))
	if err != nil {
		return 0, nil, err
	}
	for k, v := range r.header {
		if k == "Host" {
			hr.Host = v
			continue
		}
		hr.Header.Set(k, v)
	}
	resp, err := c.http.Do(hr)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	return resp.StatusCode, b, err
}

func (c *client) getJSON(path string, v any) error {
	status, b, err := c.send(req{method: "GET", path: path})
	if err != nil {
		return err
	}
	if status != http.StatusOK {
		return fmt.Errorf("GET %s: %d %s", path, status, b)
	}
	return json.Unmarshal(b, v)
}

type pluginInfo struct {
	Name  string `json:"name"`
	Kind  string `json:"kind"`
	State string `json:"state"`
	PID   int    `json:"pid"`
}

// waitReady waits for /v1/health and for every plugin to settle (serving,
// failed, or unavailable: its requirements are not met on this machine, so
// it will not start, e.g. diffusers-flux without torch).
func (c *client) waitReady(bound time.Duration) error {
	deadline := time.Now().Add(bound)
	for time.Now().Before(deadline) {
		var ps []pluginInfo
		if err := c.getJSON("/v1/plugins", &ps); err == nil && len(ps) > 0 {
			settled := true
			for _, p := range ps {
				if p.State != "serving" && p.State != "failed" && p.State != "unavailable" {
					settled = false
				}
			}
			if settled {
				return nil
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("host at %s not ready after %v", c.base, bound)
}

func (c *client) warmUp() {
	status, b, err := c.send(req{method: "POST", path: "/v1/jobs", body: []byte(`{"pipeline": "reference-pipeline", "params": {"steps": 2}, "preview": {"method": "none"}}`)})
	if err == nil && status == http.StatusCreated {
		var j struct{ ID string }
		_ = json.Unmarshal(b, &j)
		for range 100 {
			var s struct{ State string }
			if c.getJSON("/v1/jobs/"+j.ID, &s) != nil || s.State == "done" || s.State == "failed" || s.State == "cancelled" {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	_, _, _ = c.send(req{method: "POST", path: "/v1/loras/apply", body: []byte(`{"loras": [{"name": "flux-sample-kohya-lora", "strength": 0.5}]}`)})
	_, _, _ = c.send(req{method: "DELETE", path: "/v1/loras"})
}

func (c *client) firstModel() string {
	var ms []struct{ Name string }
	if err := c.getJSON("/v1/models", &ms); err != nil || len(ms) == 0 {
		return ""
	}
	return ms[0].Name
}

func (c *client) digest(model string) string {
	var d struct{ SHA256 string }
	if err := c.getJSON("/v1/models/"+model+"/digest", &d); err != nil {
		return ""
	}
	return d.SHA256
}

func (c *client) arenaAllocated() uint64 {
	var a struct{ Allocated uint64 }
	_ = c.getJSON("/v1/arena", &a)
	return a.Allocated
}

// pluginStats sums the serving plugins' process figures, and lists their
// descriptors by target ("plugin: target").
func (c *client) pluginStats() (procStats, map[string]int) {
	var ps []pluginInfo
	var sum procStats
	fds := map[string]int{}
	if c.getJSON("/v1/plugins", &ps) != nil {
		return sum, fds
	}
	for _, p := range ps {
		if p.PID > 0 {
			s := stats(p.PID)
			sum.RSSKiB, sum.FDs, sum.Threads = sum.RSSKiB+s.RSSKiB, sum.FDs+s.FDs, sum.Threads+s.Threads
			sum.AnonKiB, sum.ShmemKiB = sum.AnonKiB+s.AnonKiB, sum.ShmemKiB+s.ShmemKiB
			for t, n := range fdTargets(p.PID) {
				fds[p.Name+": "+t] += n
			}
		}
	}
	return sum, fds
}

// malformed are the files written for the run, relative to their
// directories, by kind.
type malformed struct {
	models, loras []string // names relative to models/ and loras/
	kinds         map[string]string
	specials      []string // in both directories
	all           []string // absolute paths, for the CLI
	count         map[string]int
	huge          string // a LoRA of finite values whose product is not
}

// writeMalformed writes o.files corrupt models and o.files corrupt LoRAs
// (cycling through the kinds of corruption) and the special files.
func writeMalformed(data string, o options) (*malformed, error) {
	mdir, ldir := filepath.Join(data, "models"), filepath.Join(data, "loras")
	model, err := firstFile(mdir)
	if err != nil {
		return nil, err
	}
	lora, err := firstFile(ldir, "kohya")
	if err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewPCG(o.seed, 2))
	m := &malformed{count: map[string]int{}, kinds: map[string]string{}}
	put := func(dir, sub, name string, b []byte) error {
		p := filepath.Join(dir, "abuse", name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return err
		}
		rel := filepath.Join("abuse", name)
		m.kinds[rel] = strings.TrimSuffix(name[strings.LastIndexByte(name, '-')+1:], ".safetensors")
		if sub == "model" {
			m.models = append(m.models, rel)
		} else {
			m.loras = append(m.loras, rel)
		}
		m.all = append(m.all, p)
		return nil
	}
	clean, err := os.ReadFile(model)
	if err != nil {
		return nil, err
	}
	cleanLoRA, err := os.ReadFile(lora)
	if err != nil {
		return nil, err
	}
	kinds := []string{"truncated", "header-length", "header-bytes", "garbage", "empty", "nan", "inf", "huge", "offsets", "shape"}
	for i := range o.files {
		for _, sub := range []string{"model", "lora"} {
			src, dir := clean, mdir
			if sub == "lora" {
				src, dir = cleanLoRA, ldir
			}
			kind := kinds[i%len(kinds)]
			b, err := corrupt(src, kind, rng, sub == "model")
			if err != nil {
				return nil, fmt.Errorf("%s %s: %w", sub, kind, err)
			}
			if err := put(dir, sub, fmt.Sprintf("%s-%02d-%s.safetensors", sub, i, kind), b); err != nil {
				return nil, err
			}
			m.count[sub+"s"]++
			if sub == "lora" && kind == "huge" && m.huge == "" {
				m.huge = strings.TrimSuffix(filepath.Join("abuse", fmt.Sprintf("%s-%02d-%s.safetensors", sub, i, kind)), ".safetensors")
			}
		}
	}
	for _, dir := range []string{mdir, ldir} {
		sp := filepath.Join(dir, "special")
		if err := os.MkdirAll(sp, 0o755); err != nil {
			return nil, err
		}
		for _, name := range []string{"fifo", "fifo2"} {
			if err := syscall.Mkfifo(filepath.Join(sp, name+".safetensors"), 0o600); err != nil {
				return nil, err
			}
		}
		if err := os.Mkdir(filepath.Join(sp, "dir.safetensors"), 0o755); err != nil {
			return nil, err
		}
		if err := os.Symlink("loop.safetensors", filepath.Join(sp, "loop.safetensors")); err != nil {
			return nil, err
		}
		if err := os.Symlink("/dev/zero", filepath.Join(sp, "zero.safetensors")); err != nil {
			return nil, err
		}
		if err := os.Symlink("/etc/hostname", filepath.Join(sp, "out.safetensors")); err != nil {
			return nil, err
		}
		if ln, err := net.Listen("unix", filepath.Join(sp, "sock.safetensors")); err == nil {
			ln.(*net.UnixListener).SetUnlinkOnClose(false) // the socket file stays; nobody listens
			ln.Close()
		}
	}
	for _, n := range []string{"fifo", "fifo2", "dir", "loop", "zero", "out", "sock"} {
		m.specials = append(m.specials, "special/"+n+".safetensors")
		m.all = append(m.all, filepath.Join(mdir, "special", n+".safetensors"))
	}
	m.count["special"] = len(m.specials) * 2
	return m, nil
}

func firstFile(dir string, contains ...string) (string, error) {
	es, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	for _, e := range es {
		if strings.HasSuffix(e.Name(), ".safetensors") && (len(contains) == 0 || strings.Contains(e.Name(), contains[0])) {
			return filepath.Join(dir, e.Name()), nil
		}
	}
	return "", fmt.Errorf("no sample file in %s", dir)
}

// corrupt returns src damaged in one way.
func corrupt(src []byte, kind string, rng *rand.Rand, model bool) ([]byte, error) {
	hlen := int(binary.LittleEndian.Uint64(src))
	out := append([]byte(nil), src...)
	switch kind {
	case "truncated":
		return out[:rng.IntN(len(out)-1)+1], nil
	case "header-length":
		binary.LittleEndian.PutUint64(out, []uint64{0, 1, math.MaxUint64, uint64(len(src)), uint64(hlen + 1)}[rng.IntN(5)])
		return out, nil
	case "header-bytes":
		for range 1 + rng.IntN(4) {
			out[8+rng.IntN(hlen)] = byte(rng.IntN(256))
		}
		return out, nil
	case "garbage":
		b := make([]byte, 8+rng.IntN(4096))
		for i := range b {
			b[i] = byte(rng.IntN(256))
		}
		return b, nil
	case "empty":
		return nil, nil
	}
	// The rest rewrite tensors through the safetensors writer.
	dir, err := os.MkdirTemp("", "abuse-corrupt-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	in := filepath.Join(dir, "in.safetensors")
	if err := os.WriteFile(in, src, 0o644); err != nil {
		return nil, err
	}
	f, err := safetensors.Open(in)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var ts []safetensors.WriteTensor
	done := false
	for _, info := range f.Tensors {
		b, err := f.TensorData(info)
		if err != nil {
			return nil, err
		}
		b = append([]byte(nil), b...)
		shape := append([]int64(nil), info.Shape...)
		var target bool
		switch {
		case kind == "shape" || kind == "offsets":
			target = !done && len(shape) == 2
		case model:
			target = !done && strings.HasSuffix(info.Name, "absmax") && info.DType == safetensors.F32
		case kind == "huge":
			target = strings.Contains(info.Name, "lora_up") || strings.Contains(info.Name, "lora_down") // every factor: the product overflows
		default:
			target = !done && strings.Contains(info.Name, "lora_up")
		}
		if target {
			done = true
			switch kind {
			case "nan", "inf":
				v := map[string]float32{"nan": float32(math.NaN()), "inf": float32(math.Inf(-1))}[kind]
				setAll(b, info.DType, v, rng.IntN(4) == 0)
			case "huge":
				setAll(b, info.DType, 3e38, true)
			case "offsets", "shape":
				if len(shape) == 2 {
					shape[0], shape[1] = shape[1], shape[0]
					if shape[0] == shape[1] || kind == "offsets" {
						shape[0]++
						b = append(b, make([]byte, int(shape[1])*info.DType.Size())...)
					}
				}
			}
		}
		ts = append(ts, safetensors.WriteTensor{Name: info.Name, DType: info.DType, Shape: shape, Data: b})
	}
	outPath := filepath.Join(dir, "out.safetensors")
	if err := safetensors.WriteFile(outPath, f.Metadata, ts); err != nil {
		return nil, err
	}
	return os.ReadFile(outPath)
}

// setAll sets every element (or only the first) of little-endian data of
// dtype to v.
func setAll(b []byte, dt safetensors.DType, v float32, all bool) {
	size := dt.Size()
	for i := 0; i+size <= len(b); i += size {
		switch dt {
		case safetensors.F32:
			binary.LittleEndian.PutUint32(b[i:], math.Float32bits(v))
		case safetensors.BF16:
			binary.LittleEndian.PutUint16(b[i:], uint16(math.Float32bits(v)>>16))
		case safetensors.F16:
			h := uint16(0x7bff) // 65504
			if math.IsNaN(float64(v)) {
				h = 0x7e00
			} else if math.IsInf(float64(v), 0) {
				h = 0xfc00
			}
			binary.LittleEndian.PutUint16(b[i:], h)
		}
		if !all {
			return
		}
	}
}

// requests is the catalogue of hostile (and some legitimate) requests.
func requests(m *malformed, model, base string, port int) []req {
	js := func(v any) []byte { b, _ := json.Marshal(v); return b }
	p := strconv.Itoa(port)
	var out []req
	add := func(cat string, want int, method, path string, body []byte, h map[string]string) {
		out = append(out, req{category: cat, method: method, path: path, body: body, header: h, want: want})
	}
	// 1. Internal plugin methods through /v1/jobs.
	for _, pm := range [][2]string{{"lora-nf4", "inspect"}, {"lora-nf4", "apply"}, {"lora-nf4", "remove"}, {"lora-nf4", "set_strengths"},
		{"lora-nf4", "open_model"}, {"preview", "render.factor"}, {"preview", "render.taesd"}, {"reference-pipeline", "warmup"}, {"nope", "run"}} {
		add("internal-methods", 0, "POST", "/v1/jobs", js(map[string]any{"pipeline": pm[0], "method": pm[1],
			"params": map[string]any{"path": "/etc/passwd", "loras": []map[string]any{{"path": "/etc/hostname", "strength": 1}}}}), nil)
	}
	// 2. Rebinding Hosts on every kind of route.
	for _, r := range [][2]string{{"GET", "/v1/models"}, {"GET", "/"}, {"GET", "/v1/loras/state"}, {"GET", "/ws"}, {"DELETE", "/v1/models/" + model},
		{"POST", "/v1/loras/apply"}, {"GET", "/metrics"}, {"GET", "/sdapi/v1/loras"}} {
		for _, host := range []string{"evil.example:" + p, "evil.example", "127.0.0.1.nip.io:" + p, "localhost.evil.example:" + p} {
			add("rebinding-host", 403, r[0], r[1], []byte(`{}`), map[string]string{"Host": host, "Origin": "http://" + host})
		}
	}
	// 3. Foreign origins on mutating routes and websockets.
	for _, origin := range []string{"http://evil.example", "null", "http://localhost:1", "https://127.0.0.1:" + p + ".evil.example", "file://", "http://[::1]:2"} {
		add("foreign-origin", 403, "DELETE", "/v1/models/"+model, nil, map[string]string{"Origin": origin})
		add("foreign-origin", 403, "POST", "/v1/loras/apply", []byte(`{"loras": []}`), map[string]string{"Origin": origin})
		add("foreign-origin", 403, "GET", "/ws", nil, map[string]string{"Origin": origin, "Upgrade": "websocket", "Connection": "Upgrade"})
	}
	// 4. Malformed bodies.
	deep := strings.Repeat("[", 100000)
	for _, route := range []string{"/v1/loras/apply", "/v1/models", "/v1/jobs", "/sdapi/v1/txt2img"} {
		for _, b := range []string{"null", "[]", `"x"`, "1", "true", "", "{", `{"loras": [}`, deep, `{"a": "` + strings.Repeat("x", 2<<20) + `"}`, "\xff\xfe{}"} {
			add("malformed-body", 0, "POST", route, []byte(b), nil)
		}
	}
	add("malformed-body", 400, "POST", "/v1/loras/apply", []byte(`{"loras": null}`), nil)
	// 5. Paths that escape or name special files.
	paths := []string{"../loras/x.safetensors", "/etc/passwd", "a\x00b", strings.Repeat("n", 5000), strings.Repeat("m", 300) + ".safetensors", "..", "/", "/dev/zero", "/proc/self/mem"}
	for _, s := range m.specials {
		paths = append(paths, s)
	}
	for _, path := range paths {
		add("paths", 400, "POST", "/v1/models", js(map[string]string{"path": path, "name": "abuse"}), nil)
		for _, mode := range []string{"side", "fuse"} {
			add("paths", 400, "POST", "/v1/loras/apply", js(map[string]any{"loras": []map[string]string{{"name": strings.TrimSuffix(path, ".safetensors")}}, "mode": mode}), nil)
		}
	}
	// 6. Strengths.
	kohya := "flux-sample-kohya-lora"
	for _, s := range []string{"1e308", "-1e308", "1e400", "101", "-1e38", `"NaN"`, "null"} {
		for _, mode := range []string{"side", "fuse"} {
			add("strengths", 0, "POST", "/v1/loras/apply", []byte(`{"loras": [{"name": "`+kohya+`", "strength": `+s+`}], "mode": "`+mode+`"}`), nil)
		}
	}
	// 7. Image counts.
	for _, bn := range [][2]string{{"4611686018427387904", "4"}, {"-1", "-1"}, {"9", "1"}, {"3", "3"}, {"9223372036854775807", "9223372036854775807"}, {"1e3", "1"}} {
		add("image-counts", 400, "POST", "/sdapi/v1/txt2img", []byte(`{"prompt": "x", "batch_size": `+bn[0]+`, "n_iter": `+bn[1]+`}`), nil)
	}
	// 8. Malformed files: every model loads and every LoRA applies, both modes.
	for i, f := range m.models {
		want := 400
		switch m.kinds[f] {
		case "huge", "header-bytes", "shape", "offsets":
			// A finite huge absmax, a changed metadata byte, a transposed
			// or grown unquantized tensor: still a valid checkpoint.
			want = 0
		}
		add("malformed-models", want, "POST", "/v1/models", js(map[string]string{"path": f, "name": fmt.Sprintf("abuse-%d", i)}), nil)
	}
	for _, f := range m.loras {
		for _, mode := range []string{"side", "fuse"} {
			add("malformed-loras", 0, "POST", "/v1/loras/apply", js(map[string]any{"loras": []map[string]string{{"name": strings.TrimSuffix(f, ".safetensors")}}, "mode": mode}), nil)
		}
	}
	if m.huge != "" {
		add("non-finite-fuse", 422, "POST", "/v1/loras/apply", js(map[string]any{"loras": []map[string]string{{"name": m.huge}}, "mode": "fuse"}), nil)
	}
	// 9. Legitimate traffic in between, which must keep working.
	add("legit", 200, "POST", "/v1/loras/apply", []byte(`{"loras": [{"name": "`+kohya+`", "strength": 0.5}]}`), nil)
	add("legit", 200, "POST", "/v1/loras/apply", []byte(`{"loras": [{"name": "`+kohya+`", "strength": 0.7}], "mode": "fuse"}`), nil)
	add("legit", 200, "DELETE", "/v1/loras", nil, nil)
	for _, path := range []string{"/v1/loras/state", "/v1/arena", "/v1/models", "/v1/loras", "/v1/plugins", "/v1/jobs", "/v1/health"} {
		add("legit", 200, "GET", path, nil, nil)
	}
	add("legit", 0, "POST", "/v1/jobs", []byte(`{"pipeline": "reference-pipeline", "params": {"steps": 2}, "preview": {"method": "none"}}`), nil)
	return out
}
