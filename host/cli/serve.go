package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/arenahost/arenahost/host/api"
	"github.com/arenahost/arenahost/host/server"
)

func init() {
	register(&command{
		name:    "serve",
		summary: "start the host: arena, plugins, sample model, HTTP API",
		usage:   "arenahost serve [flags]",
		example: "arenahost serve --listen 127.0.0.1:7860 --data ./arenahost-data",
		run:     runServe,
	})
}

func runServe(ctx context.Context, env *Env, args []string) error {
	c := commands["serve"]
	fs := newFlags(c, env)
	listen := fs.String("listen", "127.0.0.1:7860", "address the HTTP API listens on")
	data := fs.String("data", "arenahost-data", "data directory: models/, loras/ and the samples written on first run")
	plugins := fs.String("plugins", defaultPluginsDir(), "plugins directory (DIR/NAME/plugin.json); empty for none")
	capacity := fs.Uint64("arena-capacity", server.DefaultArenaCapacity, "arena capacity in bytes")
	shm := fs.String("shm", "memfd", "shared-memory kind: memfd (nothing can outlive the host) or shm (/dev/shm files)")
	samples := fs.Bool("samples", true, "write the sample model on first run and load it")
	if done, err := parse(fs, args); done {
		return err
	}
	log := slog.New(slog.NewTextHandler(env.Stderr, nil))
	pluginEnv := map[string]string{}
	if py := os.Getenv("ARENAHOST_PYTHON"); py != "" {
		pluginEnv["ARENAHOST_PYTHON"] = py
	}
	s, err := server.New(ctx, server.Config{DataDir: *data, PluginsDir: *plugins, ArenaCapacity: *capacity,
		ShmMode: *shm, Samples: *samples, PluginEnv: pluginEnv, Logger: log})
	if err != nil {
		return fmt.Errorf("start host: %w", err)
	}
	defer s.Close(context.WithoutCancel(ctx))

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w (is another arenahost running? pick another address with --listen)", *listen, err)
	}
	srv := &http.Server{Handler: api.New(s, log), ReadHeaderTimeout: 10 * time.Second}
	fmt.Fprintf(env.Stdout, "arenahost listening on http://%s/\n", ln.Addr())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
		log.Info("shutting down")
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("serve http: %w", err)
	}
}

// defaultPluginsDir is bin/plugins next to the arenahost binary, where
// `make build` puts them, when that directory exists.
func defaultPluginsDir() string {
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
