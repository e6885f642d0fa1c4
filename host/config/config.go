// Package config owns arenahost serve's settings: their names, defaults and
// documentation, and how they are resolved from a JSON config file,
// ARENAHOST_* environment variables and command-line flags, in increasing
// precedence (flags win). Every setting is declared once, in the settings
// table below; the flags, the environment names, the config-file keys and
// docs/config.md are all derived from it.
package config

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/arenahost/arenahost/shared/cpuprofile"
	"github.com/arenahost/arenahost/shared/lora/lorawire"
)

// Config is the resolved configuration of `arenahost serve`.
type Config struct {
	ConfigFile string // the JSON file read, if any

	Listen     string
	Token      string
	DataDir    string
	ModelsDir  string // DataDir/models when empty
	LoRAsDir   string // DataDir/loras when empty
	PluginsDir string // "auto": <dir of the arenahost binary>/plugins when it exists; "": none
	Python     string // interpreter for Python plugins (manifest ${ARENAHOST_PYTHON})
	Pipeline   string // pipeline plugin /sdapi/v1/txt2img runs; "": the first of kind pipeline
	// ComfyFrontend is comfyui-frontend-package's static/ folder, served
	// under /comfy/; Auto: .cache/comfy-frontend/static beside bin/.
	ComfyFrontend string

	// AllowedHosts are host names (optionally HOST:PORT) accepted in the
	// Host and Origin headers besides the loopback names and the listen
	// address.
	// Comma-separated; AllowedHostList splits it.
	AllowedHosts string
	MaxImages    int // most images one txt2img request may ask for

	ArenaCapacity uint64
	ArenaSegment  uint64
	ArenaBackend  string // cpu, cuda or cuda-sim
	ArenaDevice   int    // device ordinal for cuda and cuda-sim
	Shm           string
	Samples       bool
	// LoRAJournalMemory bounds the host memory a fuse journal keeps
	// original bytes in (host/lora JournalMemory): -1 auto, 0 none.
	LoRAJournalMemory int64
	// LoRAJournalArena is the arena budget for the same copies (0: none).
	LoRAJournalArena uint64
	// LoRAFactorDType is the side factors' storage dtype when an apply
	// names none: f32 or bf16.
	LoRAFactorDType string

	MaxBody           int64
	ReadHeaderTimeout time.Duration
	ReadTimeout       time.Duration
	WriteTimeout      time.Duration // per request, non-streaming routes only
	IdleTimeout       time.Duration

	LogLevel string
}

// Auto is the PluginsDir value meaning "bin/plugins next to the binary".
const Auto = "auto"

// Defaults for the settings that tests and other packages refer to.
const (
	DefaultListen  = "127.0.0.1:7860"
	DefaultMaxBody = 1 << 20
)

// setting is one configurable value.
type setting struct {
	name   string // flag name and config-file key (with '-' → '_')
	def    string // default, as it would be typed
	doc    string
	isBool bool
	set    func(c *Config, v string) error
}

func (s setting) env() string {
	return "ARENAHOST_" + strings.ToUpper(strings.ReplaceAll(s.name, "-", "_"))
}

func (s setting) key() string { return strings.ReplaceAll(s.name, "-", "_") }

func str(p func(*Config) *string) func(*Config, string) error {
	return func(c *Config, v string) error { *p(c) = v; return nil }
}

func dur(p func(*Config) *time.Duration) func(*Config, string) error {
	return func(c *Config, v string) error {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return fmt.Errorf("%q is not a duration (use e.g. 10s, 2m)", v)
		}
		*p(c) = d
		return nil
	}
}

func size(p func(*Config) *uint64) func(*Config, string) error {
	return func(c *Config, v string) error {
		n, err := ParseSize(v)
		if err != nil {
			return err
		}
		*p(c) = n
		return nil
	}
}

