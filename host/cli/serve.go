package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"
)

func init() {
	register(&command{
		name:    "serve",
		summary: "start the host: arena, plugins, HTTP API and web console",
		usage:   "arenahost serve [flags]",
		example: "arenahost serve --listen 127.0.0.1:7860",
		run:     runServe,
	})
}

func runServe(ctx context.Context, env *Env, args []string) error {
	c := commands["serve"]
	fs := newFlags(c, env)
	listen := fs.String("listen", "127.0.0.1:7860", "address the HTTP API listens on")
	if done, err := parse(fs, args); done {
		return err
	}
	log := slog.New(slog.NewTextHandler(env.Stderr, nil))

	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/health", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintln(w, `{"status":"ok"}`)
	})
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w (is another arenahost running? pick another address with --listen)", *listen, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
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
