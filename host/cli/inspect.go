package cli

import (
	"context"
	"fmt"

	"github.com/arenahost/arenahost/host/inspect"
)

func init() {
	register(&command{
		name:    "inspect",
		summary: "describe a model checkpoint or LoRA file (format, layout, tensors, ranks)",
		usage:   "arenahost inspect FILE... [--json]",
		example: "arenahost inspect ./models/flux-sample-nf4.safetensors\narenahost inspect --json ./loras/sample-kohya.safetensors",
		run:     runInspect,
	})
}

func runInspect(_ context.Context, env *Env, args []string) error {
	fs := newFlags(commands["inspect"], env)
	asJSON := fs.Bool("json", false, "print JSON instead of text")
	files, done, err := parse(fs, args)
	if done {
		return err
	}
	if len(files) == 0 {
		return usagef("needs at least one FILE to describe (a checkpoint or LoRA .safetensors)")
	}
	for i, path := range files {
		r, err := inspect.File(path)
		if err != nil {
			return fmt.Errorf("inspect: %w", err)
		}
		if *asJSON {
			if err := r.WriteJSON(env.Stdout); err != nil {
				return err
			}
			continue
		}
		if i > 0 {
			fmt.Fprintln(env.Stdout)
		}
		if err := r.WriteText(env.Stdout); err != nil {
			return err
		}
	}
	return nil
}
