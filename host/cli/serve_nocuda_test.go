//go:build !cuda

package cli

import (
	"context"
	"io"
	"strings"
	"testing"
)

// TestServeCUDAWithoutCUDA: the default build refuses the cuda arena with
// a pointer to the CUDA build.
func TestServeCUDAWithoutCUDA(t *testing.T) {
	err := Run(context.Background(), []string{"serve", "--listen", "127.0.0.1:0", "--data", t.TempDir(), "--plugins", "", "--arena-backend", "cuda"}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "built without CUDA; build bin/cuda/arenahost with make cuda") {
		t.Fatalf("serve --arena-backend cuda: %v", err)
	}
}
