package api

import (
	"cmp"
	"io/fs"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/arenahost/arenahost/host/arena"
	v1 "github.com/arenahost/arenahost/sdk/api"
)

// consoleRoutes registers the read-only routes the console needs beyond
// the rest of the API: the files the models directory holds, where the
// arena's bytes go (by owner and by purpose, with device memory on a
// device backend), and the arena's recent history.
func (a *API) consoleRoutes() {
	a.mux.HandleFunc("GET /v1/models/files", a.modelFiles)
	a.mux.HandleFunc("GET /v1/arena/usage", a.arenaUsage)
	a.mux.HandleFunc("GET /v1/arena/history", a.arenaHistory)
	a.history = newArenaHistory(historySamples)
	go a.sampleArena(historyInterval)
}

// maxModelFiles bounds the listing of the models directory.
const maxModelFiles = 1000

// modelFiles lists the loadable files under the models directory
// (following symlinks only when they stay inside it), so a UI offers a
// choice instead of a free-text path.
func (a *API) modelFiles(w http.ResponseWriter, r *http.Request) {
	root, err := filepath.EvalSymlinks(a.opts.ModelsDir)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	loaded := map[string][]string{}
	for _, m := range a.s.Registry.Models() {
		if real, err := filepath.EvalSymlinks(m.Source); err == nil {
			loaded[real] = append(loaded[real], m.Name)
		}
	}
	out := []v1.ModelFile{}
	err = walkConfined(root, isSafetensors, func(rel, real string, st fs.FileInfo) error {
		if len(out) >= maxModelFiles {
			return filepath.SkipAll
		}
		base := filepath.Base(rel)
		out = append(out, v1.ModelFile{Path: filepath.ToSlash(rel), Name: strings.TrimSuffix(base, filepath.Ext(base)),
			Bytes: st.Size(), Modified: st.ModTime(), Loaded: loaded[real]})
		return nil
	})
	if err != nil {
		a.fail(w, r, err)
		return
	}
	slices.SortFunc(out, func(x, y v1.ModelFile) int { return cmp.Compare(x.Path, y.Path) })
	writeJSON(w, http.StatusOK, out)
}

// purposeOf classifies a lease by its owner and name: models are named
// "MODEL/TENSOR" by the registry, side factors "factors/WEIGHT/A|B" by the
// LoRA plugin (the host takes them over) or "lora factors …" by the
// coordinator, journal copies "lora journal …", job latents "job/ID/…".
func purposeOf(l arena.Lease, models map[string]bool) (owner, purpose string) {
	if l.Owner != arena.HostOwner {
		return string(l.Owner), v1.PurposePlugin
	}
	if m, _, ok := strings.Cut(l.Name, "/"); ok && models[m] {
		return "model:" + m, v1.PurposeModel
	}
	switch {
	case strings.HasPrefix(l.Name, "lora factors "), strings.HasPrefix(l.Name, "factors/"):
		return "host", v1.PurposeLoRAFactors
	case strings.HasPrefix(l.Name, "lora journal "):
		return "host", v1.PurposeJournal
	case strings.HasPrefix(l.Name, "job/"):
		return "host", v1.PurposeJobs
	}
	return "host", v1.PurposeOther
}

func (a *API) arenaStats() v1.ArenaStats {
	st := a.s.Arena.Stats()
	return v1.ArenaStats{Backend: st.Backend, Capacity: uint64(st.Capacity), Allocated: uint64(st.Allocated),
		Peak: uint64(st.Peak), LargestFree: uint64(st.LargestFree), Fragmentation: st.Fragmentation, Segments: st.Segments, Regions: st.Regions}
}

func (a *API) deviceMemory() *v1.DeviceMemory {
	free, total, ok := a.s.DeviceMemory()
	if !ok {
		return nil
	}
	return &v1.DeviceMemory{Total: total, Free: free, Used: total - min(free, total)}
}

