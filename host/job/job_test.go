package job_test

import (
	"bytes"
	"errors"
	"image/jpeg"
	"image/png"
	"syscall"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/job"
	"github.com/arenahost/arenahost/host/plugin"
	"github.com/arenahost/arenahost/sdk/api"
)

func TestCreateChecksSpec(t *testing.T) {
	s := startHost(t)
	cases := []struct {
		name string
		spec api.JobSpec
		want error
	}{
		{"no pipeline", api.JobSpec{}, job.ErrInvalid},
		{"unknown pipeline", api.JobSpec{Pipeline: "nope"}, plugin.ErrUnknownPlugin},
		{"unknown pipeline method", api.JobSpec{Pipeline: "test-pipeline", Method: "walk"}, job.ErrInvalid},
		{"preview plugin as a pipeline", api.JobSpec{Pipeline: "preview", Method: "render.factor"}, job.ErrForbidden},
		{"preview plugin's run", api.JobSpec{Pipeline: "preview"}, job.ErrForbidden},
		{"taesd without decoder", api.JobSpec{Pipeline: "test-pipeline", Preview: api.PreviewSpec{Method: "taesd"}}, job.ErrInvalid},
		{"unknown preview method", api.JobSpec{Pipeline: "test-pipeline", Preview: api.PreviewSpec{Method: "vae"}}, job.ErrInvalid},
		{"unknown preview plugin", api.JobSpec{Pipeline: "test-pipeline", Preview: api.PreviewSpec{Plugin: "nope"}}, job.ErrInvalid},
		{"bad format", api.JobSpec{Pipeline: "test-pipeline", Preview: api.PreviewSpec{Format: "webp"}}, job.ErrInvalid},
		{"bad quality", api.JobSpec{Pipeline: "test-pipeline", Preview: api.PreviewSpec{Quality: 101}}, job.ErrInvalid},
		{"negative every_n", api.JobSpec{Pipeline: "test-pipeline", Preview: api.PreviewSpec{EveryN: -1}}, job.ErrInvalid},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			j, err := s.Jobs.Create(t.Context(), tc.spec)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if j != nil {
				t.Fatal("a job was returned with the error")
			}
		})
	}
	if n := len(s.Jobs.List()); n != 0 {
		t.Errorf("%d jobs tracked after refused creations", n)
	}
}

func TestJobRendersFrames(t *testing.T) {
	s := startHost(t)
	for _, tc := range []struct {
		name            string
		preview         api.PreviewSpec
		params          map[string]any
		wantW, wantH    int
		wantMinRendered uint64
	}{
		{"jpeg every step", api.PreviewSpec{}, map[string]any{"steps": 12, "step_ms": 15}, 128, 128, 2},
		{"png capped every 4", api.PreviewSpec{Format: "png", MaxSide: 64, EveryN: 4}, map[string]any{"steps": 12, "step_ms": 15}, 64, 64, 1},
		{"packed tokens", api.PreviewSpec{}, map[string]any{"steps": 6, "step_ms": 15, "channels": 64, "height": 8, "width": 8, "layout": "tokens"}, 128, 128, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			j, err := s.Jobs.Create(t.Context(), api.JobSpec{Pipeline: "test-pipeline", Params: tc.params, Preview: tc.preview})
			if err != nil {
				t.Fatal(err)
			}
			sub := s.Jobs.Subscribe(j.ID(), 0)
			defer sub.Close()
			fs := frames(sub, j, nil)
			snap := wait(t, j, 10*time.Second)
			steps := uint64(tc.params["steps"].(int))
			if snap.State != api.JobDone || snap.Step != int(steps) || snap.Progress != 1 {
				t.Fatalf("snapshot %+v: want done at step %d", snap, steps)
			}
			c := snap.Preview.PreviewCounters
			if c.Published != steps || c.Rendered+c.Dropped != c.Published || c.Rendered < tc.wantMinRendered {
				t.Fatalf("counters %+v: want %d published = rendered (≥%d) + dropped", c, steps, tc.wantMinRendered)
			}
			if uint64(len(fs)) != c.Rendered {
				t.Errorf("%d frame events, %d rendered", len(fs), c.Rendered)
			}
			last := j.Frame()
			if last == nil || last.Step != int(steps) || snap.Preview.Frame != last.ID {
				t.Fatalf("last frame %+v: want the final step %d", last, steps)
			}
			var w, h int
			if last.Format == "png" {
				img, err := png.Decode(bytes.NewReader(last.Data))
				if err != nil {
					t.Fatal(err)
				}
				w, h = img.Bounds().Dx(), img.Bounds().Dy()
			} else {
				img, err := jpeg.Decode(bytes.NewReader(last.Data))
				if err != nil {
					t.Fatal(err)
				}
				w, h = img.Bounds().Dx(), img.Bounds().Dy()
			}
			if w != tc.wantW || h != tc.wantH || last.Width != w || last.Height != h {
				t.Errorf("frame %dx%d (says %dx%d), want %dx%d", w, h, last.Width, last.Height, tc.wantW, tc.wantH)
			}
			if tc.preview.EveryN > 1 {
				for _, f := range fs {
					if f.Step%tc.preview.EveryN != 0 && f.Step != int(steps) {
						t.Errorf("frame of step %d with every_n %d", f.Step, tc.preview.EveryN)
					}
				}
			}
		})
	}
	if st := s.Arena.Stats(); st.Regions != 0 {
		t.Errorf("%d arena regions left after the jobs ended (host copies or pipeline buffers leaked)", st.Regions)
	}
}

