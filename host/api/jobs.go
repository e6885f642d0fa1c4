package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/arenahost/arenahost/host/job"
	v1 "github.com/arenahost/arenahost/sdk/api"
)

// jobRoutes registers the job routes: creation and cancellation, snapshots,
// and the preview deliveries (latest frame, MJPEG, server-sent events), the
// A1111-compatible progress routes (a1111.go). ComfyUI's websocket is in
// package comfyui.
func (a *API) jobRoutes() {
	a.mux.HandleFunc("POST /v1/jobs", a.createJob)
	a.mux.HandleFunc("GET /v1/jobs", a.listJobs)
	a.mux.HandleFunc("GET /v1/jobs/{id}", a.getJob)
	a.mux.HandleFunc("DELETE /v1/jobs/{id}", a.cancelJob)
	a.mux.HandleFunc("GET /v1/jobs/{id}/preview.jpg", a.previewFrame)
	a.mux.HandleFunc("GET /v1/jobs/{id}/preview.mjpeg", a.previewMJPEG)
	a.mux.HandleFunc("GET /v1/jobs/{id}/events", a.jobEvents)
	a.mux.HandleFunc("GET /sdapi/v1/progress", a.sdapiProgress)
	a.mux.HandleFunc("POST /sdapi/v1/interrupt", a.sdapiInterrupt)
	go a.observeJobs(a.s.Jobs.Subscribe("", 1024))
}

// observeJobs feeds job events to the metrics until the job manager
// closes.
func (a *API) observeJobs(sub *job.Subscription) {
	defer sub.Close()
	for {
		select {
		case <-a.s.Jobs.Done():
			return
		case <-sub.C():
			for _, e := range sub.Next() {
				switch e.Type {
				case v1.EventFrame:
					a.Metrics.ObservePreview(e.Frame.Rendered.Sub(e.Frame.Published))
				case v1.EventState:
					switch e.Job.State {
					case v1.JobQueued:
						a.Metrics.JobSubmitted()
					case v1.JobRunning:
						a.Metrics.JobStarted()
					case v1.JobDone:
						a.Metrics.JobFinished("succeeded")
					case v1.JobFailed:
						a.Metrics.JobFinished("failed")
					case v1.JobCancelled:
						if !e.Job.Started.IsZero() {
							a.Metrics.JobFinished("canceled")
						} else {
							a.Metrics.Jobs.WithLabelValues("canceled").Inc() // never ran: not counted running
						}
					}
				}
			}
		}
	}
}

// clientWriteTimeout bounds one write to a streaming client: a client that
// takes no bytes for this long is disconnected. Until then it only delays
// its own handler; the job and the other clients never wait for it.
const clientWriteTimeout = 30 * time.Second

// jobErr gives job errors their HTTP status.
func jobErr(err error) error {
	switch {
	case errors.Is(err, job.ErrInvalid):
		return &StatusError{Status: http.StatusBadRequest, Code: "bad_request", Err: err}
	case errors.Is(err, job.ErrNotFound):
		return &StatusError{Status: http.StatusNotFound, Code: "not_found", Err: err}
	case errors.Is(err, job.ErrForbidden):
		return &StatusError{Status: http.StatusForbidden, Code: "method_not_public", Err: err}
	case errors.Is(err, job.ErrUnavailable):
		return &StatusError{Status: http.StatusServiceUnavailable, Code: "plugin_unavailable", Err: err}
	}
	return err
}

func jobLinks(id string) map[string]string {
	base := "/v1/jobs/" + id
	return map[string]string{"self": base, "preview": base + "/preview.jpg", "mjpeg": base + "/preview.mjpeg", "events": base + "/events"}
}

func (a *API) createJob(w http.ResponseWriter, r *http.Request) {
	var spec v1.JobSpec
	if err := decode(r, &spec); err != nil {
		a.fail(w, r, err)
		return
	}
	if spec.Pipeline == "" {
		// No pipeline named: the default (GET /v1/pipelines), which the
		// answer's "pipeline" names.
		p, err := a.pipeline()
		if err != nil {
			a.fail(w, r, fmt.Errorf("create job: %w", err))
			return
		}
		spec.Pipeline = p
	}
	if spec.Params != nil {
		if err := a.addModelDir(spec.Params); err != nil {
			a.fail(w, r, fmt.Errorf("create job: %w", err))
			return
		}
	}
	j, err := a.s.Jobs.Create(r.Context(), spec)
	if err != nil {
		a.fail(w, r, jobErr(err))
		return
	}
	w.Header().Set("Location", "/v1/jobs/"+j.ID())
	writeJSON(w, http.StatusCreated, v1.JobCreated{Job: j.Snapshot(), Links: jobLinks(j.ID())})
}

