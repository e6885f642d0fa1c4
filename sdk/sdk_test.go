package sdk

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/arenahost/arenahost/sdk/plugintest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
	"github.com/arenahost/arenahost/shared/wire"
)

type addArgs struct {
	A     int64   `msgpack:"a"`
	B     int64   `msgpack:"b"`
	Scale float64 `msgpack:"scale"`
}

func testPlugin(t *testing.T) *Plugin {
	t.Helper()
	p := New("unit", "1.2.3", "other")
	p.Logger = slog.New(slog.DiscardHandler)
	t.Cleanup(func() { p.mapper.Close() })
	Method(p, "add", func(_ context.Context, _ *Call, a addArgs) (map[string]float64, error) {
		return map[string]float64{"sum": float64(a.A+a.B) * a.Scale}, nil
	}, Doc("add two numbers"))
	Method(p, "boom", func(context.Context, *Call, struct{}) (struct{}, error) {
		var m map[string]int
		m["x"] = 1 // nil map write: a handler bug
		return struct{}{}, nil
	})
	Method(p, "missing", func(context.Context, *Call, struct{}) (struct{}, error) {
		return struct{}{}, fmt.Errorf("lora %q: %w", "a.safetensors", ErrNotFound)
	})
	StreamMethod(p, "count", func(_ context.Context, _ *Call, a struct{ N int }, send func(int) error) error {
		for i := range a.N {
			if err := send(i); err != nil {
				return err
			}
		}
		return nil
	})
	return p
}

func invoke(t *testing.T, p *Plugin, method string, args any) (*pluginv1.InvokeResponse, error) {
	t.Helper()
	var raw []byte
	switch a := args.(type) {
	case nil:
	case []byte:
		raw = a
	default:
		var err error
		if raw, err = msgpack.Marshal(a); err != nil {
			t.Fatal(err)
		}
	}
	return p.Server().Invoke(context.Background(), &pluginv1.InvokeRequest{Method: method, Args: raw})
}

