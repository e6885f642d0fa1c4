package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/arenahost/arenahost/shared/samples"
)

// ServedOptions says which two hosts the served check compares: the same
// sample model and LoRAs on a CPU arena (CPU) and on a device arena
// (Device, started with DeviceArgs such as --arena-backend cuda).
type ServedOptions struct {
	CPU        string
	Device     string
	DeviceArgs []string
	// Env is added to both hosts' environment.
	Env []string
	// StartTimeout bounds each host's start (sample model written and
	// loaded, lora-nf4 serving).
	StartTimeout time.Duration
}

// sampleLoRAs are the LoRAs every host writes on first run (shared/samples),
// applied together with these strengths.
var sampleLoRAs = []map[string]any{
	{"name": "flux-sample-kohya-lora", "strength": 0.8},
	{"name": "flux-sample-peft-lora.safetensors", "strength": 1.0},
}

// CheckServed runs the whole product path on the device, as a UI drives
// it: two real hosts (each with its own data directory, the sample model
// and LoRAs, and the lora-nf4 plugin process), one on the CPU arena and one
// on the device arena. Through the HTTP API it checks that the model loads
// with the same bytes (GET /v1/models/{name}/digest), that a fused apply of
// two LoRAs leaves byte-identical weights on both, that removing them
// brings back the original bytes on the device, and that a side apply
// serves; it reports the device's apply times.
func CheckServed(ctx context.Context, r *Report, o ServedOptions) error {
	if o.StartTimeout == 0 {
		o.StartTimeout = 2 * time.Minute
	}
	cpu, err := startHost(ctx, "cpu", o.CPU, nil, o.Env, o.StartTimeout)
	if err != nil {
		return err
	}
	defer cpu.stop()
	dev, err := startHost(ctx, "device", o.Device, o.DeviceArgs, o.Env, o.StartTimeout)
	if err != nil {
		return err
	}
	defer dev.stop()
	var arena struct {
		Backend string `json:"backend"`
	}
	if err := dev.call(ctx, "GET", "/v1/arena", nil, &arena); err != nil {
		return err
	}
	r.Note("served check: %s on the CPU arena against %s %s (arena backend %q)", o.CPU, o.Device, strings.Join(o.DeviceArgs, " "), arena.Backend)

	d0, err := bothDigests(ctx, cpu, dev)
	if err != nil {
		return err
	}
	r.Check("served", "load: model digest, device vs cpu", short(d0[1]), "equal", d0[0] == d0[1])

	var rep applyReply
	for _, h := range []*host{cpu, dev} {
		if err := h.call(ctx, "POST", "/v1/loras/apply", map[string]any{"loras": sampleLoRAs, "mode": "fuse"}, &rep); err != nil {
			return err
		}
	}
	r.Add("served", "fuse 2 sample LoRAs on the device", fmt.Sprintf("%d weights in %.1f ms", len(rep.Fused), float64(rep.Report.ElapsedNS)/1e6), "", Info)
	d1, err := bothDigests(ctx, cpu, dev)
	if err != nil {
		return err
	}
	r.Check("served", "fuse: model digest, device vs cpu (bit for bit)", short(d1[1]), "equal", d1[0] == d1[1] && d1[0] != d0[0])

	for _, h := range []*host{cpu, dev} {
		if err := h.call(ctx, "DELETE", "/v1/loras", nil, nil); err != nil {
			return err
		}
	}
	d2, err := bothDigests(ctx, cpu, dev)
	if err != nil {
		return err
	}
	r.Check("served", "remove: device digest back to the loaded one", short(d2[1]), short(d0[1]), d2[1] == d0[1] && d2[0] == d0[0])

	if err := dev.call(ctx, "POST", "/v1/loras/apply", map[string]any{"loras": sampleLoRAs, "mode": "side"}, &rep); err != nil {
		return err
	}
	r.Add("served", "side apply of 2 sample LoRAs on the device", fmt.Sprintf("%.1f ms, %d B of factors", float64(rep.Report.ElapsedNS)/1e6, rep.Report.SideBytes), "", Info)
	if err := dev.call(ctx, "DELETE", "/v1/loras", nil, nil); err != nil {
		return err
	}
	d3, err := dev.digest(ctx)
	if err != nil {
		return err
	}
	r.Check("served", "side apply and remove leave the device weights as loaded", short(d3), short(d0[1]), d3 == d0[1])
	if err := checkServedNonFinite(ctx, r, cpu, dev, d0[1]); err != nil {
		return err
	}
	return checkServedNested(ctx, r, cpu, dev)
}

// hugeLoRA is a kohya sample LoRA whose factor values are all bf16 3e38:
// finite on disk, infinite once multiplied.
const hugeLoRA = "flux-sample-huge-lora.safetensors"