// settings is the one table of every setting, in documentation order.
var settings = []setting{
	{name: "config", def: "", doc: "JSON config file to read (keys are the setting names with '_' for '-'); none when empty",
		set: str(func(c *Config) *string { return &c.ConfigFile })},
	{name: "listen", def: DefaultListen, doc: "address the HTTP API and console listen on; a non-loopback address requires a token",
		set: str(func(c *Config) *string { return &c.Listen })},
	{name: "token", def: "", doc: "bearer token required on every mutating route (Authorization: Bearer TOKEN); required off loopback",
		set: str(func(c *Config) *string { return &c.Token })},
	{name: "data", def: "arenahost-data", doc: "data directory: models/, loras/ and the samples written on first run",
		set: str(func(c *Config) *string { return &c.DataDir })},
	{name: "models-dir", def: "", doc: "models directory; model paths in requests must stay inside it (default DATA/models)",
		set: str(func(c *Config) *string { return &c.ModelsDir })},
	{name: "loras-dir", def: "", doc: "LoRA directory; LoRA paths in requests must stay inside it (default DATA/loras)",
		set: str(func(c *Config) *string { return &c.LoRAsDir })},
	{name: "plugins", def: Auto, doc: "plugins directory (DIR/NAME/plugin.json); auto: bin/plugins next to the arenahost binary when it exists; empty: none",
		set: str(func(c *Config) *string { return &c.PluginsDir })},
	{name: "python", def: Auto, doc: "Python interpreter for Python plugins (their manifests' ${ARENAHOST_PYTHON}); auto: .venv/bin/python beside bin/ (what make creates), else python3 on PATH",
		set: str(func(c *Config) *string { return &c.Python })},
	{name: "pipeline", def: "", doc: "pipeline plugin /sdapi/v1/txt2img, POST /v1/jobs without a pipeline and the console run; empty: the first serving plugin of kind pipeline (never an unavailable one)",
		set: str(func(c *Config) *string { return &c.Pipeline })},
	{name: "allowed-hosts", def: "", doc: "comma-separated host names (or HOST:PORT) accepted in the Host and Origin headers besides loopback names and the listen address; every other Host is refused (403), which stops DNS rebinding",
		set: func(c *Config, v string) error {
			for _, h := range splitList(v) {
				if strings.ContainsAny(h, "/ @?#\\") {
					return fmt.Errorf("%q is not a host name (want e.g. arenahost.lan or arenahost.lan:7860)", h)
				}
			}
			c.AllowedHosts = strings.Join(splitList(v), ",")
			return nil
		}},
	{name: "max-images", def: "8", doc: "most images one /sdapi/v1/txt2img request may ask for (batch_size × n_iter)",
		set: func(c *Config, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 1000 {
				return fmt.Errorf("%q is not a count from 1 to 1000", v)
			}
			c.MaxImages = n
			return nil
		}},
	{name: "comfy-frontend", def: Auto, doc: "ComfyUI's web frontend (comfyui-frontend-package's static/ folder) served under /comfy/; auto: .cache/comfy-frontend/static beside bin/ (make comfy-frontend) when it exists; empty: none",
		set: str(func(c *Config) *string { return &c.ComfyFrontend })},
	{name: "arena-capacity", def: "8GiB", doc: "arena capacity (address space; memory is committed as segments are written, and on the cpu backend given back to the kernel when regions are freed: holes are punched in the segment files over freed runs of at least 64 KiB of whole pages)",
		set: size(func(c *Config) *uint64 { return &c.ArenaCapacity })},
	{name: "arena-segment", def: "64MiB", doc: "arena growth unit",
		set: size(func(c *Config) *uint64 { return &c.ArenaSegment })},
	{name: "arena-backend", def: "cpu", doc: "arena memory: cpu (shared memory plugins map), cuda (device memory plugins open by CUDA IPC handle; needs bin/cuda/arenahost from make cuda) or cuda-sim (a simulated GPU over shared memory, for development and tests)",
		set: func(c *Config, v string) error {
			switch v {
			case "cpu", "cuda", "cuda-sim":
				c.ArenaBackend = v
				return nil
			}
			return fmt.Errorf("%q is not cpu, cuda or cuda-sim", v)
		}},
	{name: "arena-device", def: "0", doc: "device ordinal of the cuda and cuda-sim arena backends",
		set: func(c *Config, v string) error {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil || n < 0 || n > 1<<16 {
				return fmt.Errorf("%q is not a device ordinal (0, 1, …)", v)
			}
			c.ArenaDevice = n
			return nil
		}},
	{name: "shm", def: "memfd", doc: "shared-memory kind: memfd (nothing outlives the host) or shm (files under /dev/shm)",
		set: func(c *Config, v string) error {
			if v != "memfd" && v != "shm" {
				return fmt.Errorf("%q is not memfd or shm", v)
			}
			c.Shm = v
			return nil
		}},
	{name: "samples", def: "true", isBool: true, doc: "write the sample model into the models directory on first run and load it",
		set: func(c *Config, v string) error {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return fmt.Errorf("%q is not true or false", v)
			}
			c.Samples = b
			return nil
		}},
	{name: "lora-journal-memory", def: "auto", doc: "host memory (never arena) a fused LoRA's journal may keep the fused weights' original bytes in, so that remove and a fused re-apply restore them without reading the model file again; auto: all copies together up to half of the memory available to the host (what they hold plus MemAvailable, or a memory cgroup's limit minus its usage when that is less); 0: none (restores read the model file, checked by CRC-32C)",
		set: func(c *Config, v string) error {
			if v == "auto" {
				c.LoRAJournalMemory = -1
				return nil
			}
			n, err := ParseSize(v)
			if err != nil {
				return err
			}
			if n > 1<<50 {
				return fmt.Errorf("%q is out of range (0B to 1PiB, or auto)", v)
			}
			c.LoRAJournalMemory = int64(n)
			return nil
		}},
	{name: "lora-journal-arena", def: "0", doc: "arena (device memory on the cuda backend) a fused LoRA's journal may keep the original bytes in instead of host memory: a restore is then a device-to-device copy; it costs as much as the fused weights' packed codes and absmax; 0: none",
		set: size(func(c *Config) *uint64 { return &c.LoRAJournalArena })},
	{name: "lora-factor-dtype", def: "f32", doc: "how side-mode LoRA factors are stored when an apply names no factor_dtype and the model holds no side set: f32, or bf16 (half the memory and upload; the same bits for a pipeline that computes in bfloat16, as diffusers-flux does on a GPU; a float16 pipeline would round them twice)",
		set: func(c *Config, v string) error {
			dt, err := lorawire.CheckFactorDType(v)
			if err != nil {
				return err
			}
			c.LoRAFactorDType = dt
			return nil
		}},
	{name: "max-body", def: "1MiB", doc: "largest request body accepted (413 beyond)",
		set: func(c *Config, v string) error {
			n, err := ParseSize(v)
			if err != nil {
				return err
			}
			if n == 0 || n > 1<<40 {
				return fmt.Errorf("%q is out of range (1B to 1TiB)", v)
			}
			c.MaxBody = int64(n)
			return nil
		}},
	{name: "read-header-timeout", def: "10s", doc: "time a client has to send the request headers",
		set: dur(func(c *Config) *time.Duration { return &c.ReadHeaderTimeout })},
	{name: "read-timeout", def: "1m", doc: "time a client has to send the whole request, body included",
		set: dur(func(c *Config) *time.Duration { return &c.ReadTimeout })},
	{name: "write-timeout", def: "10m", doc: "time a non-streaming route has to answer (streaming routes such as MJPEG and SSE have none)",
		set: dur(func(c *Config) *time.Duration { return &c.WriteTimeout })},
	{name: "idle-timeout", def: "2m", doc: "how long an idle keep-alive connection stays open",
		set: dur(func(c *Config) *time.Duration { return &c.IdleTimeout })},
	{name: "log-level", def: "info", doc: "log level: debug, info, warn or error",
		set: func(c *Config, v string) error {
			switch v {
			case "debug", "info", "warn", "error":
				c.LogLevel = v
				return nil
			}
			return fmt.Errorf("%q is not debug, info, warn or error", v)
		}},
}