func TestDescribe(t *testing.T) {
	p := testPlugin(t)
	d, err := p.Server().Describe(context.Background(), &pluginv1.DescribeRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if d.Name != "unit" || d.Version != "1.2.3" || d.Kind != "other" || d.ProtocolVersion != uint32(wire.ProtocolVersion) {
		t.Errorf("describe = %v", d)
	}
	var names []string
	for _, m := range d.Methods {
		names = append(names, m.Name)
		if m.Name == "add" && m.Description != "add two numbers" {
			t.Errorf("add description %q", m.Description)
		}
		if m.Name == "count" && !m.Streaming {
			t.Error("count not marked streaming")
		}
	}
	if got := strings.Join(names, ","); !strings.Contains(got, "add,boom,conformance.echo") || !strings.HasSuffix(got, "count,missing") {
		t.Errorf("methods %s, want sorted with conformance.* included", got)
	}
}

func TestInvokeErrors(t *testing.T) {
	p := testPlugin(t)
	tests := []struct {
		name    string
		method  string
		args    any
		code    codes.Code
		mention []string
	}{
		{"unknown method", "nope", nil, codes.Unimplemented, []string{`"nope"`, "add"}},
		{"bad msgpack", "add", []byte{0xc1}, codes.InvalidArgument, []string{`"add"`, "decode args"}},
		{"field of wrong type", "add", map[string]any{"a": 1, "b": "two"}, codes.InvalidArgument, []string{`field "b"`}},
		{"trailing bytes", "add", append(must(msgpack.Marshal(map[string]any{"a": 1})), 0x01), codes.InvalidArgument, []string{"trailing"}},
		{"handler panic", "boom", nil, codes.Internal, []string{"panicked"}},
		{"not found", "missing", nil, codes.NotFound, []string{"a.safetensors"}},
		{"streaming via Invoke", "count", nil, codes.FailedPrecondition, []string{"InvokeStream"}},
		{"no host", ConformanceFill, map[string]any{"name": "x", "count": 4}, codes.FailedPrecondition, []string{wire.EnvHostAddr}},
		{"missing input", ConformanceSum, nil, codes.InvalidArgument, []string{"input tensor #0"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := invoke(t, p, tc.method, tc.args)
			st, _ := status.FromError(err)
			if st.Code() != tc.code {
				t.Fatalf("code %v (%v), want %v", st.Code(), err, tc.code)
			}
			for _, m := range tc.mention {
				if !strings.Contains(st.Message(), m) {
					t.Errorf("message %q does not mention %q", st.Message(), m)
				}
			}
		})
	}
	// The plugin still serves after all of that.
	resp, err := invoke(t, p, "add", map[string]any{"a": 2, "b": 3, "scale": 0.5})
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]float64
	if err := msgpack.Unmarshal(resp.Result, &got); err != nil || got["sum"] != 2.5 {
		t.Fatalf("add = %v, %v; want sum 2.5", got, err)
	}
	// Empty args decode as the zero value.
	if _, err := invoke(t, p, "add", nil); err != nil {
		t.Errorf("add with no args: %v", err)
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

func TestCode(t *testing.T) {
	tests := []struct {
		err  error
		want codes.Code
	}{
		{nil, codes.OK},
		{fmt.Errorf("x: %w", ErrInvalidArgument), codes.InvalidArgument},
		{fmt.Errorf("map: %w", tensor.ErrOutOfBounds), codes.InvalidArgument},
		{fmt.Errorf("map: %w", tensor.ErrCUDALocation), codes.InvalidArgument},
		{fmt.Errorf("x: %w", ErrNotFound), codes.NotFound},
		{fmt.Errorf("x: %w", ErrFailedPrecondition), codes.FailedPrecondition},
		{fmt.Errorf("host: %w", wire.ErrNoHost), codes.FailedPrecondition},
		{fmt.Errorf("allocate: %w", status.Error(codes.ResourceExhausted, "arena full")), codes.ResourceExhausted},
		{context.Canceled, codes.Canceled},
		{fmt.Errorf("x: %w", context.DeadlineExceeded), codes.DeadlineExceeded},
		{errors.New("disk on fire"), codes.Internal},
	}
	for _, tc := range tests {
		if got := Code(tc.err); got != tc.want {
			t.Errorf("Code(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

type sendStream struct {
	pluginv1.Plugin_InvokeStreamServer
	got [][]byte
}

func (s *sendStream) Context() context.Context { return context.Background() }
func (s *sendStream) Send(r *pluginv1.InvokeResponse) error {
	s.got = append(s.got, r.Result)
	return nil
}

func TestInvokeStream(t *testing.T) {
	p := testPlugin(t)
	tests := []struct {
		method string
		args   any
		want   []int
	}{
		{"count", map[string]any{"N": 3}, []int{0, 1, 2}},
		{"count", map[string]any{"N": 0}, nil},
		{"add", map[string]any{"a": 1, "b": 1, "scale": 1}, nil}, // unary: one result
	}
	for _, tc := range tests {
		s := &sendStream{}
		err := p.Server().InvokeStream(&pluginv1.InvokeRequest{Method: tc.method, Args: must(msgpack.Marshal(tc.args))}, s)
		if err != nil {
			t.Fatalf("%s: %v", tc.method, err)
		}
		if tc.method == "add" {
			if len(s.got) != 1 {
				t.Errorf("unary over InvokeStream sent %d results, want 1", len(s.got))
			}
			continue
		}
		var got []int
		for _, b := range s.got {
			var i int
			if err := msgpack.Unmarshal(b, &i); err != nil {
				t.Fatal(err)
			}
			got = append(got, i)
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%s %v streamed %v, want %v", tc.method, tc.args, got, tc.want)
		}
	}
}

// TestWriteToReadOnlyInput: a handler that writes through a read-only
// mapping fails its call with Internal instead of crashing the plugin.
func TestWriteToReadOnlyInput(t *testing.T) {
	p := testPlugin(t)
	Method(p, "scribble", func(_ context.Context, c *Call, _ struct{}) (struct{}, error) {
		b, err := c.Bytes(c.Inputs()[0])
		if err != nil {
			return struct{}{}, err
		}
		b[0] = 1
		return struct{}{}, nil
	})
	fh := plugintest.NewFakeHost(t, 1<<16)
	d := fh.Put(t, "ro", pluginv1.DType_DTYPE_U8, []int64{4}, []byte{9, 9, 9, 9}, pluginv1.Access_ACCESS_READ_ONLY)
	_, err := p.Server().Invoke(context.Background(), &pluginv1.InvokeRequest{Method: "scribble", Tensors: []*pluginv1.TensorDescriptor{d}})
	if st, _ := status.FromError(err); st.Code() != codes.Internal || !strings.Contains(st.Message(), "panicked") {
		t.Fatalf("write to a read-only input: %v, want Internal panicked", err)
	}
	if b, _ := fh.Bytes(d); b[0] != 9 {
		t.Errorf("read-only tensor changed to %v", b)
	}
}

func TestRegisterTwicePanics(t *testing.T) {
	p := New("unit", "1", "other")
	defer func() {
		if r := recover(); r == nil || !strings.Contains(fmt.Sprint(r), ConformanceEcho) {
			t.Errorf("recover() = %v, want a panic naming %s", r, ConformanceEcho)
		}
	}()
	Method(p, ConformanceEcho, func(context.Context, *Call, struct{}) (struct{}, error) { return struct{}{}, nil })
}

func TestLogHandlerWritesHCLogKeys(t *testing.T) {
	var buf bytes.Buffer
	slog.New(NewLogHandler(&buf, slog.LevelDebug)).Warn("disk low", "free", 3)
	var line map[string]any
	if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
		t.Fatalf("log line %q: %v", buf.String(), err)
	}
	if line["@level"] != "warn" || line["@message"] != "disk low" || line["free"] != 3.0 {
		t.Errorf("log line %v, want @level warn, @message, free", line)
	}
	if ts, _ := line["@timestamp"].(string); len(ts) != len("2006-01-02T15:04:05.000000Z") && len(ts) != len("2006-01-02T15:04:05.000000+00:00") {
		t.Errorf("@timestamp %q not in hclog's layout", ts)
	}
}