// checkServedNonFinite: a fused apply whose merged weights would be
// infinite is refused on the device as on the CPU (422 bad_lora naming a
// layer, "not finite"), and both models keep their loaded bytes (want).
func checkServedNonFinite(ctx context.Context, r *Report, cpu, dev *host, want string) error {
	var answers [2]string
	for i, h := range []*host{cpu, dev} {
		if err := samples.WriteKohyaLoRA(filepath.Join(h.data, "loras", hugeLoRA), samples.LoRAOptions{Fill: 3e38}); err != nil {
			return err
		}
		err := h.call(ctx, "POST", "/v1/loras/apply", map[string]any{"loras": []map[string]any{{"name": hugeLoRA}}, "mode": "fuse"}, nil)
		if err == nil {
			return fmt.Errorf("%s host: a fuse of %s was accepted", h.name, hugeLoRA)
		}
		answers[i] = err.Error()
	}
	refused := func(a string) bool {
		return strings.Contains(a, "422") && strings.Contains(a, "bad_lora") && strings.Contains(a, "not finite") &&
			strings.Contains(a, "fuse: layer ") && strings.Contains(a, "merged weight")
	}
	msg := answers[1]
	if i := strings.Index(msg, "fuse: layer "); i >= 0 {
		msg = msg[i:]
		if j := strings.Index(msg, ": result"); j >= 0 {
			msg = msg[:j]
		}
	}
	r.Check("served", "non-finite fuse refused on the device (422 naming the layer)", msg, "422 bad_lora, as the cpu", refused(answers[0]) && refused(answers[1]))
	d, err := bothDigests(ctx, cpu, dev)
	if err != nil {
		return err
	}
	r.Check("served", "non-finite fuse: both models keep their loaded bytes", short(d[1]), short(want), d[0] == want && d[1] == want)
	return nil
}

// checkServedNested repeats the fuse and remove on a double-quantized copy
// of the sample (nested absmax, as Forge's v1 NF4 checkpoints and diffusers'
// bnb_4bit_use_double_quant store it), which both hosts write into their
// models directory and load over HTTP: the device re-encodes the nested
// absmax with nested_dequantize and nested_quantize around the fused
// kernel.
func checkServedNested(ctx context.Context, r *Report, cpu, dev *host) error {
	const model, file = "nested", "flux-sample-nf4-nested.safetensors"
	for _, h := range []*host{cpu, dev} {
		if err := samples.WriteModel(filepath.Join(h.data, "models", file), samples.ModelOptions{Seed: 1, Nested: true}); err != nil {
			return err
		}
		if err := h.call(ctx, "POST", "/v1/models", map[string]any{"path": file, "name": model}, nil); err != nil {
			return err
		}
	}
	d0, err := bothDigestsOf(ctx, cpu, dev, model)
	if err != nil {
		return err
	}
	var rep applyReply
	for _, h := range []*host{cpu, dev} {
		if err := h.call(ctx, "POST", "/v1/loras/apply", map[string]any{"model": model, "loras": sampleLoRAs, "mode": "fuse"}, &rep); err != nil {
			return err
		}
	}
	d1, err := bothDigestsOf(ctx, cpu, dev, model)
	if err != nil {
		return err
	}
	r.Check("served", "nested absmax: fuse, model digest, device vs cpu (bit for bit)", short(d1[1]), "equal", d0[0] == d0[1] && d1[0] == d1[1] && d1[0] != d0[0])
	for _, h := range []*host{cpu, dev} {
		if err := h.call(ctx, "DELETE", "/v1/loras?model="+model, nil, nil); err != nil {
			return err
		}
	}
	d2, err := bothDigestsOf(ctx, cpu, dev, model)
	if err != nil {
		return err
	}
	r.Check("served", "nested absmax: remove, device digest back to the loaded one", short(d2[1]), short(d0[1]), d2[1] == d0[1] && d2[0] == d0[0])
	return nil
}

type applyReply struct {
	Fused            []string `json:"fused"`
	JournalBytes     uint64   `json:"journal_bytes"`
	JournalFileBytes uint64   `json:"journal_file_bytes"`
	ElapsedNS        int64    `json:"elapsed_ns"`
	Report           struct {
		ElapsedNS        int64 `json:"elapsed_ns"`
		SideBytes        int64 `json:"side_bytes"`
		PeakScratchBytes int64 `json:"peak_scratch_bytes"`
		Phases           []struct {
			Name      string `json:"name"`
			ElapsedNS int64  `json:"elapsed_ns"`
		} `json:"phases"`
	} `json:"report"`
}

// phases lists where an apply's time went, as its report says.
func (a applyReply) phases() string {
	var b strings.Builder
	for i, p := range a.Report.Phases {
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s %.1f ms", p.Name, float64(p.ElapsedNS)/1e6)
	}
	return b.String()
}

func short(h string) string {
	if len(h) > 12 {
		return h[:12]
	}
	return h
}

