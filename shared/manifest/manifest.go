// Package manifest owns plugin.json, the contract between a plugin's
// folder and the host: its fields, their validation (errors name the file
// and the field), which methods a manifest makes public, and discovery of
// every DIR/*/plugin.json. The host reads manifests with it; plugin authors
// and tools may check theirs with the same code.
package manifest

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/arenahost/arenahost/shared/wire"
)

// File is the name of the manifest in each plugin's directory.
const File = "plugin.json"

// Kinds a manifest may declare. Other kinds are accepted (the host only
// treats these specially); they must still be lower-case identifiers.
const (
	KindLoRA     = "lora"
	KindPreview  = "preview"
	KindPipeline = "pipeline"
)

// Languages with special treatment. LanguageGo plugins get go-plugin's
// AutoMTLS and dial the Host service through go-plugin's broker; every
// other language is started without TLS and reaches the Host service on the
// unix socket named in ARENAHOST_HOST_ADDR.
const (
	LanguageGo     = "go"
	LanguagePython = "python"
)

// Manifest is one plugin's plugin.json.
//
// Example (a Go plugin built next to its manifest):
//
//	{"name": "lora-nf4", "version": "0.1.0", "kind": "lora", "language": "go",
//	 "command": "./lora-nf4", "protocol_version": 1,
//	 "sha256": "9f86d0…"}
//
// Example (a Python plugin):
//
//	{"name": "echo-py", "version": "0.1.0", "kind": "other", "language": "python",
//	 "command": "${ARENAHOST_PYTHON}", "args": ["-u", "plugin.py"], "protocol_version": 1}
//
// command and args may use ${VAR} references, expanded from the host's
// plugin environment (host/plugin's Config.Env) first and the host's environment second; an undefined variable is an
// error naming it. After expansion a relative command is resolved against
// the manifest's directory (there is no PATH lookup: name interpreters by
// absolute path or through a variable such as ${ARENAHOST_PYTHON}). The
// plugin runs with the manifest's directory as its working directory, so
// relative args such as "plugin.py" name files next to the manifest.
//
// sha256, when present, is the hex SHA-256 of the file that command
// resolves to; go-plugin checks it (SecureConfig) before every start. For an
// interpreted plugin that is the interpreter, so pin the script through
// hot-swap review instead.
//
// requires, when present, is what the plugin needs from its environment
// (see Requires); a plugin whose needs are not met is not started and is
// listed as unavailable with the reason.
type Manifest struct {
	Name            string   `json:"name"`
	Version         string   `json:"version"`
	Kind            string   `json:"kind"`
	Language        string   `json:"language"`
	Command         string   `json:"command"`
	Args            []string `json:"args,omitempty"`
	ProtocolVersion uint     `json:"protocol_version"`
	SHA256          string   `json:"sha256,omitempty"`
	// PublicMethods are the methods HTTP clients may run as jobs (POST
	// /v1/jobs). Only a plugin of kind "pipeline" has any: when the field
	// is absent there it means ["run"]; any other kind must leave it out.
	// Every other method is reachable only from the host itself (the LoRA
	// coordinator, the preview renderer, warm-up checks).
	PublicMethods []string `json:"public_methods,omitempty"`
	// Requires is what the plugin needs to run; nil: nothing checked.
	Requires *Requires `json:"requires,omitempty"`

	// Path is the manifest file the fields were read from (not in JSON).
	Path string `json:"-"`
}

// Public reports whether HTTP clients may run method as a job: it is one of
// PublicMethods, or "run" on a pipeline that declares none.
func (m *Manifest) Public(method string) bool {
	if m.Kind != KindPipeline {
		return false
	}
	if len(m.PublicMethods) == 0 {
		return method == DefaultPublicMethod
	}
	return slices.Contains(m.PublicMethods, method)
}

// DefaultPublicMethod is the one public method of a pipeline whose manifest
// lists none.
const DefaultPublicMethod = "run"

// Requires is a manifest's "requires": what must hold before the plugin is
// started. The host checks it before every start (Load, swap, reload) and
// marks a plugin whose needs are not met unavailable, naming what is
// missing, instead of starting it.
//
// Example (a Python pipeline that needs torch and diffusers):
//
//	"requires": {"python_modules": ["arenahost", "grpc", "numpy", "torch", "diffusers"]}
type Requires struct {
	// PythonModules are modules the plugin's interpreter (its resolved
	// command) must find with importlib.util.find_spec; only for
	// language "python". Nothing is imported, so the check is quick even
	// for torch.
	PythonModules []string `json:"python_modules,omitempty"`
}

// Dir is the manifest's directory: the plugin's working directory and the
// base for a relative command.
func (m *Manifest) Dir() string { return filepath.Dir(m.Path) }

