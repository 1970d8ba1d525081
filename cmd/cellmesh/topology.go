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
		fmt.Fprint(w, "Usage: cellmesh topology validate [--json] FILE\n\nSubcommands:\n  validate   check a topology file and print every problem; exit 1 when invalid\n")
		return code
	}
	if args[0] != "validate" {
		return usagef(stderr, "topology", "unknown subcommand %q (want validate)", args[0])
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