func TestPreviewsOffAndCancel(t *testing.T) {
	s := startHost(t)
	j, err := s.Jobs.Create(t.Context(), api.JobSpec{Pipeline: "test-pipeline", Params: map[string]any{"steps": 5, "step_ms": 1}, Preview: api.PreviewSpec{Method: "none"}})
	if err != nil {
		t.Fatal(err)
	}
	snap := wait(t, j, 10*time.Second)
	if c := snap.Preview.PreviewCounters; snap.State != api.JobDone || c.Published != 5 || c.Dropped != 5 || c.Rendered != 0 || j.Frame() != nil {
		t.Fatalf("previews off: %+v", snap)
	}
	j, err = s.Jobs.Create(t.Context(), api.JobSpec{Pipeline: "test-pipeline", Params: map[string]any{"steps": 1000, "step_ms": 10}})
	if err != nil {
		t.Fatal(err)
	}
	for j.Snapshot().Step < 3 {
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := s.Jobs.Cancel(j.ID()); err != nil {
		t.Fatal(err)
	}
	snap = wait(t, j, 10*time.Second)
	if c := snap.Preview.PreviewCounters; snap.State != api.JobCancelled || snap.Step >= 1000 || c.Published != c.Rendered+c.Dropped {
		t.Fatalf("cancelled job: %+v", snap)
	}
	if _, err := s.Jobs.Cancel("job-nope"); !errors.Is(err, job.ErrNotFound) {
		t.Errorf("cancel unknown: %v", err)
	}
}

// TestPreviewCrashMidJob kills the preview plugin while a job renders: the
// job completes, previews resume from the restarted generation, and every
// published step is rendered or counted dropped.
func TestPreviewCrashMidJob(t *testing.T) {
	s := startHost(t)
	const steps = 80
	j, err := s.Jobs.Create(t.Context(), api.JobSpec{Pipeline: "test-pipeline", Params: map[string]any{"steps": steps, "step_ms": 20}})
	if err != nil {
		t.Fatal(err)
	}
	sub := s.Jobs.Subscribe(j.ID(), 0)
	defer sub.Close()
	var killedGen uint64
	fs := frames(sub, j, func(f *job.Frame) {
		if killedGen != 0 {
			return
		}
		st, err := s.Plugins.PluginStatus("preview")
		if err != nil {
			t.Error(err)
			return
		}
		killedGen = st.Generation
		if err := syscall.Kill(st.PID, syscall.SIGKILL); err != nil {
			t.Error(err)
		}
	})
	snap := wait(t, j, 20*time.Second)
	if snap.State != api.JobDone || snap.Step != steps {
		t.Fatalf("job after preview crash: %+v", snap)
	}
	c := snap.Preview.PreviewCounters
	if c.Published != steps || c.Rendered+c.Dropped != steps {
		t.Fatalf("counters %+v: every one of %d steps must be rendered or dropped", c, steps)
	}
	if killedGen == 0 {
		t.Fatal("no frame before the kill")
	}
	last := fs[len(fs)-1]
	if last.Generation <= killedGen || last.Step != steps {
		t.Fatalf("last frame step %d from generation %d; want step %d from a generation after the killed %d", last.Step, last.Generation, steps, killedGen)
	}
	t.Logf("frames %d, counters %+v, killed generation %d, last frame generation %d", len(fs), c, killedGen, last.Generation)
}

// TestPreviewSwapMidJob swaps the preview plugin while a job renders:
// frames rendered after the swap come from the new generation.
func TestPreviewSwapMidJob(t *testing.T) {
	s := startHost(t)
	const steps = 80
	j, err := s.Jobs.Create(t.Context(), api.JobSpec{Pipeline: "test-pipeline", Params: map[string]any{"steps": steps, "step_ms": 20}})
	if err != nil {
		t.Fatal(err)
	}
	sub := s.Jobs.Subscribe(j.ID(), 0)
	defer sub.Close()
	var oldGen, newGen uint64
	var swapped time.Time
	swapErr := make(chan error, 1)
	fs := frames(sub, j, func(f *job.Frame) {
		if oldGen != 0 {
			return
		}
		oldGen = f.Generation
		go func() {
			err := s.Plugins.Swap(t.Context(), "preview")
			st, _ := s.Plugins.PluginStatus("preview")
			newGen, swapped = st.Generation, time.Now()
			swapErr <- err
		}()
	})
	snap := wait(t, j, 20*time.Second)
	if err := <-swapErr; err != nil {
		t.Fatal(err)
	}
	if snap.State != api.JobDone || newGen <= oldGen {
		t.Fatalf("job %+v, generations %d → %d", snap, oldGen, newGen)
	}
	after := 0
	for _, f := range fs {
		if f.Published.After(swapped) {
			after++
			if f.Generation != newGen {
				t.Errorf("frame %d (step %d) published after the swap came from generation %d, want %d", f.ID, f.Step, f.Generation, newGen)
			}
		}
	}
	if after == 0 {
		t.Fatal("no frame published after the swap")
	}
	if c := snap.Preview.PreviewCounters; c.Rendered+c.Dropped != c.Published {
		t.Errorf("counters %+v", c)
	}
}
