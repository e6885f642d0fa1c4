package safetensors

import (
	"errors"
	"math"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestOpenRefusesSpecialFiles: a FIFO, a device, a socket, a directory, a
// symlink loop and an over-long name are ErrBadPath within milliseconds,
// never a blocking open.
func TestOpenRefusesSpecialFiles(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.safetensors")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.safetensors")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	loop := filepath.Join(dir, "loop.safetensors")
	if err := os.Symlink(loop, loop); err != nil {
		t.Fatal(err)
	}
	long := filepath.Join(dir, strings.Repeat("a", 5000)+".safetensors")
	for _, tc := range []struct{ name, path, want string }{
		{"fifo", fifo, "FIFO"},
		{"device", "/dev/null", "character device"},
		{"socket", sock, ""},
		{"directory", dir, "directory"},
		{"symlink loop", loop, "too many levels"},
		{"long name", long, "file name too long"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			done := make(chan error, 1)
			go func() {
				_, err := Open(tc.path)
				done <- err
			}()
			select {
			case err := <-done:
				if !errors.Is(err, ErrBadPath) || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("Open(%s): %v, want ErrBadPath mentioning %q", tc.name, err, tc.want)
				}
				if !strings.Contains(err.Error(), filepath.Base(tc.path)[:min(len(filepath.Base(tc.path)), 20)]) {
					t.Fatalf("Open(%s): %v does not name the path", tc.name, err)
				}
			case <-time.After(2 * time.Second):
				t.Fatalf("Open(%s) blocked", tc.name)
			}
		})
	}
}

func TestFirstNonFinite(t *testing.T) {
	f32 := func(v ...float32) []byte {
		b := make([]byte, 4*len(v))
		for i, x := range v {
			u := math.Float32bits(x)
			b[4*i], b[4*i+1], b[4*i+2], b[4*i+3] = byte(u), byte(u>>8), byte(u>>16), byte(u>>24)
		}
		return b
	}
	inf := float32(math.Inf(1))
	for _, tc := range []struct {
		name string
		dt   DType
		data []byte
		want int
	}{
		{"f32 finite", F32, f32(1, -2, math.MaxFloat32), -1},
		{"f32 nan", F32, f32(1, float32(math.NaN())), 1},
		{"f32 -inf", F32, f32(-inf), 0},
		{"bf16 finite 3e38", BF16, []byte{0x62, 0x7f}, -1},
		{"bf16 inf", BF16, []byte{0, 0, 0x80, 0x7f}, 1},
		{"f16 nan", F16, []byte{0x01, 0x7c}, 0},
		{"f16 max", F16, []byte{0xff, 0x7b}, -1},
		{"u8 ignored", U8, []byte{0xff, 0xff}, -1},
	} {
		if got, _ := FirstNonFinite(tc.dt, tc.data); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
}
