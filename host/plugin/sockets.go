package plugin

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// cleanDeadSockets removes, from dir, the go-plugin sockets nobody listens
// on any more and returns how many it removed. go-plugin's client side (the
// broker a Go plugin dials the Host service through) creates its sockets as
// dir/plugin<digits>, outside any directory the host owns, so a SIGKILLed
// host leaves them behind. Only sockets of this user with that name are
// considered, and only those whose connect is refused (no process listens:
// nobody can ever use them) are removed.
func cleanDeadSockets(dir string) int {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		digits, ok := strings.CutPrefix(e.Name(), "plugin")
		if !ok || digits == "" || strings.Trim(digits, "0123456789") != "" || e.Type()&os.ModeSocket == 0 {
			continue
		}
		path := filepath.Join(dir, e.Name())
		info, err := e.Info()
		if err != nil {
			continue
		}
		if st, ok := info.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != os.Getuid() {
			continue
		}
		c, err := net.DialTimeout("unix", path, 100*time.Millisecond)
		if err == nil {
			_ = c.Close()
			continue
		}
		if errors.Is(err, syscall.ECONNREFUSED) && os.Remove(path) == nil {
			n++
		}
	}
	return n
}
