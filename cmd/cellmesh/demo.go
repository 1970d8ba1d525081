package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/cellmesh/cellmesh/examples/demo"
	"github.com/cellmesh/cellmesh/examples/ledger"
)

func runDemo(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("demo", "cellmesh demo [--duration D] [--drill KIND:TARGET@T]... [--report FILE] [--users N] [--rate R] [--dir DIR]",
		`Starts the whole multi-region mesh on this machine, on 127.0.0.1: three
control-plane replicas (one per region) and, in each of six units (three
regions of two), the ledger behind a sidecar, gossiping with the fast
profile; then a load of users reading, depositing and transferring through
every unit. It prints the control plane's API address and token, the
units' addresses, and a progress line every 10 s; it runs until Ctrl-C
(or SIGTERM), or --duration. --drill evacuate:eu@20s runs a drill through
the control plane 20 s into the load (evacuate or restore; the target a
region or a unit; repeatable), printing its events. At the end it reads
every account the load wrote to and checks its balance against the
acknowledged writes, stops every process cleanly and writes --report
(JSON: the load, the drills' reports, the check). Exit 1 when a drill did
not finish done or an acknowledged write is missing. Needs nothing but
this binary.`, stderr)
	duration := fs.Duration("duration", 0, "stop after this long (0: run until Ctrl-C)")
	reportPath := fs.String("report", "", "write the run's report (JSON) to this file at the end")
	users := fs.Int("users", 2000, "users the load generator plays")
	rate := fs.Int("rate", 100, "requests per second of the load, over all units")
	dir := fs.String("dir", "", "keep certificates, data and logs here (default: a temporary directory, removed at the end)")
	var drills listFlag
	fs.Var(&drills, "drill", "a drill KIND:TARGET@T, such as evacuate:eu@20s (repeatable)")
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	if fs.NArg() > 0 {
		return usagef(stderr, "demo", "unexpected argument %q", fs.Arg(0))
	}
	if *users <= 0 || *rate <= 0 || *duration < 0 {
		return usagef(stderr, "demo", "--users and --rate must be positive and --duration not negative")
	}
	var specs []demo.DrillSpec
	for _, d := range drills {
		spec, err := demo.ParseDrill(d)
		if err != nil {
			return usagef(stderr, "demo", "%v", err)
		}
		specs = append(specs, spec)
	}
	bin, err := os.Executable()
	if err != nil {
		fmt.Fprintf(stderr, "cellmesh demo: cannot find this binary to run the mesh's processes: %v\n", err)
		return exitError
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := demo.Run(ctx, demo.Options{Bin: bin, Dir: *dir, Duration: *duration, Users: *users, Rate: *rate, Progress: stdout, Drills: specs,
		Log: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if rep != nil && *reportPath != "" {
		data, _ := json.MarshalIndent(rep, "", "  ")
		if werr := os.WriteFile(*reportPath, append(data, '\n'), 0o600); werr != nil {
			fmt.Fprintf(stderr, "cellmesh demo: write the report: %v\n", werr)
			return exitError
		}
		fmt.Fprintf(stdout, "report written to %s\n", *reportPath)
	}
	if err != nil {
		fmt.Fprintf(stderr, "cellmesh demo: %v\n", err)
		return exitError
	}
	fmt.Fprintf(stdout, "done: %d requests, %d writes acknowledged, %d client-visible errors\n", rep.Load.Requests, rep.Load.WritesAcked, rep.Load.ClientErrors)
	code := exitOK
	for _, d := range rep.Drills {
		if d.Phase != "done" {
			fmt.Fprintf(stderr, "cellmesh demo: drill %s:%s ended %s %s\n", d.Spec.Kind, d.Spec.Target, d.Phase, d.Error)
			code = exitError
		}
	}
	if c := rep.Check; c != nil && (c.Lost > 0 || c.Unreadable > 0) {
		fmt.Fprintf(stderr, "cellmesh demo: ACKNOWLEDGED WRITES MISSING or unreadable: %d mismatches, %d unreadable; e.g. %v\n", c.Lost, c.Unreadable, c.Examples)
		code = exitError
	}
	return code
}

func runLedger(args []string, _, stderr io.Writer) int { return ledger.Command(args, stderr) }
