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
	"regexp"
	"sort"
	"strings"
)

// ErrUsage marks a command-line mistake. Run has already printed it: one
// line naming the problem and its fix, and one pointing to --help.
var ErrUsage = errors.New("usage error")

// usageError is a command-line mistake; its message is the one line Run
// prints (the problem and how to fix it).
type usageError struct{ msg string }

func (e *usageError) Error() string        { return e.msg }
func (e *usageError) Is(target error) bool { return target == ErrUsage }

// usagef returns a usage error: one line naming the problem and the fix.
func usagef(format string, a ...any) error { return &usageError{msg: fmt.Sprintf(format, a...)} }

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

// Run executes the arenahost command line. A usage error (errors.Is
// ErrUsage) has been printed to stderr as two lines: the problem and its
// fix, then where the help is; other errors are the caller's to print.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	env := &Env{Stdout: stdout, Stderr: stderr}
	if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "-help" || args[0] == "help") {
		printHelp(stdout)
		return nil
	}
	if len(args) == 0 {
		err := usagef("no command given (commands: %s)", strings.Join(commandNames(), ", "))
		fmt.Fprintf(stderr, "arenahost: %s\nRun 'arenahost --help' for the commands and an example.\n", err)
		return err
	}
	c, ok := commands[args[0]]
	if !ok {
		err := usagef("unknown command %q (commands: %s)", args[0], strings.Join(commandNames(), ", "))
		fmt.Fprintf(stderr, "arenahost: %s\nRun 'arenahost --help' for the commands and an example.\n", err)
		return err
	}
	err := c.run(ctx, env, args[1:])
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(stderr, "arenahost %s: %s\nRun 'arenahost %s --help' for its flags and an example.\n", c.name, ue.msg, c.name)
	}
	return err
}

func commandNames() []string {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func printHelp(w io.Writer) {
	fmt.Fprintln(w, "arenahost: one long-lived process that owns model weights in a shared memory arena")
	fmt.Fprintln(w, "and applies LoRAs to bitsandbytes NF4 models through plugins.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Usage: arenahost COMMAND [flags] [args]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Commands:")
	for _, n := range commandNames() {
		fmt.Fprintf(w, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Example:")
	fmt.Fprintln(w, "  arenahost sample --out ./models && arenahost inspect ./models/flux-sample-nf4.safetensors")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Run 'arenahost COMMAND --help' for a command's flags and an example.")
}

// newFlags returns a FlagSet whose usage prints the command's help and
// example. The flag package's own messages are silenced: parse turns its
// errors into one-line usage errors.
func newFlags(c *command, env *Env) *flag.FlagSet {
	fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {
		w := env.Stdout
		fmt.Fprintf(w, "Usage: %s\n\n%s\n\nFlags (before or after the arguments; -- ends them):\n", c.usage, c.summary)
		fs.SetOutput(w)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
		if c.example != "" {
			fmt.Fprintf(w, "\nExample:\n  %s\n", strings.ReplaceAll(c.example, "\n", "\n  "))
		}
	}
	return fs
}

// parse parses args with flags allowed before, between and after the
// positional arguments (Go's flag package alone stops at the first
// positional); "--" ends the flags. It returns the positional arguments.
// On -h or --help it prints the help to stdout and returns done; a flag
// mistake is a one-line usage error.
func parse(fs *flag.FlagSet, args []string) (pos []string, done bool, err error) {
	// The flag package prints the usage on every error; only -h should.
	help := fs.Usage
	fs.Usage = func() {}
	defer func() { fs.Usage = help }()
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				help()
				return nil, true, nil
			}
			return nil, true, flagError(fs, err)
		}
		rest := fs.Args()
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(pos, rest...), false, nil
		}
		if len(rest) == 0 {
			return pos, false, nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

var (
	reUnknownFlag = regexp.MustCompile(`^flag provided but not defined: -+(.*)$`)
	reNeedsArg    = regexp.MustCompile(`^flag needs an argument: -+(.*)$`)
	reBadValue    = regexp.MustCompile(`^invalid (?:boolean )?value "(.*)" for (?:flag )?-+([^:]+): (.*)$`)
)

// flagError turns the flag package's error into one line naming the flag
// and what it takes.
func flagError(fs *flag.FlagSet, err error) error {
	msg := err.Error()
	if m := reUnknownFlag.FindStringSubmatch(msg); m != nil {
		var names []string
		fs.VisitAll(func(f *flag.Flag) { names = append(names, "--"+f.Name) })
		return usagef("unknown flag --%s (this command takes %s)", m[1], strings.Join(names, ", "))
	}
	if m := reNeedsArg.FindStringSubmatch(msg); m != nil {
		return usagef("--%s needs a value%s", m[1], flagTakes(fs, m[1]))
	}
	if m := reBadValue.FindStringSubmatch(msg); m != nil {
		why := m[3]
		if why == "parse error" || why == "value out of range" {
			why = "not a valid value" + flagTakes(fs, m[2])
		}
		return usagef("--%s %q: %s", m[2], m[1], why)
	}
	return usagef("%s", msg)
}

// flagTakes is " (NAME: USAGE)" for a flag, telling what it takes.
func flagTakes(fs *flag.FlagSet, name string) string {
	f := fs.Lookup(name)
	if f == nil {
		return ""
	}
	typ, usage := flag.UnquoteUsage(f)
	if typ == "" {
		return " (" + usage + ")"
	}
	return fmt.Sprintf(" (%s: %s)", typ, usage)
}