func (a *API) listJobs(w http.ResponseWriter, _ *http.Request) {
	out := []v1.Job{}
	for _, j := range a.s.Jobs.List() {
		out = append(out, j.Snapshot())
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *API) lookupJob(w http.ResponseWriter, r *http.Request) *job.Job {
	j, err := a.s.Jobs.Get(r.PathValue("id"))
	if err != nil {
		a.fail(w, r, jobErr(err))
		return nil
	}
	return j
}

func (a *API) getJob(w http.ResponseWriter, r *http.Request) {
	if j := a.lookupJob(w, r); j != nil {
		writeJSON(w, http.StatusOK, j.Snapshot())
	}
}

func (a *API) cancelJob(w http.ResponseWriter, r *http.Request) {
	j := a.lookupJob(w, r)
	if j == nil {
		return
	}
	j.Cancel()
	select {
	case <-j.Done():
	case <-time.After(5 * time.Second):
	case <-r.Context().Done():
	}
	writeJSON(w, http.StatusOK, j.Snapshot())
}

func frameHeaders(h http.Header, f *job.Frame) {
	h.Set("Content-Type", f.MIME())
	h.Set("Content-Length", strconv.Itoa(len(f.Data)))
	h.Set("X-Frame-Id", strconv.FormatUint(f.ID, 10))
	h.Set("X-Frame-Step", strconv.Itoa(f.Step))
	h.Set("X-Preview-Generation", strconv.FormatUint(f.Generation, 10))
}

// previewFrame serves the newest frame (JPEG, or PNG when the job asked
// for PNG; the Content-Type says which).
func (a *API) previewFrame(w http.ResponseWriter, r *http.Request) {
	j := a.lookupJob(w, r)
	if j == nil {
		return
	}
	f := j.Frame()
	if f == nil {
		a.fail(w, r, &StatusError{Status: http.StatusNotFound, Code: "no_frame",
			Err: fmt.Errorf("job %s has no preview frame yet (state %s, preview method %q)", j.ID(), j.State(), j.Snapshot().Preview.Method)})
		return
	}
	frameHeaders(w.Header(), f)
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(f.Data)
}

const mjpegBoundary = "arenahost-frame"

// previewMJPEG streams frames as multipart/x-mixed-replace, which a plain
// <img src> shows as live video. Only the newest frame matters: a client
// that falls behind skips frames. The stream ends after the job's last
// frame.
func (a *API) previewMJPEG(w http.ResponseWriter, r *http.Request) {
	j := a.lookupJob(w, r)
	if j == nil {
		return
	}
	sub := a.s.Jobs.Subscribe(j.ID(), 4)
	defer sub.Close()
	var sent, skipped uint64
	defer func() { a.Metrics.PreviewFramesDropped(int(skipped)) }()
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "multipart/x-mixed-replace; boundary="+mjpegBoundary)
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	send := func(f *job.Frame) bool {
		if f == nil || f.ID <= sent {
			return true
		}
		if sent > 0 {
			skipped += f.ID - sent - 1
		}
		sent = f.ID
		_ = rc.SetWriteDeadline(time.Now().Add(clientWriteTimeout))
		_, err := fmt.Fprintf(w, "--%s\r\nContent-Type: %s\r\nContent-Length: %d\r\nX-Frame-Id: %d\r\nX-Frame-Step: %d\r\nX-Preview-Generation: %d\r\n\r\n",
			mjpegBoundary, f.MIME(), len(f.Data), f.ID, f.Step, f.Generation)
		if err == nil {
			_, err = w.Write(f.Data)
		}
		if err == nil {
			_, err = w.Write([]byte("\r\n"))
		}
		if err == nil {
			err = rc.Flush()
		}
		return err == nil
	}
	if !send(j.Frame()) {
		return
	}
	for {
		select {
		case <-r.Context().Done():
			return
		case <-sub.C():
			// Only the newest frame matters; the events just say
			// something changed.
			sub.Next()
			if !send(j.Frame()) {
				return
			}
		case <-j.Done():
			send(j.Frame())
			_, _ = fmt.Fprintf(w, "--%s--\r\n", mjpegBoundary)
			return
		}
	}
}

func jobEvent(s v1.Job) v1.JobEvent {
	e := v1.JobEvent{Job: s.ID, ClientID: s.ClientID, State: s.State, Step: s.Step, Total: s.Total, Progress: s.Progress, ETA: s.ETA,
		Frame: s.Preview.Frame, FrameStep: s.Preview.FrameStep, Generation: s.Preview.Generation,
		Published: s.Preview.Published, Rendered: s.Preview.Rendered, Dropped: s.Preview.Dropped, Error: s.Error}
	if e.Frame > 0 {
		e.FrameURL = "/v1/jobs/" + s.ID + "/preview.jpg"
	}
	return e
}

// jobEvents streams server-sent events: "state" on connect and on every
// state change, "progress" per step, "frame" per rendered frame, each with
// the job's figures. A client that falls behind loses the oldest events.
// The stream ends after the final state.
func (a *API) jobEvents(w http.ResponseWriter, r *http.Request) {
	j := a.lookupJob(w, r)
	if j == nil {
		return
	}
	sub := a.s.Jobs.Subscribe(j.ID(), 0)
	defer func() { a.Metrics.PreviewFramesDropped(int(sub.Dropped())); sub.Close() }()
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	var seq uint64
	send := func(typ string, s v1.Job) bool {
		seq++
		data, _ := json.Marshal(jobEvent(s))
		_ = rc.SetWriteDeadline(time.Now().Add(clientWriteTimeout))
		if _, err := fmt.Fprintf(w, "event: %s\nid: %d\ndata: %s\n\n", typ, seq, data); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	if !send(v1.EventState, j.Snapshot()) {
		return
	}
	if j.Snapshot().State.Final() {
		return
	}
	for {
		select {
		case <-r.Context().Done():
			return
		case <-sub.C():
			for _, e := range sub.Next() {
				if !send(e.Type, e.Job) {
					return
				}
				if e.Type == v1.EventState && e.Job.State.Final() {
					return
				}
			}
		}
	}
}
