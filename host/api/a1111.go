package api

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"image/jpeg"
	"image/png"
	"net/http"
	"strconv"
	"sync"

	"github.com/arenahost/arenahost/host/job"
	v1 "github.com/arenahost/arenahost/sdk/api"
)

// A1111State is the "state" object of /sdapi/v1/progress.
type A1111State struct {
	Skipped            bool   `json:"skipped"`
	Interrupted        bool   `json:"interrupted"`
	StoppingGeneration bool   `json:"stopping_generation"`
	Job                string `json:"job"`
	JobCount           int    `json:"job_count"`
	JobTimestamp       string `json:"job_timestamp"`
	JobNo              int    `json:"job_no"`
	SamplingStep       int    `json:"sampling_step"`
	SamplingSteps      int    `json:"sampling_steps"`
}

// A1111Progress is the body of GET /sdapi/v1/progress, as AUTOMATIC1111's
// ProgressResponse: progress 0..1, eta_relative in seconds, and
// current_image a base64 PNG without a data: prefix (null when skipped or
// when there is no frame).
type A1111Progress struct {
	Progress     float64    `json:"progress"`
	ETARelative  float64    `json:"eta_relative"`
	State        A1111State `json:"state"`
	CurrentImage *string    `json:"current_image"`
	TextInfo     *string    `json:"textinfo"`
}

// pngCache keeps the PNG of the last frame asked for, so that polling
// clients do not re-encode a JPEG frame on every poll.
var pngCache struct {
	sync.Mutex
	job string
	id  uint64
	b64 string
}

// framePNG returns the frame as base64 PNG, transcoding a JPEG frame.
func framePNG(jobID string, f *job.Frame) (string, error) {
	pngCache.Lock()
	defer pngCache.Unlock()
	if pngCache.job == jobID && pngCache.id == f.ID {
		return pngCache.b64, nil
	}
	data := f.Data
	if f.Format != "png" {
		img, err := jpeg.Decode(bytes.NewReader(f.Data))
		if err != nil {
			return "", fmt.Errorf("job %s frame %d: decode jpeg: %w", jobID, f.ID, err)
		}
		var buf bytes.Buffer
		if err := (&png.Encoder{CompressionLevel: png.BestSpeed}).Encode(&buf, img); err != nil {
			return "", fmt.Errorf("job %s frame %d: encode png: %w", jobID, f.ID, err)
		}
		data = buf.Bytes()
	}
	pngCache.job, pngCache.id, pngCache.b64 = jobID, f.ID, base64.StdEncoding.EncodeToString(data)
	return pngCache.b64, nil
}

// sdapiProgress answers A1111's progress poll for the current job (the
// newest running, else queued, else most recent one). An idle host
// answers progress 0 and job_count 0, keeping the last job's final frame
// as current_image as A1111 does.
func (a *API) sdapiProgress(w http.ResponseWriter, r *http.Request) {
	skip := false
	if v := r.URL.Query().Get("skip_current_image"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			a.fail(w, r, badRequest("skip_current_image: %q is not a boolean", v))
			return
		}
		skip = b
	}
	var out A1111Progress
	j := a.s.Jobs.Current()
	if j == nil {
		writeJSON(w, http.StatusOK, out)
		return
	}
	s := j.Snapshot()
	out.State = A1111State{Job: s.ID, JobTimestamp: s.Created.Format("20060102150405"), SamplingStep: s.Step, SamplingSteps: s.Total,
		Interrupted: s.State == v1.JobCancelled}
	if !s.State.Final() {
		out.State.JobCount = 1
		out.Progress = min(1, 0.01+s.Progress)
		if s.State == v1.JobQueued {
			out.Progress = 0
		}
		out.ETARelative = s.ETA
	}
	text := fmt.Sprintf("%s: step %d/%d (%s)", s.ID, s.Step, s.Total, s.State)
	out.TextInfo = &text
	if f := j.Frame(); f != nil && !skip {
		b64, err := framePNG(s.ID, f)
		if err != nil {
			a.fail(w, r, err)
			return
		}
		out.CurrentImage = &b64
	}
	writeJSON(w, http.StatusOK, out)
}

// sdapiInterrupt cancels the current job, as A1111's interrupt stops the
// running generation at its next step; a txt2img request waiting on it
// answers 200 with the images done so far. It answers {} like A1111.
func (a *API) sdapiInterrupt(w http.ResponseWriter, _ *http.Request) {
	a.interruptRuns()
	if j := a.s.Jobs.Current(); j != nil && !j.State().Final() {
		j.Cancel()
	}
	writeJSON(w, http.StatusOK, struct{}{})
}
