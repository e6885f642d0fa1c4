package cli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/samples"
)

func init() {
	register(&command{
		name:    "sample",
		summary: "write a sample NF4 Flux model (real BFL layer names and width rules, fewer blocks)",
		usage:   "arenahost sample --out DIR [flags]",
		example: "arenahost sample --out ./models --nested  (--hidden 1024 --mlp 4096 --double 4 --single 8: a bigger model)",
		run:     runSample,
	})
}

func runSample(_ context.Context, env *Env, args []string) error {
	fs := newFlags(commands["sample"], env)
	out := fs.String("out", "", "directory to write into (created if missing)")
	nested := fs.Bool("nested", false, "double-quantize absmax (Forge v1 style) instead of float32 absmax (v2 style)")
	blocksize := fs.Int("blocksize", 64, "NF4 blocksize (32..4096, a power of two)")
	dtype := fs.String("dtype", "bfloat16", "logical dtype of the weights: bfloat16 or float16")
	seed := fs.Uint64("seed", 1, "random seed for the weights")
	base := layout.FluxSample()
	hidden := fs.Int("hidden", base.Hidden, "hidden width (a multiple of the 128-wide heads)")
	mlp := fs.Int("mlp", base.MLP, "MLP width")
	double := fs.Int("double", base.DoubleBlocks, "double-stream blocks")
	single := fs.Int("single", base.SingleBlocks, "single-stream blocks")
	pos, done, err := parse(fs, args)
	if done {
		return err
	}
	switch {
	case len(pos) > 0:
		return usagef("takes no positional arguments, got %q (name the directory with --out DIR)", pos)
	case *out == "":
		return usagef("needs --out DIR, the directory to write the sample model into")
	case *dtype != "bfloat16" && *dtype != "float16":
		return usagef("--dtype must be bfloat16 or float16, got %q", *dtype)
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return fmt.Errorf("sample: create %s: %w", *out, err)
	}
	cfg := base
	cfg.Hidden, cfg.MLP, cfg.DoubleBlocks, cfg.SingleBlocks = *hidden, *mlp, *double, *single
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("sample: %w", err)
	}
	path := filepath.Join(*out, samples.ModelFile)
	err = samples.WriteModel(path, samples.ModelOptions{Config: cfg, Blocksize: *blocksize, Nested: *nested, DType: *dtype, Seed: *seed})
	if err != nil {
		return fmt.Errorf("sample: %w", err)
	}
	fmt.Fprintf(env.Stdout, "wrote %s\n", path)
	return nil
}
