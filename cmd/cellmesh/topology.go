package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

func runTopology(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || isHelp(args[0]) {
		w := stderr
		code := exitUsage
		if len(args) > 0 {
			w, code = stdout, exitOK
		}
		fmt.Fprint(w, "Usage: cellmesh topology validate [--json] FILE\n       cellmesh topology get [--api URL] [--json]\n       cellmesh topology apply FILE [--api URL]\n\nSubcommands:\n  validate   check a topology file and print every problem; exit 1 when invalid\n  get        print the control plane's current topology as a file (YAML)\n  apply      send a topology file to the control plane, which commits it if it is a valid successor\n")
		return code
	}
	if args[0] == "apply" {
		return runTopologyApply(args[1:], stdout, stderr)
	}
	if args[0] == "get" {
		return runTopologyGet(args[1:], stdout, stderr)
	}
	if args[0] != "validate" {
		return usagef(stderr, "topology", "unknown subcommand %q (want validate, get or apply)", args[0])
	}
	fs := newFlags("topology validate", "cellmesh topology validate [--json] FILE",
		`Checks a topology file: its YAML shape (unknown keys, wrong types, with
line numbers) and its meaning (unknown or duplicate names, shards without a
primary or assigned twice, missing cross-region standbys, more than one gzone
writer, ...). Prints every problem at once. Exit 0 when valid, 1 when not.`, stderr)
	asJSON := fs.Bool("json", false, "print {\"valid\":bool,\"problems\":[{\"subject\",\"message\"}]}")
	if code, done := parse(fs, args[1:], stdout); done {
		return code
	}
	if fs.NArg() != 1 {
		return usagef(stderr, "topology validate", "want exactly one FILE, got %d arguments", fs.NArg())
	}
	path := fs.Arg(0)
	type result struct {
		Valid    bool              `json:"valid"`
		Problems []routing.Problem `json:"problems"`
		Summary  string            `json:"summary,omitempty"`
	}
	var res result
	t, err := topofile.Load(path)
	if err != nil {
		// One problem per shape error the loader found.
		var joined interface{ Unwrap() []error }
		if errors.As(err, &joined) {
			for _, e := range joined.Unwrap() {
				res.Problems = append(res.Problems, routing.Problem{Subject: "file", Message: e.Error()})
			}
		} else {
			res.Problems = []routing.Problem{{Subject: "file", Message: err.Error()}}
		}
	} else if err := t.Validate(); err != nil {
		var ve *routing.ValidationError
		if !errors.As(err, &ve) {
			return failf(stderr, "topology validate", "%v", err)
		}
		res.Problems = ve.Problems
	} else {
		res.Valid = true
		res.Summary = fmt.Sprintf("%d regions, %d units, %d shards, version %d", len(t.Regions), len(t.Units), t.ShardCount(), t.Version)
	}
	if *asJSON {
		if res.Problems == nil {
			res.Problems = []routing.Problem{}
		}
		b, _ := json.MarshalIndent(res, "", "  ")
		fmt.Fprintln(stdout, string(b))
	} else if res.Valid {
		fmt.Fprintf(stdout, "%s: valid (%s)\n", path, res.Summary)
	} else {
		fmt.Fprintf(stdout, "%s: invalid, %d problem(s):\n", path, len(res.Problems))
		for _, p := range res.Problems {
			fmt.Fprintf(stdout, "  %s\n", p)
		}
	}
	if !res.Valid {
		return exitError
	}
	return exitOK
}

func runTopologyApply(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("topology apply", "cellmesh topology apply FILE [--api URL] [--token T] [--json]",
		`Sends a topology file (such as one written by cellmesh plan
--write-topology) to the control plane. The leader commits it only if it is
a valid successor of the current map: a higher version, the same number of
shards, no epoch lower, a new epoch for every shard whose primary changes.
Exit 3 when the control plane refused it (nothing changed).`, stderr)
	f := addAPIFlags(fs)
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	if fs.NArg() != 1 {
		return usagef(stderr, "topology apply", "want exactly one FILE")
	}
	t, err := topofile.Load(fs.Arg(0))
	if err != nil {
		return failf(stderr, "topology apply", "%v", err)
	}
	if err := t.Validate(); err != nil {
		return failf(stderr, "topology apply", "%s: %v", fs.Arg(0), err)
	}
	data, err := topofile.Encode(t)
	if err != nil {
		return failf(stderr, "topology apply", "%v", err)
	}
	var res struct {
		Version uint64 `json:"version"`
		Index   uint64 `json:"index"`
	}
	raw, err := f.call("PUT", "/v1/topology", rawYAML(data), &res)
	if err != nil {
		return apiFail(stderr, "topology apply", err)
	}
	if f.json {
		printJSON(stdout, raw)
		return exitOK
	}
	fmt.Fprintf(stdout, "applied topology version %d (raft index %d, pushed)\n", res.Version, res.Index)
	return exitOK
}

func runTopologyGet(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("topology get", "cellmesh topology get [--api URL] [--token T] [--json]",
		`Prints the control plane's current topology: as a topology file (YAML)
to plan from (cellmesh plan --topology) and apply again, or with --json as
the cellmesh.v1.ShardMap JSON.`, stderr)
	f := addAPIFlags(fs)
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	if fs.NArg() > 0 {
		return usagef(stderr, "topology get", "unexpected argument %q", fs.Arg(0))
	}
	path := "/v1/topology?format=yaml"
	if f.json {
		path = "/v1/topology"
	}
	raw, err := f.call("GET", path, nil, nil)
	if err != nil {
		return apiFail(stderr, "topology get", err)
	}
	if f.json {
		printJSON(stdout, raw)
	} else {
		stdout.Write(raw)
	}
	return exitOK
}