func lookup(name string) (setting, bool) {
	for _, s := range settings {
		if s.name == name {
			return s, true
		}
	}
	return setting{}, false
}

// Default returns the configuration with every setting at its default.
func Default() Config {
	var c Config
	for _, s := range settings {
		if err := s.set(&c, s.def); err != nil {
			panic(fmt.Sprintf("config: default of %s: %v", s.name, err)) // a bug in the table, caught by tests
		}
	}
	return c
}

// Flags binds every setting to a FlagSet and resolves the configuration
// once the flags are parsed.
type Flags struct {
	set map[string]string
	fs  *flag.FlagSet
}

// Bind registers one flag per setting on fs.
func Bind(fs *flag.FlagSet) *Flags {
	f := &Flags{set: map[string]string{}, fs: fs}
	for _, s := range settings {
		usage := fmt.Sprintf("%s (env %s, default %q)", s.doc, s.env(), s.def)
		record := func(v string) error {
			var probe Config
			if err := s.set(&probe, v); err != nil {
				return err
			}
			f.set[s.name] = v
			return nil
		}
		if s.isBool {
			fs.BoolFunc(s.name, usage, record)
		} else {
			fs.Func(s.name, usage, record)
		}
	}
	return f
}

// Resolve builds the configuration: defaults, then the config file (the
// --config flag, else ARENAHOST_CONFIG), then ARENAHOST_* variables from
// lookupEnv, then the flags given. It validates the result.
func (f *Flags) Resolve(lookupEnv func(string) (string, bool)) (Config, error) {
	if lookupEnv == nil {
		lookupEnv = os.LookupEnv
	}
	c := Default()
	path := ""
	if v, ok := lookupEnv(settings[0].env()); ok {
		path = v
	}
	if v, ok := f.set["config"]; ok {
		path = v
	}
	if path != "" {
		if err := applyFile(&c, path); err != nil {
			return Config{}, err
		}
		c.ConfigFile = path
	}
	for _, s := range settings {
		if v, ok := lookupEnv(s.env()); ok && s.name != "config" {
			if err := s.set(&c, v); err != nil {
				return Config{}, fmt.Errorf("environment %s: %w", s.env(), err)
			}
		}
	}
	for _, s := range settings {
		if v, ok := f.set[s.name]; ok && s.name != "config" {
			if err := s.set(&c, v); err != nil {
				return Config{}, fmt.Errorf("flag --%s: %w", s.name, err)
			}
		}
	}
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}

