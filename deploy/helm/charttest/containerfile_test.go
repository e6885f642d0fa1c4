package charttest

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// instruction is one Containerfile instruction, continuation lines joined.
type instruction struct {
	line int
	op   string // upper case: FROM, RUN, ...
	args string
}

func parseContainerfile(t *testing.T, path string) []instruction {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []instruction
	var cur strings.Builder
	start := 0
	for i, l := range strings.Split(string(b), "\n") {
		trim := strings.TrimSpace(l)
		if cur.Len() == 0 && (trim == "" || strings.HasPrefix(trim, "#")) {
			continue
		}
		if strings.HasPrefix(trim, "#") {
			continue // a comment inside a continued instruction
		}
		if cur.Len() == 0 {
			start = i + 1
		}
		cont := strings.HasSuffix(trim, "\\")
		cur.WriteString(strings.TrimSuffix(trim, "\\") + " ")
		if !cont {
			op, args, _ := strings.Cut(strings.TrimSpace(cur.String()), " ")
			out = append(out, instruction{line: start, op: strings.ToUpper(op), args: strings.TrimSpace(args)})
			cur.Reset()
		}
	}
	return out
}

// TestContainerfileChecklist checks what hadolint (make test-deploy runs it)
// does not know we promise: a multi-stage build from pinned bases, a
// non-root final stage, the data directory as a volume, a health check,
// `arenahost serve` as entrypoint, no secret baked in.
func TestContainerfileChecklist(t *testing.T) {
	ins := parseContainerfile(t, "../../image/Containerfile")
	args := map[string]string{} // ARG defaults before the first FROM
	var froms []instruction
	var final []instruction // instructions of the last stage
	for _, in := range ins {
		switch in.op {
		case "ARG":
			if len(froms) == 0 {
				k, v, _ := strings.Cut(in.args, "=")
				args[k] = v
			}
		case "FROM":
			froms = append(froms, in)
			final = nil
		case "ADD":
			t.Errorf("line %d: ADD %s (use COPY; never fetch URLs into the image)", in.line, in.args)
		}
		final = append(final, in)
	}
	if len(froms) < 2 {
		t.Fatalf("%d stages, want a multi-stage build (Go build, then the runtime)", len(froms))
	}
	pinned := regexp.MustCompile(`^[a-z0-9./_-]+(:[A-Za-z0-9._-]*[0-9][A-Za-z0-9._-]*|@sha256:[0-9a-f]{64})$`)
	for _, f := range froms {
		image := strings.Fields(f.args)[0]
		if m := regexp.MustCompile(`^\$\{?([A-Z_]+)\}?$`).FindStringSubmatch(image); m != nil {
			image = args[m[1]]
		}
		if !pinned.MatchString(image) || strings.HasSuffix(image, ":latest") {
			t.Errorf("line %d: base image %q is not pinned to a versioned tag or a digest", f.line, image)
		}
	}
	var user, health, entry, cmd string
	var volumes, env []string
	copiedFromBuild := false
	for _, in := range final {
		switch in.op {
		case "USER":
			user = in.args
		case "HEALTHCHECK":
			health = in.args
		case "ENTRYPOINT":
			entry = in.args
		case "CMD":
			cmd = in.args
		case "VOLUME":
			volumes = append(volumes, in.args)
		case "ENV":
			env = append(env, in.args)
		case "COPY":
			if strings.Contains(in.args, "--from=build") {
				copiedFromBuild = true
			}
		}
	}
	if u, _, _ := strings.Cut(user, ":"); u == "" || u == "0" || u == "root" {
		t.Errorf("final stage USER %q, want a non-root user", user)
	}
	if !regexp.MustCompile(`^[1-9][0-9]*:[1-9][0-9]*$`).MatchString(user) {
		t.Errorf("final stage USER %q, want numeric UID:GID (runAsNonRoot can verify only a number)", user)
	}
	if !strings.Contains(health, `CMD ["arenahost-fleet", "health"]`) {
		t.Errorf("HEALTHCHECK %q, want the exec form of arenahost-fleet health (GET /v1/health)", health)
	}
	if entry != `["arenahost"]` || cmd != `["serve"]` {
		t.Errorf("ENTRYPOINT %s CMD %s, want [\"arenahost\"] [\"serve\"]", entry, cmd)
	}
	if strings.Join(volumes, " ") != `["/data"]` {
		t.Errorf("VOLUME %v, want [\"/data\"]", volumes)
	}
	allEnv := strings.Join(env, " ")
	for _, want := range []string{"ARENAHOST_DATA=/data", "ARENAHOST_LISTEN=0.0.0.0:7860", "PYTHONDONTWRITEBYTECODE=1"} {
		if !strings.Contains(allEnv, want) {
			t.Errorf("final stage ENV lacks %s", want)
		}
	}
	if strings.Contains(allEnv, "ARENAHOST_TOKEN") {
		t.Error("the image sets ARENAHOST_TOKEN: a token belongs in a Secret, not in a layer")
	}
	if !copiedFromBuild {
		t.Error("the runtime stage copies nothing from the build stage")
	}
}
