// Package cli owns the arenahost command line: subcommand dispatch, flags,
// help text with examples, and one-line errors. Each subcommand lives in its
// own file and calls into the host and shared packages.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
)

// ErrUsage marks a command-line mistake; the help has already been printed.
var ErrUsage = errors.New("usage error")

// command is one subcommand.
type command struct {
	name    string
	summary string
	usage   string // first help line: "arenahost NAME [flags] ARGS"
	example string
	run     func(ctx context.Context, env *Env, args []string) error
}

// Env carries the process's standard streams to subcommands.
type Env struct {
	Stdout io.Writer
	Stderr io.Writer
}

var commands = map[string]*command{}

func register(c *command) { commands[c.name] = c }

// Run executes the arenahost command line.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	env := &Env{Stdout: stdout, Stderr: stderr}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		printHelp(stdout)
		if len(args) == 0 {
			return ErrUsage
		}
		return nil
	}
	c, ok := commands[args[0]]
	if !ok {
		printHelp(stderr)
		return fmt.Errorf("unknown command %q: %w", args[0], ErrUsage)
	}
	return c.run(ctx, env, args[1:])
}

func printHelp(w io.Writer) {
	fmt.Fprintln(w, "arenahost: one long-lived process that owns model weights in a shared memory arena")
	fmt.Fprintln(w, "and applies LoRAs to bitsandbytes NF4 models through plugins.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Usage: arenahost COMMAND [flags] [args]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Commands:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Example:")
	fmt.Fprintln(w, "  arenahost sample --out ./models && arenahost inspect ./models/flux-sample-nf4.safetensors")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Run 'arenahost COMMAND --help' for a command's flags and an example.")
}

// newFlags returns a FlagSet whose usage prints the command's help and example.
func newFlags(c *command, env *Env) *flag.FlagSet {
	fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	fs.Usage = func() {
		w := fs.Output()
		fmt.Fprintf(w, "Usage: %s\n\n%s\n\nFlags:\n", c.usage, c.summary)
		fs.PrintDefaults()
		if c.example != "" {
			fmt.Fprintf(w, "\nExample:\n  %s\n", strings.ReplaceAll(c.example, "\n", "\n  "))
		}
	}
	return fs
}

// parse parses flags, turning -h into a nil error after printing help.
func parse(fs *flag.FlagSet, args []string) (done bool, err error) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return true, nil
		}
		return true, fmt.Errorf("%s: %w", err, ErrUsage)
	}
	return false, nil
}
