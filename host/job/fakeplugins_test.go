package job_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/arenahost/arenahost/host/job"
	"github.com/arenahost/arenahost/host/plugin"
	"github.com/arenahost/arenahost/sdk/api"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// fakePlugins is job.Plugins without processes: one plugin "tool" whose
// methods are the test's functions, and a record of the calls. It tests
// the job manager's own logic (the queue, results, failures, cancellation)
// with no plugin binary built or started.
type fakePlugins struct {
	mu      sync.Mutex
	methods map[string]func(ctx context.Context, args map[string]any) (any, error)
	calls   []string
}

func (f *fakePlugins) Call(ctx context.Context, name, method string, args []byte, _ []*pluginv1.TensorDescriptor) (*plugin.Reply, error) {
	f.mu.Lock()
	f.calls = append(f.calls, name+"."+method)
	fn := f.methods[method]
	f.mu.Unlock()
	if name != "tool" || fn == nil {
		return nil, fmt.Errorf("plugin %q method %q: %w", name, method, plugin.ErrUnknownPlugin)
	}
	var in map[string]any
	if err := msgpack.Unmarshal(args, &in); err != nil {
		return nil, err
	}
	res, err := fn(ctx, in)
	if err != nil {
		return nil, err
	}
	b, err := msgpack.Marshal(res)
	return &plugin.Reply{Result: b, Generation: 1}, err
}

func (f *fakePlugins) Stream(ctx context.Context, name, method string, args []byte, ts []*pluginv1.TensorDescriptor, fn func(*plugin.Reply) error) error {
	r, err := f.Call(ctx, name, method, args, ts)
	if err != nil {
		return err
	}
	return fn(r)
}

func (f *fakePlugins) PluginStatus(name string) (api.PluginStatus, error) {
	if name != "tool" {
		return api.PluginStatus{}, fmt.Errorf("plugin %q: %w", name, plugin.ErrUnknownPlugin)
	}
	// A pipeline whose every method is public: /v1/jobs runs only those
	// (issue 15); job.Create's refusals of the others are tested elsewhere.
	st := api.PluginStatus{Name: "tool", Kind: "pipeline", State: api.PluginServing, Generation: 1}
	f.mu.Lock()
	for m := range f.methods {
		st.Methods = append(st.Methods, api.PluginMethod{Name: m, Public: true})
	}
	f.mu.Unlock()
	return st, nil
}

func (f *fakePlugins) Status() []api.PluginStatus {
	st, _ := f.PluginStatus("tool")
	return []api.PluginStatus{st}
}

func newFakeJobs(t *testing.T, methods map[string]func(context.Context, map[string]any) (any, error)) (*job.Manager, *fakePlugins) {
	t.Helper()
	f := &fakePlugins{methods: methods}
	m := job.New(job.Config{})
	m.Attach(f)
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	return m, f
}

var noPreview = api.PreviewSpec{Method: job.MethodNone}

