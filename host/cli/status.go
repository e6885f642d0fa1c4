package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/sdk/client"
)

func init() {
	register(&command{
		name:    "status",
		summary: "show a running host's arena, models with their LoRAs, plugins and jobs (through its HTTP API)",
		usage:   "arenahost status [--host URL] [--json]",
		example: "arenahost status --host http://127.0.0.1:7860   (ARENAHOST_URL sets the default)",
		run:     runStatus,
	})
}

// Status is what `arenahost status --json` prints: the host's own answers,
// as sdk/api types.
type Status struct {
	Host    string                   `json:"host"`
	Arena   api.ArenaStats           `json:"arena"`
	Models  []api.ModelInfo          `json:"models"`
	LoRAs   map[string]api.LoRAState `json:"loras"` // by model, only models holding LoRAs
	Plugins []api.PluginStatus       `json:"plugins"`
	Jobs    []api.Job                `json:"jobs"`
}

func runStatus(ctx context.Context, env *Env, args []string) error {
	fs := newFlags(commands["status"], env)
	def := os.Getenv("ARENAHOST_URL")
	if def == "" {
		def = "http://127.0.0.1:7860"
	}
	host := fs.String("host", def, "the host's address (its console URL)")
	asJSON := fs.Bool("json", false, "print JSON (sdk/api types) instead of text")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for the host's answers")
	pos, done, err := parse(fs, args)
	if done {
		return err
	}
	if len(pos) > 0 {
		return usagef("takes no positional arguments, got %q (name the host with --host URL)", pos)
	}
	c, err := client.New(*host)
	if err != nil {
		return usagef("--host %q: want http://HOST:PORT (the console URL serve prints)", *host)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	st := Status{Host: c.BaseURL(), LoRAs: map[string]api.LoRAState{}}
	if st.Arena, err = c.Arena(ctx); err != nil {
		return fmt.Errorf("status: %w", err)
	}
	if st.Models, err = c.Models(ctx); err != nil {
		return fmt.Errorf("status: %w", err)
	}
	for _, m := range st.Models {
		ls, err := c.LoRAState(ctx, m.Name)
		if client.ErrorCode(err) == "no_lora_engine" {
			break
		}
		if err != nil {
			return fmt.Errorf("status: %w", err)
		}
		if len(ls.LoRAs) > 0 {
			st.LoRAs[m.Name] = *ls
		}
	}
	if st.Plugins, err = c.Plugins(ctx); err != nil {
		return fmt.Errorf("status: %w", err)
	}
	if st.Jobs, err = c.Jobs(ctx); err != nil {
		return fmt.Errorf("status: %w", err)
	}
	if *asJSON {
		b, err := json.MarshalIndent(st, "", "  ")
		if err != nil {
			return fmt.Errorf("status: %w", err)
		}
		_, err = fmt.Fprintf(env.Stdout, "%s\n", b)
		return err
	}
	w := env.Stdout
	fmt.Fprintf(w, "host %s\n", st.Host)
	fmt.Fprintf(w, "arena %s: %s of %s allocated (peak %s), %d regions\n", st.Arena.Backend,
		human(int64(st.Arena.Allocated)), human(int64(st.Arena.Capacity)), human(int64(st.Arena.Peak)), st.Arena.Regions)
	for _, m := range st.Models {
		fmt.Fprintf(w, "model %s: %s %s, %d weights, %s", m.Name, m.Format, m.Layout, m.Weights, human(int64(m.Bytes)))
		if ls, ok := st.LoRAs[m.Name]; ok {
			var names []string
			for _, l := range ls.LoRAs {
				names = append(names, fmt.Sprintf("%s:%g", l.Name, l.Strength))
			}
			fmt.Fprintf(w, "; LoRAs (%s) %s", ls.Mode, strings.Join(names, ", "))
		}
		fmt.Fprintln(w)
	}
	for _, p := range st.Plugins {
		fmt.Fprintf(w, "plugin %s (%s): %s", p.Name, p.Kind, p.State)
		if p.Generation > 0 {
			fmt.Fprintf(w, ", generation %d", p.Generation)
		}
		if p.LastError != "" {
			fmt.Fprintf(w, "; last error: %s", firstLine(p.LastError))
		}
		fmt.Fprintln(w)
	}
	counts := map[api.JobState]int{}
	for _, j := range st.Jobs {
		counts[j.State]++
	}
	fmt.Fprintf(w, "jobs: %d running, %d queued, %d done, %d failed, %d cancelled\n",
		counts[api.JobRunning], counts[api.JobQueued], counts[api.JobDone], counts[api.JobFailed], counts[api.JobCancelled])
	return nil
}

// firstLine is s up to its first newline.
func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}
