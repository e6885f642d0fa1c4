package plugintest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/wire"
)

// The conformance methods (see README.md).
const (
	methodEcho   = "conformance.echo"
	methodSum    = "conformance.sum"
	methodScale  = "conformance.scale"
	methodFill   = "conformance.fill"
	methodStream = "conformance.stream"
	methodFail   = "conformance.fail"
)

// MaxKill is the longest a graceful shutdown may take. go-plugin forces a
// SIGKILL after 2 s, so a plugin that needs that long did not shut down on
// the host's request.
const MaxKill = 2 * time.Second

// Run starts the plugin described by cfg and runs the conformance checks
// as subtests, ending with the shutdown checks.
func Run(t *testing.T, cfg Config) {
	t.Helper()
	cfg.HostServer = nil // the checks read what the plugin did through the FakeHost
	p := Start(t, cfg)
	t.Logf("plugin pid %d: %s", p.PID, describeString(p.Describe))

	t.Run("health", func(t *testing.T) {
		if err := p.Ping(); err != nil {
			t.Fatalf("health check of service %q: %v", "plugin", err)
		}
	})
	t.Run("describe", func(t *testing.T) { checkDescribe(t, cfg, p.Describe) })
	t.Run("unknown method", func(t *testing.T) { checkUnknownMethod(t, p) })
	if !cfg.NoConformanceMethods {
		t.Run("bad msgpack", func(t *testing.T) { checkBadMsgpack(t, p) })
		t.Run("echo", func(t *testing.T) { checkEcho(t, p) })
		t.Run("input tensor read in place", func(t *testing.T) { checkSum(t, p) })
		t.Run("input tensor written in place", func(t *testing.T) { checkScale(t, p) })
		t.Run("describe again", func(t *testing.T) { checkDescribeAgain(t, p) })
		t.Run("host allocate", func(t *testing.T) { checkFill(t, p) })
		t.Run("stream", func(t *testing.T) { checkStream(t, p) })
		t.Run("error codes", func(t *testing.T) { checkErrorCodes(t, p) })
	}
	t.Run("kill", func(t *testing.T) { checkKill(t, p) })
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	b, err := msgpack.Marshal(v)
	if err != nil {
		t.Fatalf("msgpack encode %v: %v", v, err)
	}
	return b
}

func mustUnmarshal(t *testing.T, method string, b []byte, v any) {
	t.Helper()
	if err := msgpack.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: result is not the msgpack %T: %v (% x)", method, v, err, b)
	}
}

// wantStatus checks that err is a gRPC status with one of codes whose
// message contains every word in mention.
func wantStatus(t *testing.T, what string, err error, want []codes.Code, mention ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: succeeded, want one of %v", what, want)
	}
	st, _ := status.FromError(err)
	ok := false
	for _, c := range want {
		ok = ok || st.Code() == c
	}
	if !ok {
		t.Errorf("%s: code %v (%q), want one of %v", what, st.Code(), st.Message(), want)
	}
	for _, m := range mention {
		if !strings.Contains(st.Message(), m) {
			t.Errorf("%s: message %q does not mention %q", what, st.Message(), m)
		}
	}
}

func checkDescribe(t *testing.T, cfg Config, d *pluginv1.DescribeResponse) {
	if d.GetName() == "" {
		t.Error("describe: empty name")
	}
	if d.GetVersion() == "" {
		t.Error("describe: empty version")
	}
	if d.GetProtocolVersion() != uint32(wire.ProtocolVersion) {
		t.Errorf("describe: protocol_version %d, want %d", d.GetProtocolVersion(), wire.ProtocolVersion)
	}
	if d.GetKind() == "" {
		t.Error("describe: empty kind")
	}
	if len(d.GetMethods()) == 0 {
		t.Error("describe: no methods")
	}
	if cfg.WantName != "" && d.GetName() != cfg.WantName {
		t.Errorf("describe: name %q, want %q", d.GetName(), cfg.WantName)
	}
	if cfg.WantKind != "" && d.GetKind() != cfg.WantKind {
		t.Errorf("describe: kind %q, want %q", d.GetKind(), cfg.WantKind)
	}
	seen := map[string]bool{}
	for _, m := range d.GetMethods() {
		if m.GetName() == "" || seen[m.GetName()] {
			t.Errorf("describe: method name %q empty or listed twice", m.GetName())
		}
		seen[m.GetName()] = true
	}
	if cfg.NoConformanceMethods {
		return
	}
	for m, streaming := range map[string]bool{methodEcho: false, methodSum: false, methodScale: false, methodFill: false, methodStream: true, methodFail: false} {
		if !seen[m] {
			t.Errorf("describe: conformance method %q missing (set Config.NoConformanceMethods for plugins without them)", m)
			continue
		}
		for _, mi := range d.GetMethods() {
			if mi.GetName() == m && mi.GetStreaming() != streaming {
				t.Errorf("describe: method %q streaming=%v, want %v", m, mi.GetStreaming(), streaming)
			}
		}
	}
}