// Jobs run one at a time, in the order they were created: a second job
// waits queued while the first runs, then runs; each gets its own job_id
// and keeps its own result.
func TestFakeJobsRunOneAtATime(t *testing.T) {
	release := make(chan struct{})
	started := make(chan string, 2)
	m, _ := newFakeJobs(t, map[string]func(context.Context, map[string]any) (any, error){
		"slow": func(ctx context.Context, args map[string]any) (any, error) {
			started <- fmt.Sprint(args["job_id"])
			select {
			case <-release:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			return map[string]any{"job": args["job_id"], "n": args["n"]}, nil
		},
	})
	a, err := m.Create(t.Context(), api.JobSpec{Pipeline: "tool", Method: "slow", Params: map[string]any{"n": 1}, Preview: noPreview})
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.Create(t.Context(), api.JobSpec{Pipeline: "tool", Method: "slow", Params: map[string]any{"n": 2}, Preview: noPreview})
	if err != nil {
		t.Fatal(err)
	}
	// First come, first served: the job created first runs first.
	first, second := a, b
	if id := <-started; id != a.ID() {
		t.Fatalf("first call got job_id %q, want %q (the older job)", id, a.ID())
	}
	select {
	case id := <-started:
		t.Fatalf("job %s started while %s was running", id, first.ID())
	case <-time.After(200 * time.Millisecond):
	}
	if s := second.Snapshot(); s.State != api.JobQueued || !s.Started.IsZero() {
		t.Fatalf("second job while the first runs: %+v", s)
	}
	close(release)
	for _, j := range []*job.Job{a, b} {
		s := wait(t, j, 10*time.Second)
		res, _ := s.Result.(map[string]any)
		if s.State != api.JobDone || fmt.Sprint(res["job"]) != j.ID() {
			t.Fatalf("job %s: %+v", j.ID(), s)
		}
	}
	if first.Snapshot().Ended.After(second.Snapshot().Started) {
		t.Fatalf("the jobs overlapped: the first ended %v, the second started %v", first.Snapshot().Ended, second.Snapshot().Started)
	}
}

// A call that fails fails the job with the plugin's error; a cancelled
// running job ends cancelled, not failed.
func TestFakeJobFailureAndCancel(t *testing.T) {
	running := make(chan struct{})
	m, _ := newFakeJobs(t, map[string]func(context.Context, map[string]any) (any, error){
		"boom": func(context.Context, map[string]any) (any, error) { return nil, errors.New("tool: out of widgets") },
		"wait": func(ctx context.Context, _ map[string]any) (any, error) {
			close(running)
			<-ctx.Done()
			return nil, ctx.Err()
		},
	})
	j, err := m.Create(t.Context(), api.JobSpec{Pipeline: "tool", Method: "boom", Preview: noPreview})
	if err != nil {
		t.Fatal(err)
	}
	if s := wait(t, j, 10*time.Second); s.State != api.JobFailed || !strings.Contains(s.Error, "out of widgets") || s.Result != nil {
		t.Fatalf("failed job: %+v", s)
	}
	j, err = m.Create(t.Context(), api.JobSpec{Pipeline: "tool", Method: "wait", Preview: noPreview})
	if err != nil {
		t.Fatal(err)
	}
	<-running
	if _, err := m.Cancel(j.ID()); err != nil {
		t.Fatal(err)
	}
	if s := wait(t, j, 10*time.Second); s.State != api.JobCancelled {
		t.Fatalf("cancelled job: %+v", s)
	}
}

// A spec naming a method the plugin does not serve, or no plugin, is
// refused at Create (ErrInvalid or the plugin error), and nothing is called.
func TestFakeJobCreateRefuses(t *testing.T) {
	m, f := newFakeJobs(t, map[string]func(context.Context, map[string]any) (any, error){
		"ok": func(context.Context, map[string]any) (any, error) { return nil, nil },
	})
	for _, tc := range []struct {
		spec api.JobSpec
		is   error
		want string
	}{
		{api.JobSpec{Pipeline: "tool", Method: "nope", Preview: noPreview}, job.ErrInvalid, `serves no method "nope"`},
		{api.JobSpec{Pipeline: "", Preview: noPreview}, job.ErrInvalid, "pipeline: required"},
		{api.JobSpec{Pipeline: "other", Method: "ok", Preview: noPreview}, plugin.ErrUnknownPlugin, `"other"`},
		{api.JobSpec{Pipeline: "tool", Method: "ok", Preview: api.PreviewSpec{Method: job.MethodNone, Format: "gif"}}, nil, ""},
		{api.JobSpec{Pipeline: "tool", Method: "ok", Origin: "Bad Origin", Preview: noPreview}, job.ErrInvalid, "origin"},
	} {
		j, err := m.Create(t.Context(), tc.spec)
		if tc.is == nil {
			// Previews off: their settings are not checked.
			if err != nil {
				t.Errorf("%+v: %v", tc.spec, err)
			} else {
				wait(t, j, 10*time.Second)
			}
			continue
		}
		if !errors.Is(err, tc.is) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %v naming %q", tc.spec, err, tc.is, tc.want)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if strings.Join(f.calls, ",") != "tool.ok" {
		t.Fatalf("calls %v: only the valid job may call the plugin", f.calls)
	}
}

// A queue of jobs starts in creation order, and a job cancelled while it
// waits gives its place to the next.
func TestFakeJobsStartInCreationOrder(t *testing.T) {
	release := make(chan struct{})
	var mu sync.Mutex
	var order []string
	m, _ := newFakeJobs(t, map[string]func(context.Context, map[string]any) (any, error){
		"step": func(ctx context.Context, args map[string]any) (any, error) {
			mu.Lock()
			order = append(order, fmt.Sprint(args["n"]))
			mu.Unlock()
			select {
			case <-release:
			case <-ctx.Done():
			}
			return nil, nil
		},
	})
	var jobs []*job.Job
	for i := range 6 {
		j, err := m.Create(t.Context(), api.JobSpec{Pipeline: "tool", Method: "step", Params: map[string]any{"n": i}, Preview: noPreview})
		if err != nil {
			t.Fatal(err)
		}
		jobs = append(jobs, j)
	}
	if _, err := m.Cancel(jobs[2].ID()); err != nil {
		t.Fatal(err)
	}
	close(release)
	for _, j := range jobs {
		wait(t, j, 10*time.Second)
	}
	if s := jobs[2].Snapshot(); s.State != api.JobCancelled || !s.Started.IsZero() {
		t.Fatalf("job cancelled while queued: %+v", s)
	}
	mu.Lock()
	defer mu.Unlock()
	if got := strings.Join(order, ","); got != "0,1,3,4,5" {
		t.Fatalf("jobs ran in order %s, want 0,1,3,4,5", got)
	}
}
