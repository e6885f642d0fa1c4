package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/sdk/plugintest"
)

// threadNices reads the nice value of every thread of pid (field 19 of
// /proc/PID/task/TID/stat, after the parenthesised command name).
func threadNices(t *testing.T, pid int) map[string]int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, tk := range tasks {
		b, err := os.ReadFile(dir + "/" + tk.Name() + "/stat")
		if err != nil {
			continue // the thread exited
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		n, err := strconv.Atoi(f[16])
		if err != nil {
			t.Fatalf("thread %s: stat %q: %v", tk.Name(), b, err)
		}
		out[tk.Name()] = n
	}
	return out
}

func TestRendersAtLowerPriority(t *testing.T) {
	tests := []struct {
		name string
		env  []string
		want int
	}{
		{"default", nil, DefaultNice},
		{"configured", []string{EnvNice + "=5"}, 5},
		{"off", []string{EnvNice + "=0"}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := plugintest.Start(t, plugintest.Config{Cmd: []string{build(t)}, Env: tc.env})
			// Exercise the plugin so the runtime has started its threads.
			if err := p.Ping(); err != nil {
				t.Fatal(err)
			}
			nices := threadNices(t, p.PID)
			if len(nices) < 2 {
				t.Fatalf("only %d threads", len(nices))
			}
			for tid, n := range nices {
				if n != tc.want {
					t.Errorf("thread %s: nice %d, want %d (all: %v)", tid, n, tc.want, nices)
				}
			}
		})
	}
}
