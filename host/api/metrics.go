package api

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics holds arenahost's Prometheus metrics, served at GET /metrics.
// Arena and plugin figures are read from the server at scrape time; the
// rest are observed by the routes and the job engine through the exported
// collectors and methods below (every method is safe on a nil *Metrics).
type Metrics struct {
	Registry *prometheus.Registry

	// ApplyDuration observes LoRA apply and remove calls, labelled
	// op="apply"|"remove", mode="side"|"fuse", result="ok"|"error".
	ApplyDuration *prometheus.HistogramVec
	// PreviewLatency observes the time from a step's latent to its encoded
	// preview frame reaching the fan-out.
	PreviewLatency prometheus.Histogram
	// PreviewFrames counts frames published; PreviewDropped frames a slow
	// viewer skipped.
	PreviewFrames  prometheus.Counter
	PreviewDropped prometheus.Counter
	// Jobs counts jobs by final state ("submitted" when queued, then one of
	// "succeeded", "failed", "canceled"); JobsRunning is the number running.
	Jobs        *prometheus.CounterVec
	JobsRunning prometheus.Gauge
}

// Metric names the job engineer and the LoRA route observe.
const (
	MetricApplyDuration  = "arenahost_lora_apply_duration_seconds"
	MetricPreviewLatency = "arenahost_preview_latency_seconds"
	MetricPreviewFrames  = "arenahost_preview_frames_total"
	MetricPreviewDropped = "arenahost_preview_frames_dropped_total"
	MetricJobs           = "arenahost_jobs_total"
	MetricJobsRunning    = "arenahost_jobs_running"
)

// NewMetrics creates the metrics of s in a fresh registry (with the Go
// runtime and process collectors).
func NewMetrics(s Backend) *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		ApplyDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: MetricApplyDuration, Help: "Duration of LoRA apply and remove calls.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14), // 5ms .. ~41s
		}, []string{"op", "mode", "result"}),
		PreviewLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: MetricPreviewLatency, Help: "Latency from a step's latent to its preview frame.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 12), // 1ms .. ~2s
		}),
		PreviewFrames:  prometheus.NewCounter(prometheus.CounterOpts{Name: MetricPreviewFrames, Help: "Preview frames published."}),
		PreviewDropped: prometheus.NewCounter(prometheus.CounterOpts{Name: MetricPreviewDropped, Help: "Preview frames dropped for slow viewers."}),
		Jobs:           prometheus.NewCounterVec(prometheus.CounterOpts{Name: MetricJobs, Help: "Jobs by state reached."}, []string{"state"}),
		JobsRunning:    prometheus.NewGauge(prometheus.GaugeOpts{Name: MetricJobsRunning, Help: "Jobs running now."}),
	}
	m.Registry.MustRegister(m.ApplyDuration, m.PreviewLatency, m.PreviewFrames, m.PreviewDropped, m.Jobs, m.JobsRunning,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if s.Arena != nil || s.Plugins != nil {
		m.Registry.MustRegister(&hostCollector{s: s})
	}
	return m
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}

// ObserveApply records one apply or remove call.
func (m *Metrics) ObserveApply(op, mode string, d time.Duration, err error) {
	if m == nil {
		return
	}
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.ApplyDuration.WithLabelValues(op, mode, result).Observe(d.Seconds())
}

// ObservePreview records one published preview frame and its latency.
func (m *Metrics) ObservePreview(latency time.Duration) {
	if m == nil {
		return
	}
	m.PreviewFrames.Inc()
	m.PreviewLatency.Observe(latency.Seconds())
}

// PreviewFramesDropped records n frames a viewer skipped.
func (m *Metrics) PreviewFramesDropped(n int) {
	if m == nil || n <= 0 {
		return
	}
	m.PreviewDropped.Add(float64(n))
}

// JobStarted records a job that began running.
func (m *Metrics) JobStarted() {
	if m == nil {
		return
	}
	m.Jobs.WithLabelValues("started").Inc()
	m.JobsRunning.Inc()
}

