// Command cellmesh is the cellmesh binary: the operator CLI today, and the
// sidecar and control plane as they land. This package only wires flags to
// the packages that do the work.
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

// Exit codes.
const (
	exitOK      = 0
	exitError   = 1 // bad input, invalid topology, failed command
	exitUsage   = 2 // unknown command or flag
	exitRefused = 3 // a plan broke a safety rule
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

type command struct {
	name    string
	summary string
	run     func(args []string, stdout, stderr io.Writer) int
}

func commands() []command {
	return []command{
		{"route", "print where a request goes: shard, zone, unit, region, epoch", runRoute},
		{"topology", "check a topology file (topology validate FILE)", runTopology},
		{"sidecar", "run the sidecar beside a service instance (sidecar --config FILE)", runSidecar},
		{"plan", "compute a plan (evacuate, fail, add-unit, remove-unit) and check it against the safety rules", runPlan},
		{"certs", "make the mesh CA (certs init) and workload certificates (certs issue)", runCerts},
		{"controlplane", "run a control-plane replica: raft state, xDS for the sidecars, operator API", runControlPlane},
		{"status", "show the control plane: replicas, leader, units with their shards and sidecars", runStatus},
		{"shards", "list the shard map (owner, epoch, state, standbys), by unit or region", runShards},
		{"move", "move a shard's primary to another unit (move SHARD --to UNIT)", runMove},
		{"gossip-key", "print a new gossip key for a keyring file", runGossipKey},
		{"drill", "run a drill: evacuate or restore a region or unit, list, show, abort", runDrill},
		{"demo", "run the multi-region demo on this machine: replicas, units with the ledger, load", runDemo},
		{"ledger", "run the ledger example service beside a sidecar (the demo's service)", runLedger},
	}
}

const usageHead = `cellmesh: a multi-region, multi-active service-mesh data plane.

Usage: cellmesh <command> [flags]

Commands:
`

func usage(w io.Writer) {
	fmt.Fprint(w, usageHead)
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprint(w, "\nRun 'cellmesh <command> --help' for a command's flags.\n")
}

// run executes the command line and returns the exit code.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return exitUsage
	}
	if isHelp(args[0]) {
		usage(stdout)
		return exitOK
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(args[1:], stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "cellmesh: unknown command %q\n\n", args[0])
	usage(stderr)
	return exitUsage
}

// newFlags returns a flag set that prints its usage to stdout on --help and
// to stderr on a mistake.
func newFlags(name, synopsis, about string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: %s\n\n%s\n", synopsis, about)
		if hasFlags(fs) {
			fmt.Fprint(fs.Output(), "\nFlags:\n")
			fs.PrintDefaults()
		}
	}
	return fs
}

func hasFlags(fs *flag.FlagSet) bool {
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	return n > 0
}

// parse parses args, flags and positional arguments in any order (a "--"
// ends the flags; everything after it is positional). It returns done=true
// with the exit code when the command must stop: help (-h, -help, --help,
// found by the flag package where a flag may stand, never in a flag's value)
// goes to stdout with exit 0, a flag mistake to the flag set's output with
// exit 2.
func parse(fs *flag.FlagSet, args []string, stdout io.Writer) (code int, done bool) {
	out := fs.Output()
	var buf bytes.Buffer
	fs.SetOutput(&buf)
	defer fs.SetOutput(out)
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				_, _ = buf.WriteTo(stdout)
				return exitOK, true
			}
			_, _ = buf.WriteTo(out)
			return exitUsage, true
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		if len(rest) < len(args) && args[len(args)-len(rest)-1] == "--" {
			positional = append(positional, rest...) // everything after -- is positional
			break
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
	_ = fs.Parse(append([]string{"--"}, positional...))
	return 0, false
}

func isHelp(a string) bool { return a == "-h" || a == "-help" || a == "--help" || a == "help" }

// failf prints an error for the named command and returns exitError.
func failf(stderr io.Writer, cmd, format string, args ...any) int {
	fmt.Fprintf(stderr, "cellmesh %s: %s\n", cmd, fmt.Sprintf(format, args...))
	return exitError
}

// usagef prints a usage mistake and returns exitUsage.
func usagef(stderr io.Writer, cmd, format string, args ...any) int {
	fmt.Fprintf(stderr, "cellmesh %s: %s (see 'cellmesh %s --help')\n", cmd, fmt.Sprintf(format, args...), cmd)
	return exitUsage
}

// listFlag collects a repeatable flag; commas also separate values.
type listFlag []string

func (m *listFlag) String() string { return strings.Join(*m, ",") }
func (m *listFlag) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*m = append(*m, p)
		}
	}
	return nil
}

// repeatFlag collects a repeatable flag whose values may hold commas.
type repeatFlag []string

func (m *repeatFlag) String() string { return strings.Join(*m, " | ") }
func (m *repeatFlag) Set(v string) error {
	*m = append(*m, v)
	return nil
}

// onceFlag is a string flag that refuses to be given twice, where a second
// value silently winning would be dangerous (the unit to fail over).
type onceFlag struct {
	v   string
	set bool
}

func (o *onceFlag) String() string { return o.v }
func (o *onceFlag) Set(v string) error {
	if o.set {
		return fmt.Errorf("given twice (%q and %q); give it once", o.v, v)
	}
	o.v, o.set = v, true
	return nil
}
