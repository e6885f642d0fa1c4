package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/arenahost/arenahost/host/api"
	"github.com/arenahost/arenahost/host/config"
	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/shared/cpuprofile"
)

func init() {
	register(&command{
		name:    "serve",
		summary: "start the host: arena, plugins, sample model, HTTP API and web console",
		usage:   "arenahost serve [flags]   (settings: docs/config.md; flags beat ARENAHOST_* variables, which beat --config FILE)",
		example: "arenahost serve\narenahost serve --listen 0.0.0.0:7860 --token \"$(openssl rand -hex 16)\" --data /srv/arenahost",
		run:     runServe,
	})
}

func runServe(ctx context.Context, env *Env, args []string) error {
	c := commands["serve"]
	fs := newFlags(c, env)
	flags := config.Bind(fs)
	pos, done, err := parse(fs, args)
	if done {
		return err
	}
	if len(pos) > 0 {
		return usagef("takes no positional arguments, got %q (settings are flags: see --help)", pos)
	}
	cfg, err := flags.Resolve(os.LookupEnv)
	if err != nil {
		return fmt.Errorf("configure serve: %w", err)
	}
	stopProfile, err := cpuprofile.Start("arenahost")
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	defer stopProfile()
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	log := slog.New(slog.NewTextHandler(env.Stderr, &slog.HandlerOptions{Level: level}))

	// Listen first: a busy port fails fast, before the arena is built.
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w (is another arenahost running? pick another address with --listen)", cfg.Listen, err)
	}
	defer ln.Close()

	pluginEnv := map[string]string{}
	if py := cfg.Interpreter(); py != "" {
		pluginEnv["ARENAHOST_PYTHON"] = py
	}
	s, err := server.New(ctx, server.Config{
		DataDir: cfg.DataDir, ModelsDir: cfg.Models(), LoRAsDir: cfg.LoRAs(), PluginsDir: cfg.Plugins(),
		ArenaCapacity: cfg.ArenaCapacity, ArenaSegment: cfg.ArenaSegment, ShmMode: cfg.Shm, Samples: cfg.Samples,
		ArenaBackend: cfg.ArenaBackend, ArenaDevice: cfg.ArenaDevice, LoRAJournalMemory: journalMemory(cfg.LoRAJournalMemory),
		LoRAJournalArena: int64(cfg.LoRAJournalArena),
		LoRAFactorDType:  cfg.LoRAFactorDType,
		PluginEnv:        pluginEnv, Logger: log,
		LoadProgress: func(label string, total int64, done func() int64) func() {
			return StartProgress(env.Stderr, label, total, done)
		},
	})
	if err != nil {
		return fmt.Errorf("start host: %w", err)
	}
	defer s.Close(context.WithoutCancel(ctx))

	handler := api.NewWithOptions(apiBackend(s), log, api.Options{Token: cfg.Token, MaxBody: cfg.MaxBody, WriteTimeout: cfg.WriteTimeout, Pipeline: cfg.Pipeline,
		AllowedHosts: cfg.AllowedHostList(), Listen: ln.Addr().String(), MaxImages: cfg.MaxImages, ComfyFrontend: cfg.FrontendDir()})
	defer handler.Close()
	srv := api.HTTPServer(handler, api.Limits{ReadHeaderTimeout: cfg.ReadHeaderTimeout, ReadTimeout: cfg.ReadTimeout, IdleTimeout: cfg.IdleTimeout})
	srv.ErrorLog = slog.NewLogLogger(log.Handler(), slog.LevelWarn)
	fmt.Fprintf(env.Stdout, "arenahost console: %s\n", consoleURL(ln.Addr()))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
		log.Info("shutting down")
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("shut down http: %w", err)
		}
		return nil
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("serve http: %w", err)
	}
}

// consoleURL is the URL a browser on this machine opens for addr: an
// unspecified address (0.0.0.0, ::) is reachable as 127.0.0.1.
func consoleURL(addr net.Addr) string {
	host, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return "http://" + addr.String() + "/"
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return "http://" + host + ":" + port + "/"
}

// apiBackend hands the HTTP layer the server's parts, each behind the small
// interface host/api declares for it.
func apiBackend(s *server.Server) api.Backend {
	cfg := s.Config()
	b := api.Backend{Host: s, Arena: s.Arena, Registry: s.Registry, Plugins: s.Plugins, Jobs: s.Jobs,
		DataDir: cfg.DataDir, ModelsDir: cfg.ModelsDir, LoRAsDir: cfg.LoRAsDir}
	if s.LoRAs != nil { // a nil *lora.Coordinator must stay a nil interface
		b.LoRAs = s.LoRAs
	}
	return b
}

// journalMemory maps the lora-journal-memory setting (-1 auto, 0 none, a
// byte budget) onto server.Config's (0 auto, negative none).
func journalMemory(n int64) int64 {
	switch {
	case n < 0:
		return 0
	case n == 0:
		return -1
	}
	return n
}