// applyFile applies a JSON object of settings. Unknown keys are errors, so
// a typo never silently falls back to a default.
func applyFile(c *Config, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read config %s: %w", path, err)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return fmt.Errorf("read config %s: %w (the file must be one JSON object)", path, err)
	}
	keys := make([]string, 0, len(raw))
	for k := range raw {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		s, ok := lookup(strings.ReplaceAll(k, "_", "-"))
		if !ok || s.name == "config" {
			return fmt.Errorf("read config %s: key %q: unknown setting (see docs/config.md)", path, k)
		}
		var v any
		if err := json.Unmarshal(raw[k], &v); err != nil {
			return fmt.Errorf("read config %s: key %q: %w", path, k, err)
		}
		var sv string
		switch x := v.(type) {
		case string:
			sv = x
		case bool:
			sv = strconv.FormatBool(x)
		case float64:
			sv = strconv.FormatFloat(x, 'f', -1, 64)
		default:
			return fmt.Errorf("read config %s: key %q: want a string, number or boolean, got %s", path, k, raw[k])
		}
		if err := s.set(c, sv); err != nil {
			return fmt.Errorf("read config %s: key %q: %w", path, k, err)
		}
	}
	return nil
}

// ErrNeedToken: the listen address is not loopback and no token is set.
var ErrNeedToken = errors.New("a non-loopback listen address requires a token")

// ErrBlankToken: the token is whitespace or has leading or trailing
// whitespace (which an HTTP header cannot carry intact).
var ErrBlankToken = errors.New("the token must not be blank or start or end with whitespace")