func checkUnknownMethod(t *testing.T, p *Plugin) {
	const name = "plugintest.no-such-method"
	_, err := p.Client.Invoke(ctx(t), &pluginv1.InvokeRequest{Method: name, Args: mustMarshal(t, map[string]any{})})
	wantStatus(t, "invoke "+name, err, []codes.Code{codes.Unimplemented, codes.InvalidArgument}, name)
}

func checkBadMsgpack(t *testing.T, p *Plugin) {
	tests := []struct {
		name string
		args []byte
	}{
		{"never-used code 0xc1", []byte{0xc1}},
		{"map cut short", []byte{0x81, 0xa7, 'p', 'a', 'y'}},
	}
	for _, tc := range tests {
		_, err := p.Client.Invoke(ctx(t), &pluginv1.InvokeRequest{Method: methodEcho, Args: tc.args})
		wantStatus(t, methodEcho+" with "+tc.name, err, []codes.Code{codes.InvalidArgument}, methodEcho)
	}
	// A field of the wrong type is named in the message.
	_, err := p.Client.Invoke(ctx(t), &pluginv1.InvokeRequest{Method: methodFill, Args: mustMarshal(t, map[string]any{"name": "x", "count": "many"})})
	wantStatus(t, methodFill+" with count as a string", err, []codes.Code{codes.InvalidArgument}, methodFill, "count")
}

func checkEcho(t *testing.T, p *Plugin) {
	payload := map[string]any{"s": "héllo", "n": int64(-3), "f": 1.5, "b": []byte{0, 1, 255}, "l": []any{int64(1), "two"}, "nil": nil}
	resp, err := p.Client.Invoke(ctx(t), &pluginv1.InvokeRequest{Method: methodEcho, Args: mustMarshal(t, map[string]any{"payload": payload}), CallId: "echo-1"})
	if err != nil {
		t.Fatalf("invoke %s: %v", methodEcho, err)
	}
	// Compare the decoded echo with the request decoded the same way, so
	// the check does not depend on how msgpack maps bin/str to Go types.
	got, err := decodePayload(resp.GetResult())
	if err != nil {
		t.Fatalf("%s: result is not {payload: map}: %v", methodEcho, err)
	}
	want, err := decodePayload(mustMarshal(t, map[string]any{"payload": payload}))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s: payload %#v, want %#v", methodEcho, got, want)
	}
}

func decodePayload(b []byte) (map[string]any, error) {
	var v struct {
		Payload map[string]any `msgpack:"payload"`
	}
	dec := msgpack.NewDecoder(bytes.NewReader(b))
	dec.UseLooseInterfaceDecoding(true)
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	if v.Payload == nil {
		return nil, errors.New("no payload map")
	}
	return v.Payload, nil
}