// JobSubmitted records a job accepted into the queue.
func (m *Metrics) JobSubmitted() {
	if m == nil {
		return
	}
	m.Jobs.WithLabelValues("submitted").Inc()
}

// JobFinished records a job that stopped running in state (succeeded,
// failed, canceled).
func (m *Metrics) JobFinished(state string) {
	if m == nil {
		return
	}
	m.Jobs.WithLabelValues(state).Inc()
	m.JobsRunning.Dec()
}

// hostCollector reads arena and plugin figures at scrape time.
type hostCollector struct{ s Backend }

var (
	descArenaCapacity  = prometheus.NewDesc("arenahost_arena_capacity_bytes", "Arena capacity.", []string{"backend"}, nil)
	descArenaAllocated = prometheus.NewDesc("arenahost_arena_allocated_bytes", "Bytes allocated in the arena.", []string{"backend"}, nil)
	descArenaPeak      = prometheus.NewDesc("arenahost_arena_peak_bytes", "Peak bytes allocated in the arena.", []string{"backend"}, nil)
	descArenaFree      = prometheus.NewDesc("arenahost_arena_largest_free_bytes", "Largest free extent in the arena's segments.", []string{"backend"}, nil)
	descArenaFrag      = prometheus.NewDesc("arenahost_arena_fragmentation_ratio", "Arena fragmentation: 1 - largest free extent / free bytes.", []string{"backend"}, nil)
	descArenaSegments  = prometheus.NewDesc("arenahost_arena_segments", "Shared-memory segments the arena holds.", []string{"backend"}, nil)
	descArenaRegions   = prometheus.NewDesc("arenahost_arena_regions", "Live regions in the arena.", []string{"backend"}, nil)
	descRestarts       = prometheus.NewDesc("arenahost_plugin_restarts_total", "Plugin restarts after a crash.", []string{"plugin"}, nil)
	descSwaps          = prometheus.NewDesc("arenahost_plugin_swaps_total", "Plugin hot swaps (reload or changed files): generations started after the first, less restarts.", []string{"plugin"}, nil)
	descGeneration     = prometheus.NewDesc("arenahost_plugin_generation", "Generation number of the plugin's serving process (0: none).", []string{"plugin"}, nil)
	descUp             = prometheus.NewDesc("arenahost_plugin_up", "1 when the plugin is serving.", []string{"plugin", "state"}, nil)
)

func (c *hostCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descArenaCapacity, descArenaAllocated, descArenaPeak, descArenaFree, descArenaFrag,
		descArenaSegments, descArenaRegions, descRestarts, descSwaps, descGeneration, descUp} {
		ch <- d
	}
}

func (c *hostCollector) Collect(ch chan<- prometheus.Metric) {
	if c.s.Arena != nil {
		st := c.s.Arena.Stats()
		g := func(d *prometheus.Desc, v float64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, st.Backend)
		}
		g(descArenaCapacity, float64(st.Capacity))
		g(descArenaAllocated, float64(st.Allocated))
		g(descArenaPeak, float64(st.Peak))
		g(descArenaFree, float64(st.LargestFree))
		g(descArenaFrag, st.Fragmentation)
		g(descArenaSegments, float64(st.Segments))
		g(descArenaRegions, float64(st.Regions))
	}
	if c.s.Plugins == nil {
		return
	}
	for _, p := range c.s.Plugins.Status() {
		ch <- prometheus.MustNewConstMetric(descRestarts, prometheus.CounterValue, float64(p.Restarts), p.Name)
		swaps := int64(p.Generation) - 1 - int64(p.Restarts)
		if swaps < 0 {
			swaps = 0
		}
		ch <- prometheus.MustNewConstMetric(descSwaps, prometheus.CounterValue, float64(swaps), p.Name)
		ch <- prometheus.MustNewConstMetric(descGeneration, prometheus.GaugeValue, float64(p.Generation), p.Name)
		up := 0.0
		if p.State == "serving" {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, up, p.Name, string(p.State))
	}
}