func (a *API) arenaUsage(w http.ResponseWriter, _ *http.Request) {
	models := map[string]bool{}
	for _, m := range a.s.Registry.Models() {
		models[m.Name] = true
	}
	type key struct{ owner, purpose string }
	sums := map[key]*v1.Usage{}
	for _, l := range a.s.Arena.Leases() {
		o, p := purposeOf(l, models)
		u := sums[key{o, p}]
		if u == nil {
			u = &v1.Usage{Owner: o, Purpose: p}
			sums[key{o, p}] = u
		}
		u.Bytes += uint64(l.Size)
		u.Regions++
	}
	out := v1.ArenaUsage{ArenaStats: a.arenaStats(), ByOwner: []v1.Usage{}, Device: a.deviceMemory()}
	for _, u := range sums {
		out.ByOwner = append(out.ByOwner, *u)
	}
	slices.SortFunc(out.ByOwner, func(x, y v1.Usage) int {
		if c := cmp.Compare(y.Bytes, x.Bytes); c != 0 {
			return c
		}
		return cmp.Compare(x.Owner+x.Purpose, y.Owner+y.Purpose)
	})
	writeJSON(w, http.StatusOK, out)
}

// The arena's history: one sample a second for the last ten minutes.
const (
	historyInterval = time.Second
	historySamples  = 600
)

// arenaHistory is a fixed ring of samples.
type arenaHistory struct {
	mu   sync.Mutex
	ring []v1.ArenaSample
	next int
	full bool
}

func newArenaHistory(n int) *arenaHistory { return &arenaHistory{ring: make([]v1.ArenaSample, n)} }

func (h *arenaHistory) add(s v1.ArenaSample) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ring[h.next] = s
	h.next = (h.next + 1) % len(h.ring)
	if h.next == 0 {
		h.full = true
	}
}

// since returns the samples after t, oldest first.
func (h *arenaHistory) since(t time.Time) []v1.ArenaSample {
	h.mu.Lock()
	defer h.mu.Unlock()
	var all []v1.ArenaSample
	if h.full {
		all = append(all, h.ring[h.next:]...)
	}
	all = append(all, h.ring[:h.next]...)
	out := []v1.ArenaSample{}
	for _, s := range all {
		if s.Time.After(t) {
			out = append(out, s)
		}
	}
	return out
}

func (a *API) sample() {
	st := a.s.Arena.Stats()
	s := v1.ArenaSample{Time: time.Now().UTC(), Allocated: uint64(st.Allocated), Peak: uint64(st.Peak), Fragmentation: st.Fragmentation}
	if d := a.deviceMemory(); d != nil {
		s.DeviceUsed = d.Used
	}
	a.history.add(s)
}

// sampleArena records the arena's figures every interval until the server's
// job manager closes (as the server does).
func (a *API) sampleArena(interval time.Duration) {
	a.sample()
	tk := time.NewTicker(interval)
	defer tk.Stop()
	for {
		select {
		case <-a.s.Jobs.Done():
			return
		case <-tk.C:
			a.sample()
		}
	}
}

// arenaHistory answers the recorded samples; ?since=RFC3339 keeps those
// after that time (a poller asks only for what it has not seen).
func (a *API) arenaHistory(w http.ResponseWriter, r *http.Request) {
	var since time.Time
	if q := r.URL.Query().Get("since"); q != "" {
		t, err := time.Parse(time.RFC3339Nano, q)
		if err != nil {
			a.fail(w, r, badRequest("query since=%q: want an RFC 3339 time such as 2026-01-02T15:04:05Z", q))
			return
		}
		since = t
	}
	st := a.s.Arena.Stats()
	out := v1.ArenaHistory{Backend: st.Backend, Capacity: uint64(st.Capacity), IntervalSeconds: historyInterval.Seconds(), Samples: a.history.since(since)}
	if d := a.deviceMemory(); d != nil {
		out.DeviceTotal = d.Total
	}
	writeJSON(w, http.StatusOK, out)
}