func f32bytes(xs []float32) []byte {
	b := make([]byte, 4*len(xs))
	for i, x := range xs {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

func readF32(b []byte) []float32 {
	xs := make([]float32, len(b)/4)
	for i := range xs {
		xs[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return xs
}

// conformanceN is the element count of the suite's tensors: 64 KiB, more
// than a page, so the plugin really maps the segment.
const conformanceN = 16384

func checkSum(t *testing.T, p *Plugin) {
	xs := make([]float32, conformanceN)
	var want float64
	for i := range xs {
		// Halves: exact in float32 and float64, so the sum is the same in
		// any order of addition.
		xs[i] = float32(i%1000) * 0.5
		want += float64(xs[i])
	}
	d := p.Host.Put(t, "plugintest.sum.input", pluginv1.DType_DTYPE_F32, []int64{conformanceN}, f32bytes(xs), pluginv1.Access_ACCESS_READ_ONLY)
	resp, err := p.Client.Invoke(ctx(t), &pluginv1.InvokeRequest{Method: methodSum, Tensors: []*pluginv1.TensorDescriptor{d}})
	if err != nil {
		t.Fatalf("invoke %s: %v", methodSum, err)
	}
	var got struct {
		Sum   float64 `msgpack:"sum"`
		Count int64   `msgpack:"count"`
	}
	mustUnmarshal(t, methodSum, resp.GetResult(), &got)
	if got.Sum != want || got.Count != conformanceN {
		t.Errorf("%s: sum %v count %d, want %v and %d", methodSum, got.Sum, got.Count, want, conformanceN)
	}
	// A wrong dtype is refused as an invalid argument naming the tensor.
	bad := p.Host.Put(t, "plugintest.sum.u8", pluginv1.DType_DTYPE_U8, []int64{8}, make([]byte, 8), pluginv1.Access_ACCESS_READ_ONLY)
	_, err = p.Client.Invoke(ctx(t), &pluginv1.InvokeRequest{Method: methodSum, Tensors: []*pluginv1.TensorDescriptor{bad}})
	wantStatus(t, methodSum+" of a U8 tensor", err, []codes.Code{codes.InvalidArgument}, "plugintest.sum.u8")
	// A descriptor past the end of its segment is refused, not mapped.
	oob := proto(d)
	oob.Region.Offset = p.Host.Segment().GetSize() - 64
	_, err = p.Client.Invoke(ctx(t), &pluginv1.InvokeRequest{Method: methodSum, Tensors: []*pluginv1.TensorDescriptor{oob}})
	wantStatus(t, methodSum+" of a descriptor past the segment end", err, []codes.Code{codes.InvalidArgument}, methodSum)
}

// proto returns a deep copy of d, region and segment included.
func proto(d *pluginv1.TensorDescriptor) *pluginv1.TensorDescriptor {
	seg := *d.GetRegion().GetCpu()
	c := &pluginv1.TensorDescriptor{Name: d.GetName(), Dtype: d.GetDtype(), Shape: d.GetShape(), Nbytes: d.GetNbytes(), Access: d.GetAccess()}
	c.Region = &pluginv1.Region{Segment: &pluginv1.Region_Cpu{Cpu: &seg}, Offset: d.GetRegion().GetOffset(), Length: d.GetRegion().GetLength(), Generation: d.GetRegion().GetGeneration()}
	return c
}

func checkScale(t *testing.T, p *Plugin) {
	xs := make([]float32, conformanceN)
	for i := range xs {
		xs[i] = float32(i) - 100
	}
	d := p.Host.Put(t, "plugintest.scale.io", pluginv1.DType_DTYPE_F32, []int64{conformanceN}, f32bytes(xs), pluginv1.Access_ACCESS_READ_WRITE)
	resp, err := p.Client.Invoke(ctx(t), &pluginv1.InvokeRequest{Method: methodScale, Args: mustMarshal(t, map[string]any{"factor": -2.5}), Tensors: []*pluginv1.TensorDescriptor{d}})
	if err != nil {
		t.Fatalf("invoke %s: %v", methodScale, err)
	}
	var got struct {
		Count int64 `msgpack:"count"`
	}
	mustUnmarshal(t, methodScale, resp.GetResult(), &got)
	b, err := p.Host.Bytes(d)
	if err != nil {
		t.Fatal(err)
	}
	after := readF32(b)
	for i, x := range xs {
		if want := x * -2.5; after[i] != want {
			t.Fatalf("%s: host sees element %d = %v after the call, want %v (the plugin's write did not reach the shared segment)", methodScale, i, after[i], want)
		}
	}
	if got.Count != conformanceN {
		t.Errorf("%s: count %d, want %d", methodScale, got.Count, conformanceN)
	}
	// A read-only descriptor must not be written.
	ro := p.Host.Put(t, "plugintest.scale.ro", pluginv1.DType_DTYPE_F32, []int64{4}, f32bytes([]float32{1, 2, 3, 4}), pluginv1.Access_ACCESS_READ_ONLY)
	_, err = p.Client.Invoke(ctx(t), &pluginv1.InvokeRequest{Method: methodScale, Args: mustMarshal(t, map[string]any{"factor": 2.0}), Tensors: []*pluginv1.TensorDescriptor{ro}})
	wantStatus(t, methodScale+" of a read-only tensor", err, []codes.Code{codes.InvalidArgument}, "plugintest.scale.ro")
	if b, _ := p.Host.Bytes(ro); !reflect.DeepEqual(readF32(b), []float32{1, 2, 3, 4}) {
		t.Errorf("%s: read-only tensor changed to %v", methodScale, readF32(b))
	}
}

func checkFill(t *testing.T, p *Plugin) {
	const n, start, step = 5000, 1.0, 0.25
	before := len(p.Host.Allocated())
	resp, err := p.Client.Invoke(ctx(t), &pluginv1.InvokeRequest{Method: methodFill, Args: mustMarshal(t, map[string]any{"name": "plugintest.fill", "count": n, "start": start, "step": step})})
	if err != nil {
		t.Fatalf("invoke %s: %v", methodFill, err)
	}
	allocs := p.Host.Allocated()[before:]
	if len(allocs) != 1 {
		t.Fatalf("%s: the plugin made %d allocations through the host service, want 1", methodFill, len(allocs))
	}
	if len(resp.GetTensors()) != 1 {
		t.Fatalf("%s: returned %d tensors, want 1", methodFill, len(resp.GetTensors()))
	}
	out := resp.GetTensors()[0]
	a := allocs[0]
	if out.GetRegion().GetOffset() != a.GetRegion().GetOffset() || out.GetRegion().GetGeneration() != a.GetRegion().GetGeneration() {
		t.Fatalf("%s: returned region (offset %d, generation %d) is not the one allocated (offset %d, generation %d)", methodFill,
			out.GetRegion().GetOffset(), out.GetRegion().GetGeneration(), a.GetRegion().GetOffset(), a.GetRegion().GetGeneration())
	}
	if a.GetName() != "plugintest.fill" || a.GetDtype() != pluginv1.DType_DTYPE_F32 || !reflect.DeepEqual(a.GetShape(), []int64{n}) {
		t.Errorf("%s: allocation %q %v %v, want plugintest.fill F32 [%d]", methodFill, a.GetName(), a.GetDtype(), a.GetShape(), n)
	}
	b, err := p.Host.Bytes(out)
	if err != nil {
		t.Fatal(err)
	}
	for i, x := range readF32(b) {
		if want := float32(start + float64(i)*step); x != want {
			t.Fatalf("%s: host sees element %d = %v, want %v", methodFill, i, x, want)
		}
	}
	_, err = p.Client.Invoke(ctx(t), &pluginv1.InvokeRequest{Method: methodFill, Args: mustMarshal(t, map[string]any{"name": "x", "count": 0})})
	wantStatus(t, methodFill+" of count 0", err, []codes.Code{codes.InvalidArgument}, "count")
}

func checkStream(t *testing.T, p *Plugin) {
	const n = 7
	st, err := p.Client.InvokeStream(ctx(t), &pluginv1.InvokeRequest{Method: methodStream, Args: mustMarshal(t, map[string]any{"count": n})})
	if err != nil {
		t.Fatalf("invoke %s: %v", methodStream, err)
	}
	var got []int64
	for {
		resp, err := st.Recv()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("%s: receive after %d results: %v", methodStream, len(got), err)
			}
			break
		}
		var item struct {
			Index int64 `msgpack:"index"`
		}
		mustUnmarshal(t, methodStream, resp.GetResult(), &item)
		got = append(got, item.Index)
	}
	if want := []int64{0, 1, 2, 3, 4, 5, 6}; !reflect.DeepEqual(got, want) {
		t.Errorf("%s: indices %v, want %v", methodStream, got, want)
	}
}

func checkErrorCodes(t *testing.T, p *Plugin) {
	tests := []struct {
		code string
		want codes.Code
	}{
		{"invalid_argument", codes.InvalidArgument},
		{"not_found", codes.NotFound},
		{"failed_precondition", codes.FailedPrecondition},
		{"internal", codes.Internal},
	}
	for _, tc := range tests {
		msg := "plugintest says " + tc.code
		_, err := p.Client.Invoke(ctx(t), &pluginv1.InvokeRequest{Method: methodFail, Args: mustMarshal(t, map[string]any{"code": tc.code, "message": msg})})
		wantStatus(t, methodFail+" "+tc.code, err, []codes.Code{tc.want}, msg, methodFail)
	}
}

// checkDescribeAgain: a second Describe with the same broker id answers
// the same and leaves the host connection working (host allocate runs next).
func checkDescribeAgain(t *testing.T, p *Plugin) {
	d, err := p.Client.Describe(ctx(t), &pluginv1.DescribeRequest{HostBrokerId: p.BrokerID})
	if err != nil {
		t.Fatalf("second describe: %v", err)
	}
	if describeString(d) != describeString(p.Describe) {
		t.Errorf("second describe %s differs from the first %s", describeString(d), describeString(p.Describe))
	}
}

func checkKill(t *testing.T, p *Plugin) {
	took, forced := p.Kill()
	t.Logf("graceful kill took %v", took)
	if forced {
		t.Errorf("kill: go-plugin had to SIGKILL the plugin (no GRPCController Shutdown?)")
	}
	if took >= MaxKill {
		t.Errorf("kill took %v, want < %v", took, MaxKill)
	}
	// go-plugin reaps the process before Kill returns; anything left in the
	// process group is a child the plugin leaked.
	deadline := time.Now().Add(time.Second)
	for alive(-p.PID) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if alive(p.PID) {
		t.Errorf("plugin pid %d still alive after kill", p.PID)
	}
	if alive(-p.PID) {
		t.Errorf("process group %d still has members after kill", p.PID)
	}
}