// Validate checks settings that depend on each other.
func (c Config) Validate() error {
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return fmt.Errorf("listen address %q: %w (use HOST:PORT, e.g. %s)", c.Listen, err, DefaultListen)
	}
	if c.Token != strings.TrimSpace(c.Token) {
		return fmt.Errorf("token: %w", ErrBlankToken)
	}
	if !IsLoopback(c.Listen) && c.Token == "" {
		return fmt.Errorf("listen on %s: %w: set --token or ARENAHOST_TOKEN, or listen on 127.0.0.1", c.Listen, ErrNeedToken)
	}
	return nil
}

// IsLoopback reports whether addr (HOST:PORT) only accepts local
// connections. An empty host or an unspecified address (0.0.0.0, ::) is not
// loopback; "localhost" is.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// AllowedHostList returns the --allowed-hosts entries.
func (c Config) AllowedHostList() []string { return splitList(c.AllowedHosts) }

// splitList splits a comma-separated list, dropping blank entries.
func splitList(v string) []string {
	var out []string
	for _, h := range strings.Split(v, ",") {
		if h = strings.TrimSpace(h); h != "" {
			out = append(out, h)
		}
	}
	return out
}

// Models returns the models directory.
func (c Config) Models() string {
	if c.ModelsDir != "" {
		return c.ModelsDir
	}
	return filepath.Join(c.DataDir, "models")
}

// LoRAs returns the LoRA directory.
func (c Config) LoRAs() string {
	if c.LoRAsDir != "" {
		return c.LoRAsDir
	}
	return filepath.Join(c.DataDir, "loras")
}

// Plugins returns the plugins directory to load ("" for none), resolving
// Auto against the running executable.
func (c Config) Plugins() string {
	if c.PluginsDir != Auto {
		return c.PluginsDir
	}
	exe, err := os.Executable()
	if err != nil {
		return ""
	}
	dir := filepath.Join(filepath.Dir(exe), "plugins")
	if st, err := os.Stat(dir); err == nil && st.IsDir() {
		return dir
	}
	return ""
}

// Interpreter returns the Python interpreter for Python plugins ("" when
// none is found), resolving Auto: the repository's .venv/bin/python next to
// the bin/ directory holding the running executable (the layout make
// creates), else python3 on PATH.
func (c Config) Interpreter() string {
	if c.Python != Auto {
		return c.Python
	}
	if exe, err := os.Executable(); err == nil {
		venv := filepath.Join(filepath.Dir(filepath.Dir(exe)), ".venv", "bin", "python")
		if _, err := os.Stat(venv); err == nil {
			return venv
		}
	}
	if p, err := exec.LookPath("python3"); err == nil {
		return p
	}
	return ""
}

// FrontendDir resolves ComfyFrontend: Auto means .cache/comfy-frontend/static
// beside the bin/ directory holding the running executable (where
// `make comfy-frontend` unpacks it) when it holds an index.html.
func (c Config) FrontendDir() string {
	if c.ComfyFrontend != Auto {
		return c.ComfyFrontend
	}
	if exe, err := os.Executable(); err == nil {
		dir := filepath.Join(filepath.Dir(filepath.Dir(exe)), ".cache", "comfy-frontend", "static")
		if _, err := os.Stat(filepath.Join(dir, "index.html")); err == nil {
			return dir
		}
	}
	return ""
}