func bothDigests(ctx context.Context, cpu, dev *host) ([2]string, error) {
	return bothDigestsOf(ctx, cpu, dev, "sample")
}

// bothDigestsOf is the digest of model on each host.
func bothDigestsOf(ctx context.Context, cpu, dev *host, model string) ([2]string, error) {
	var out [2]string
	for i, h := range []*host{cpu, dev} {
		d, err := h.digestOf(ctx, model, "")
		if err != nil {
			return out, err
		}
		out[i] = d
	}
	return out, nil
}

// host is one arenahost serve process.
type host struct {
	name string
	url  string
	cmd  *exec.Cmd
	data string
	logs *syncBuffer
	done chan struct{}
	err  error // the process's exit, once done is closed
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// tail is the end of the host's log, for errors.
func (h *host) tail() string {
	s := strings.TrimSpace(h.logs.String())
	if len(s) > 2000 {
		s = "…" + s[len(s)-2000:]
	}
	return s
}

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// startHost starts `bin serve` on a free loopback port with a fresh data
// directory and waits until the lora-nf4 plugin serves.
func startHost(ctx context.Context, name, bin string, args, env []string, timeout time.Duration) (*host, error) {
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("start %s host: %w", name, err)
	}
	data, err := os.MkdirTemp("", "arenahost-served-"+name+"-")
	if err != nil {
		return nil, fmt.Errorf("start %s host: %w", name, err)
	}
	addr, err := freePort()
	if err != nil {
		os.RemoveAll(data)
		return nil, fmt.Errorf("start %s host: %w", name, err)
	}
	h := &host{name: name, url: "http://" + addr, data: data, logs: &syncBuffer{}, done: make(chan struct{})}
	h.cmd = exec.Command(bin, append([]string{"serve", "--listen", addr, "--data", data, "--log-level", "warn"}, args...)...)
	h.cmd.Env = append(os.Environ(), env...)
	h.cmd.Stdout, h.cmd.Stderr = h.logs, h.logs
	h.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := h.cmd.Start(); err != nil {
		os.RemoveAll(data)
		return nil, fmt.Errorf("start %s host %s: %w", name, bin, err)
	}
	go func() { h.err = h.cmd.Wait(); close(h.done) }()
	deadline := time.Now().Add(timeout)
	for {
		var ps []struct {
			Name  string `json:"name"`
			State string `json:"state"`
		}
		err := h.call(ctx, "GET", "/v1/plugins", nil, &ps)
		if err == nil {
			for _, p := range ps {
				if p.Name == "lora-nf4" && p.State == "serving" {
					return h, nil
				}
			}
			err = fmt.Errorf("lora-nf4 not serving: %v", ps)
		}
		select {
		case <-h.done:
			h.stop()
			return nil, fmt.Errorf("%s host exited before serving (%v); its log:\n%s", name, h.err, h.tail())
		case <-ctx.Done():
			h.stop()
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			h.stop()
			return nil, fmt.Errorf("%s host not ready after %s: %v; its log:\n%s", name, timeout, err, h.tail())
		}
	}
}

// stop interrupts the host (it stops its plugins and frees its arena), kills
// its process group if it lingers, and removes its data directory.
func (h *host) stop() {
	select {
	case <-h.done:
	default:
		_ = h.cmd.Process.Signal(os.Interrupt)
		select {
		case <-h.done:
		case <-time.After(15 * time.Second):
			_ = syscall.Kill(-h.cmd.Process.Pid, syscall.SIGKILL)
			<-h.done
		}
	}
	os.RemoveAll(h.data)
}

// callTimeout bounds one HTTP call to a host. A fused apply on fakecuda,
// where the kernels run in the CPU emulator, takes minutes; on a GPU a
// call that hangs this long has failed anyway.
const callTimeout = 10 * time.Minute

// call sends a JSON request and decodes a 2xx answer into out.
func (h *host) call(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, h.url+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("%s host: %s %s: %w", h.name, method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s host: %s %s: read answer: %w", h.name, method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s host: %s %s: %s: %s", h.name, method, path, resp.Status, bytes.TrimSpace(raw))
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("%s host: %s %s: decode %q: %w", h.name, method, path, raw, err)
	}
	return nil
}

func (h *host) digest(ctx context.Context) (string, error) { return h.digestOf(ctx, "sample", "") }

// digestOf is the digest of model's tensors whose names start with prefix.
func (h *host) digestOf(ctx context.Context, model, prefix string) (string, error) {
	var d struct {
		SHA256  string `json:"sha256"`
		Tensors int    `json:"tensors"`
	}
	if err := h.call(ctx, "GET", "/v1/models/"+url.PathEscape(model)+"/digest?prefix="+url.QueryEscape(prefix), nil, &d); err != nil {
		return "", err
	}
	if d.SHA256 == "" || d.Tensors == 0 {
		return "", errors.New(h.name + " host: empty model digest")
	}
	return d.SHA256, nil
}
