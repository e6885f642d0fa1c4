package api_test

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/lora/lorawire"
)

// TestModesAreLoraWires: the modes spelled out here are the LoRA plugin's.
func TestModesAreLoraWires(t *testing.T) {
	if api.ModeSide != lorawire.ModeSide || api.ModeFuse != lorawire.ModeFuse {
		t.Errorf("modes %q/%q here, %q/%q in lorawire", api.ModeSide, api.ModeFuse, lorawire.ModeSide, lorawire.ModeFuse)
	}
}

// TestBuildsEverywhere: sdk/api and sdk/client are for anyone to import,
// so they cross-compile for Windows and macOS, and the client pulls no
// gRPC (sdk/client/tensors, which answers protobuf, is apart).
func TestBuildsEverywhere(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go tool on PATH")
	}
	root := testenv.RepoRoot(t)
	run := func(goos string, args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(t.Context(), goTool, args...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "GOOS="+goos, "GOARCH=amd64", "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("GOOS=%s go %s: %v\n%s", goos, strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	for _, goos := range []string{"windows", "darwin", "linux"} {
		run(goos, "build", "./sdk/api", "./sdk/client")
		for _, dep := range strings.Fields(run(goos, "list", "-deps", "./sdk/client")) {
			if strings.HasPrefix(dep, "google.golang.org/grpc") || strings.HasPrefix(dep, "google.golang.org/protobuf") {
				t.Errorf("GOOS=%s: sdk/client depends on %s", goos, dep)
			}
		}
	}
}