var units = []struct {
	suffix string
	mult   uint64
}{
	{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
	{"TB", 1e12}, {"GB", 1e9}, {"MB", 1e6}, {"KB", 1e3}, {"B", 1},
}

// ParseSize parses a byte count: a plain integer or one with a unit suffix
// (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB).
func ParseSize(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	mult := uint64(1)
	for _, u := range units {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil || (mult > 1 && n > ^uint64(0)/mult) {
		return 0, fmt.Errorf("%q is not a size (use e.g. 8GiB, 512MiB or a byte count)", s)
	}
	return n * mult, nil
}

// Doc renders the Markdown reference of every setting (docs/config.md).
func Doc() string {
	var b strings.Builder
	b.WriteString("# arenahost serve: configuration\n\n")
	b.WriteString("<!-- Generated from host/config/config.go by `go test ./host/config -run TestDoc -update`; a test fails when it drifts. -->\n\n")
	b.WriteString("`arenahost serve` reads its settings from, in increasing precedence:\n\n")
	b.WriteString("1. the defaults below (so `arenahost serve` with no flags runs);\n")
	b.WriteString("2. a JSON config file named by `--config` or `ARENAHOST_CONFIG`: one object whose keys are the setting names with `_` for `-` (`{\"listen\": \"0.0.0.0:7860\", \"token\": \"…\", \"arena_capacity\": \"16GiB\"}`); an unknown key is an error;\n")
	b.WriteString("3. `ARENAHOST_*` environment variables;\n")
	b.WriteString("4. command-line flags (`--listen 127.0.0.1:8000`).\n\n")
	b.WriteString("Sizes take `B`, `KiB`, `MiB`, `GiB`, `TiB` (or `KB`, `MB`, … powers of ten) or a plain byte count; durations are Go durations (`10s`, `2m`).\n")
	b.WriteString("Listening on a non-loopback address without a token is refused at start.\n\n")
	b.WriteString("| flag | environment | file key | default | meaning |\n|---|---|---|---|---|\n")
	for _, s := range settings {
		def := "`" + s.def + "`"
		if s.def == "" {
			def = "(empty)"
		}
		fmt.Fprintf(&b, "| `--%s` | `%s` | `%s` | %s | %s |\n", s.name, s.env(), s.key(), def, strings.ReplaceAll(s.doc, "|", "\\|"))
	}
	b.WriteString("\n## Profiling\n\n")
	b.WriteString("`" + cpuprofile.Env + "=DIR` (an environment variable only, no flag) makes `arenahost serve` and every plugin built on the Go SDK ")
	b.WriteString("write a CPU profile of their whole run to `DIR/NAME-PID.pprof` (package shared/cpuprofile). Plugins inherit the host's environment, ")
	b.WriteString("so one variable profiles both sides of a call; stop the host with Ctrl-C (SIGINT) so that every profile is closed, then read one with ")
	b.WriteString("`go tool pprof -top DIR/lora-nf4-*.pprof`.\n")
	b.WriteString(simdDoc)
	return b.String()
}

// Names returns every setting's flag name, in table order.
func Names() []string {
	out := make([]string, 0, len(settings))
	for _, s := range settings {
		out = append(out, s.name)
	}
	return slices.Clip(out)
}

// simdDoc is docs/config.md's section on ARENAHOST_SIMD (package shared/simd).
const simdDoc = `
## CPU vector kernels

The CPU paths that touch every weight — the NF4 codec (quantize, dequantize) and the fused pass's
delta product and tile steps (` + "`" + `arenahost merge` + "`" + `, the CPU arena's fuse) — run on AVX-512 or AVX2
kernels where the CPU has them, chosen once at start (package shared/simd, using
golang.org/x/sys/cpu), with a portable Go fallback on every other CPU and architecture.
` + "`" + `ARENAHOST_SIMD` + "`" + ` (an environment variable only, no flag) forces a path: ` + "`" + `avx512` + "`" + `, ` + "`" + `avx2` + "`" + `, or ` + "`" + `off` + "`" + `
(the portable Go code); unset or ` + "`" + `auto` + "`" + ` picks the best the CPU has. Forcing a path the CPU lacks logs
a warning and uses the best one it has. The path changes speed only: every path writes the same
bytes (the kernels keep the scalar order of every sum and product, the same order the CUDA kernels
use: the NF4 codec rounds each product and sum on its own, as bitsandbytes does, and the LoRA delta
product is one chain of float32 fused multiply-adds per weight, which the vector paths run with FMA
instructions and the portable code with an exact software FMA), except the fused pass's retention
figures, which the vector path sums in 8 lanes and which can differ in their last digits. Tile sizes come from the L1 data and L2 cache sizes the
kernel reports (` + "`" + `/sys/devices/system/cpu/cpu0/cache` + "`" + `; 32 KiB and 1 MiB when it says nothing).
The codec, the delta product and the fused tile's add and retention sums have AVX-512 and AVX2
kernels.
`