var (
	nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)
	// pyModuleRE is a dotted Python module name.
	pyModuleRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,99}(\.[A-Za-z_][A-Za-z0-9_]{0,99}){0,7}$`)
	kindRE     = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,31}$`)
)

// Parse reads and validates the manifest at path. Unknown fields,
// missing required fields and bad values are errors naming the file and the
// field.
func Parse(path string) (*Manifest, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read manifest: %w", err)
	}
	m, err := Decode(data)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", path, err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", path, err)
	}
	m.Path = abs
	return m, nil
}

// Decode parses and validates a manifest's bytes (Path is left empty).
func Decode(data []byte) (*Manifest, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var m Manifest
	if err := dec.Decode(&m); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return nil, fmt.Errorf("field %s: %s is not a valid %s", te.Field, te.Value, te.Type)
		}
		// Unknown fields come back as `json: unknown field "x"`.
		return nil, fmt.Errorf("decode: %w", err)
	}
	if dec.More() {
		return nil, errors.New("decode: trailing data after the JSON object")
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("decode: trailing data after the JSON object")
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return &m, nil
}

// Validate checks every field: required ones present, names and kinds
// lower-case identifiers, the protocol version this build speaks, public
// methods only on pipelines, requirements only where they can be checked.
func (m *Manifest) Validate() error {
	switch {
	case m.Name == "":
		return errors.New("field name: required")
	case !nameRE.MatchString(m.Name):
		return fmt.Errorf("field name: %q must be 1-64 of [a-z0-9._-], starting with a letter or digit", m.Name)
	case m.Version == "":
		return errors.New("field version: required")
	case m.Kind == "":
		return fmt.Errorf("field kind: required (%s, %s, %s or another lower-case kind)", KindLoRA, KindPreview, KindPipeline)
	case !kindRE.MatchString(m.Kind):
		return fmt.Errorf("field kind: %q is not a lower-case identifier", m.Kind)
	case m.Language == "":
		return fmt.Errorf("field language: required (%s, %s, …)", LanguageGo, LanguagePython)
	case !kindRE.MatchString(m.Language):
		return fmt.Errorf("field language: %q is not a lower-case identifier", m.Language)
	case strings.TrimSpace(m.Command) == "":
		return errors.New("field command: required")
	case m.ProtocolVersion == 0:
		return fmt.Errorf("field protocol_version: required (this host speaks %d)", wire.ProtocolVersion)
	case m.ProtocolVersion != wire.ProtocolVersion:
		return fmt.Errorf("field protocol_version: plugin speaks protocol %d but this host speaks %d", m.ProtocolVersion, wire.ProtocolVersion)
	}
	if len(m.PublicMethods) > 0 && m.Kind != KindPipeline {
		return fmt.Errorf("field public_methods: only a plugin of kind %q may declare public methods (this one is %q)", KindPipeline, m.Kind)
	}
	for i, pm := range m.PublicMethods {
		if strings.TrimSpace(pm) == "" || pm != strings.TrimSpace(pm) {
			return fmt.Errorf("field public_methods[%d]: %q is not a method name", i, pm)
		}
	}
	if m.SHA256 != "" {
		b, err := hex.DecodeString(m.SHA256)
		if err != nil || len(b) != 32 {
			return fmt.Errorf("field sha256: %q is not 64 hex digits", m.SHA256)
		}
	}
	if r := m.Requires; r != nil {
		if len(r.PythonModules) > 0 && m.Language != LanguagePython {
			return fmt.Errorf("field requires.python_modules: only for language %q, this plugin is %q", LanguagePython, m.Language)
		}
		if len(r.PythonModules) > 64 {
			return fmt.Errorf("field requires.python_modules: %d modules, at most 64", len(r.PythonModules))
		}
		for i, mod := range r.PythonModules {
			if !pyModuleRE.MatchString(mod) {
				return fmt.Errorf("field requires.python_modules[%d]: %q is not a Python module name", i, mod)
			}
		}
	}
	return nil
}

// Discover reads every DIR/*/plugin.json under dir. It returns the valid
// manifests sorted by name, and one error per invalid or duplicate manifest
// (joined): one broken plugin does not hide the others.
func Discover(dir string) ([]*Manifest, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("discover plugins: %w", err)
	}
	var (
		out  []*Manifest
		errs []error
		seen = map[string]string{}
	)
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		path := filepath.Join(dir, e.Name(), File)
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			continue
		}
		m, err := Parse(path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if prev, dup := seen[m.Name]; dup {
			errs = append(errs, fmt.Errorf("manifest %s: field name: %q already declared by %s", path, m.Name, prev))
			continue
		}
		seen[m.Name] = path
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, errors.Join(errs...)
}
