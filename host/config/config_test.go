package config

import (
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite docs/config.md from the settings table")

func resolve(t *testing.T, args []string, env map[string]string) (Config, error) {
	t.Helper()
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	f := Bind(fs)
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	return f.Resolve(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
}

func TestDefaults(t *testing.T) {
	c, err := resolve(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := Config{Listen: "127.0.0.1:7860", DataDir: "arenahost-data", PluginsDir: Auto, Python: Auto, ComfyFrontend: Auto, ArenaCapacity: 8 << 30,
		ArenaSegment: 64 << 20, ArenaBackend: "cpu", Shm: "memfd", Samples: true, LoRAJournalMemory: -1, LoRAJournalArena: 0, LoRAFactorDType: "f32", MaxBody: 1 << 20, ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout: time.Minute, WriteTimeout: 10 * time.Minute, IdleTimeout: 2 * time.Minute, LogLevel: "info", MaxImages: 8}
	if c != want {
		t.Fatalf("defaults:\n got %+v\nwant %+v", c, want)
	}
	if c.Models() != filepath.Join("arenahost-data", "models") || c.LoRAs() != filepath.Join("arenahost-data", "loras") {
		t.Fatalf("dirs: %s %s", c.Models(), c.LoRAs())
	}
}

func TestPrecedence(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "arenahost.json")
	if err := os.WriteFile(file, []byte(`{"listen": "127.0.0.1:1111", "data": "from-file", "arena_capacity": "1GiB", "samples": false, "read_timeout": "5s"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want func(c Config) bool
	}{
		{"file only", []string{"--config", file}, nil, func(c Config) bool {
			return c.Listen == "127.0.0.1:1111" && c.DataDir == "from-file" && c.ArenaCapacity == 1<<30 && !c.Samples && c.ReadTimeout == 5*time.Second
		}},
		{"config from env", nil, map[string]string{"ARENAHOST_CONFIG": file}, func(c Config) bool { return c.Listen == "127.0.0.1:1111" }},
		{"env beats file", []string{"--config", file}, map[string]string{"ARENAHOST_LISTEN": "127.0.0.1:2222", "ARENAHOST_SAMPLES": "true"},
			func(c Config) bool { return c.Listen == "127.0.0.1:2222" && c.Samples && c.DataDir == "from-file" }},
		{"flag beats env", []string{"--config", file, "--listen", "127.0.0.1:3333", "--samples"}, map[string]string{"ARENAHOST_LISTEN": "127.0.0.1:2222", "ARENAHOST_SAMPLES": "false"},
			func(c Config) bool { return c.Listen == "127.0.0.1:3333" && c.Samples }},
		{"bool flag false", []string{"--samples=false"}, nil, func(c Config) bool { return !c.Samples }},
		{"token from env off loopback", []string{"--listen", "0.0.0.0:7860"}, map[string]string{"ARENAHOST_TOKEN": "s3cret"},
			func(c Config) bool { return c.Token == "s3cret" }},
		{"sizes", []string{"--arena-capacity", "512MiB", "--max-body", "2048"}, nil, func(c Config) bool { return c.ArenaCapacity == 512<<20 && c.MaxBody == 2048 }},
		{"plugins none", []string{"--plugins", ""}, nil, func(c Config) bool { return c.Plugins() == "" }},
		{"arena backend from env", nil, map[string]string{"ARENAHOST_ARENA_BACKEND": "cuda-sim", "ARENAHOST_ARENA_DEVICE": "2"},
			func(c Config) bool { return c.ArenaBackend == "cuda-sim" && c.ArenaDevice == 2 }},
		{"factor dtype from env", nil, map[string]string{"ARENAHOST_LORA_FACTOR_DTYPE": "bf16"}, func(c Config) bool { return c.LoRAFactorDType == "bf16" }},
		{"arena backend flag beats env", []string{"--arena-backend", "cuda", "--arena-device", "1"}, map[string]string{"ARENAHOST_ARENA_BACKEND": "cuda-sim"},
			func(c Config) bool { return c.ArenaBackend == "cuda" && c.ArenaDevice == 1 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := resolve(t, tt.args, tt.env)
			if err != nil {
				t.Fatal(err)
			}
			if !tt.want(c) {
				t.Fatalf("resolved %+v", c)
			}
		})
	}
}

func TestErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.json")
	os.WriteFile(bad, []byte(`{"lisen": "x"}`), 0o644)
	notJSON := filepath.Join(dir, "nj.json")
	os.WriteFile(notJSON, []byte(`listen = 1`), 0o644)
	badVal := filepath.Join(dir, "bv.json")
	os.WriteFile(badVal, []byte(`{"arena_capacity": "lots"}`), 0o644)
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"non-loopback without token", []string{"--listen", "0.0.0.0:7860"}, nil, "set --token or ARENAHOST_TOKEN"},
		{"empty host without token", []string{"--listen", ":7860"}, nil, "requires a token"},
		{"unknown file key", []string{"--config", bad}, nil, `key "lisen": unknown setting`},
		{"not json", []string{"--config", notJSON}, nil, "one JSON object"},
		{"bad file value", []string{"--config", badVal}, nil, `key "arena_capacity": "lots" is not a size`},
		{"missing file", []string{"--config", filepath.Join(dir, "nope.json")}, nil, "no such file"},
		{"bad env", nil, map[string]string{"ARENAHOST_READ_TIMEOUT": "soon"}, "environment ARENAHOST_READ_TIMEOUT"},
		{"bad flag", []string{"--shm", "tmpfs"}, nil, `"tmpfs" is not memfd or shm`},
		{"bad listen", []string{"--listen", "7860"}, nil, "use HOST:PORT"},
		{"bad arena backend", []string{"--arena-backend", "rocm"}, nil, `"rocm" is not cpu, cuda or cuda-sim`},
		{"bad factor dtype", []string{"--lora-factor-dtype", "f16"}, nil, `factor_dtype "f16": want "f32" or "bf16"`},
		{"whitespace token", []string{"--token", "   "}, nil, "must not be blank"},
		{"whitespace token from env", []string{"--listen", "0.0.0.0:7860"}, map[string]string{"ARENAHOST_TOKEN": "\t"}, "must not be blank"},
		{"padded token", []string{"--token", " secret "}, nil, "start or end with whitespace"},
		{"bad allowed host", []string{"--allowed-hosts", "http://evil.example/"}, nil, "is not a host name"},
		{"zero images", []string{"--max-images", "0"}, nil, "not a count from 1 to 1000"},
		{"negative device", nil, map[string]string{"ARENAHOST_ARENA_DEVICE": "-1"}, `environment ARENAHOST_ARENA_DEVICE: "-1" is not a device ordinal`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := resolve(t, tt.args, tt.env)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error is not one line: %q", err)
			}
		})
	}
	if _, err := resolve(t, []string{"--listen", "[::]:1"}, nil); !errors.Is(err, ErrNeedToken) {
		t.Fatalf("[::]: err = %v", err)
	}
}

func TestAllowedHosts(t *testing.T) {
	c, err := resolve(t, []string{"--allowed-hosts", " arenahost.lan, ,proxy.lan:8443 "}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.AllowedHostList(); !slices.Equal(got, []string{"arenahost.lan", "proxy.lan:8443"}) {
		t.Fatalf("allowed hosts %q", got)
	}
}

func TestIsLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:7860": true, "localhost:1": true, "[::1]:80": true, "127.1.2.3:0": true,
		"0.0.0.0:7860": false, ":7860": false, "[::]:7860": false, "192.168.1.2:80": false, "example.com:80": false, "garbage": false,
	} {
		if got := IsLoopback(addr); got != want {
			t.Errorf("IsLoopback(%q) = %v, want %v", addr, got, want)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"0": 0, "10": 10, "1KiB": 1024, "8GiB": 8 << 30, "2 MiB": 2 << 20, "3MB": 3e6, "7B": 7} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "x", "-1", "1.5GiB", "99999999999TiB"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q): no error", in)
		}
	}
}

// TestDoc keeps docs/config.md identical to the settings table.
func TestDoc(t *testing.T) {
	path := filepath.Join("..", "..", "docs", "config.md")
	want := Doc()
	if *update {
		if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./host/config -run TestDoc -update)", err)
	}
	if string(got) != want {
		t.Fatalf("docs/config.md is out of date with host/config: run go test ./host/config -run TestDoc -update")
	}
	for _, n := range Names() {
		if !strings.Contains(string(got), "`--"+n+"`") {
			t.Errorf("docs/config.md lacks --%s", n)
		}
	}
}

func TestInterpreter(t *testing.T) {
	tests := []struct {
		name, python, want string
	}{
		{"explicit", "/opt/py/bin/python3", "/opt/py/bin/python3"},
		{"empty means none", "", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := (Config{Python: tc.python}).Interpreter(); got != tc.want {
				t.Fatalf("Interpreter() = %q, want %q", got, tc.want)
			}
		})
	}
	// auto finds an interpreter on this machine (python3 on PATH at least).
	if got := (Config{Python: Auto}).Interpreter(); got == "" || !filepath.IsAbs(got) {
		t.Fatalf("auto Interpreter() = %q, want an absolute path", got)
	}
}
