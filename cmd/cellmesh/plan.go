package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

// planAbout describes every plan kind; the plan help and each kind's help
// show it.
const planAbout = `Computes a plan against a topology file, checks it against the topology's
safety rules, and prints it. A plan never changes anything by itself: the
topology file is only read. --write-topology saves the topology the plan
leads to, when the plan passes, to another file than --topology. --dry-run
makes the dry run explicit for scripts: it prints the same plan and writes
nothing, so it cannot be given with --write-topology.`

const planUsage = `Usage: cellmesh plan <kind> --topology FILE [flags]

` + planAbout + `

Kinds:
  evacuate     --region R | --unit U    move every shard led there to a standby elsewhere
  fail         --region R | --unit U    fail over lost units (comma-separate several)
  add-unit     --name U --region R --capacity RPS [--kind rzone|gzone|czone]
                                        declare a unit and rebalance shards to it
  remove-unit  --unit U                 move every shard off a unit and delete it

Every kind takes --topology FILE, --load UNIT=RPS (repeatable), --json, and
one of --dry-run or --write-topology OUT; 'cellmesh plan <kind> --help'
lists them.

Exit 0 when the plan passes every rule, 3 when a rule refuses it, 1 on bad
input, 2 on a usage mistake.
`

func runPlan(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || isHelp(args[0]) {
		if len(args) == 0 {
			fmt.Fprint(stderr, planUsage)
			return exitUsage
		}
		fmt.Fprint(stdout, planUsage)
		return exitOK
	}
	kind := args[0]
	synopsis := map[string]string{
		"evacuate":    "cellmesh plan evacuate (--region R | --unit U) --topology FILE [--load UNIT=RPS]... [--json] [--dry-run | --write-topology OUT]",
		"fail":        "cellmesh plan fail (--region R | --unit U[,U...]) --topology FILE [--load UNIT=RPS]... [--json] [--dry-run | --write-topology OUT]",
		"add-unit":    "cellmesh plan add-unit --name U --region R --capacity RPS [--kind rzone] --topology FILE [--load UNIT=RPS]... [--json] [--dry-run | --write-topology OUT]",
		"remove-unit": "cellmesh plan remove-unit --unit U --topology FILE [--load UNIT=RPS]... [--json] [--dry-run | --write-topology OUT]",
	}[kind]
	if synopsis == "" {
		return usagef(stderr, "plan", "unknown plan kind %q (want evacuate, fail, add-unit or remove-unit)", kind)
	}
	cmd := "plan " + kind
	fs := newFlags(cmd, synopsis, planAbout, stderr)
	topo := fs.String("topology", "", "topology YAML file (required)")
	asJSON := fs.Bool("json", false, "print the plan as JSON")
	writeTo := fs.String("write-topology", "", "when the plan passes, write the topology it leads to (YAML) to this file, not the --topology file")
	dryRun := fs.Bool("dry-run", false, "print the plan and the rules it passes, write nothing (refused with --write-topology)")
	var loads listFlag
	fs.Var(&loads, "load", "measured load of a unit as UNIT=RPS (repeatable or comma-separated); units without one count as 0 rps")
	var lostUnits listFlag
	fs.Var(&lostUnits, "lost", "units known to be down (repeatable or comma-separated): never made primary nor counted as a live copy; a topology file does not record health")
	var region, unit, name onceFlag
	var units listFlag
	var unitKind *string
	var capacity *float64
	switch kind {
	case "evacuate":
		fs.Var(&region, "region", "region to evacuate")
		fs.Var(&unit, "unit", "unit to evacuate")
	case "fail":
		fs.Var(&region, "region", "lost region to fail over")
		fs.Var(&units, "unit", "lost unit to fail over (repeatable or comma-separated)")
	case "remove-unit":
		fs.Var(&unit, "unit", "unit to remove (required)")
	case "add-unit":
		fs.Var(&name, "name", "name of the new unit (required)")
		fs.Var(&region, "region", "region of the new unit (required)")
		capacity = fs.Float64("capacity", 0, "declared capacity of the new unit in requests/s (required)")
		unitKind = fs.String("kind", "rzone", "kind of the new unit: rzone, gzone or czone")
	}
	if code, done := parse(fs, args[1:], stdout); done {
		return code
	}
	if fs.NArg() > 0 {
		return usagef(stderr, cmd, "unexpected argument %q", fs.Arg(0))
	}
	if *topo == "" {
		return usagef(stderr, cmd, "--topology is required")
	}
	writeSet := false
	fs.Visit(func(f *flag.Flag) { writeSet = writeSet || f.Name == "write-topology" })
	if writeSet && *writeTo == "" {
		return usagef(stderr, cmd, "--write-topology needs a file name")
	}
	if *dryRun && *writeTo != "" {
		return usagef(stderr, cmd, "--dry-run writes nothing; drop one of them")
	}
	if *writeTo != "" {
		same, err := sameFile(*topo, *writeTo)
		if err != nil {
			return failf(stderr, cmd, "--write-topology: %v", err)
		}
		if same {
			return failf(stderr, cmd, "--write-topology %s is the --topology file; overwriting it would lose its comments: write to another file", *writeTo)
		}
	}
	obs, err := parseLoads(loads)
	if err != nil {
		return failf(stderr, cmd, "%v", err)
	}
	obs.Lost = lostUnits
	m, code := loadMap(*topo, cmd, stderr)
	if m == nil {
		return code
	}
	var unknown []string
	for _, l := range loads {
		if u, _, _ := strings.Cut(l, "="); !slices.Contains(unknown, u) {
			if _, ok := m.Unit(strings.TrimSpace(u)); !ok {
				unknown = append(unknown, strings.TrimSpace(u))
			}
		}
	}
	if len(unknown) > 0 {
		return failf(stderr, cmd, "--load: units %s are not in the topology", strings.Join(unknown, ", "))
	}

	var plan *routing.Plan
	switch kind {
	case "evacuate":
		if (region.v == "") == (unit.v == "") {
			return usagef(stderr, cmd, "give exactly one of --region or --unit")
		}
		if region.v != "" {
			plan, err = routing.EvacuateRegion(m, region.v, obs)
		} else {
			plan, err = routing.EvacuateUnit(m, unit.v, obs)
		}
	case "fail":
		if (region.v == "") == (len(units) == 0) {
			return usagef(stderr, cmd, "give exactly one of --region or --unit")
		}
		if region.v != "" {
			plan, err = routing.FailRegion(m, region.v, obs)
		} else {
			plan, err = routing.FailUnits(m, units, obs)
		}
	case "remove-unit":
		if unit.v == "" {
			return usagef(stderr, cmd, "--unit is required")
		}
		plan, err = routing.RemoveUnit(m, unit.v, obs)
	case "add-unit":
		if name.v == "" || region.v == "" || *capacity == 0 {
			return usagef(stderr, cmd, "--name, --region and --capacity are required")
		}
		plan, err = routing.AddUnit(m, routing.Unit{Name: name.v, Region: region.v, Kind: routing.Kind(*unitKind), CapacityRPS: *capacity}, obs)
	}
	var refused *routing.RefusedError
	if err != nil && !errors.As(err, &refused) {
		return failf(stderr, cmd, "%v", err)
	}
	if *asJSON {
		b, _ := json.MarshalIndent(plan, "", "  ")
		fmt.Fprintln(stdout, string(b))
	} else {
		fmt.Fprint(stdout, plan.Text())
	}
	if refused != nil {
		fmt.Fprintf(stderr, "cellmesh %s: %v\n", cmd, refused)
		return exitRefused
	}
	if *writeTo != "" {
		t, err := m.Apply(plan)
		if err != nil {
			return failf(stderr, cmd, "%v", err)
		}
		b, err := topofile.Encode(t)
		if err != nil {
			return failf(stderr, cmd, "%v", err)
		}
		if err := os.WriteFile(*writeTo, b, 0o644); err != nil {
			return failf(stderr, cmd, "write topology: %v", err)
		}
		fmt.Fprintf(stderr, "wrote the topology after the plan (version %d) to %s\n", t.Version, *writeTo)
	}
	return exitOK
}

func parseLoads(loads []string) (routing.Observed, error) {
	obs := routing.Observed{LoadRPS: map[string]float64{}}
	for _, l := range loads {
		u, v, ok := strings.Cut(l, "=")
		rps, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if !ok || strings.TrimSpace(u) == "" || err != nil || rps < 0 || rps != rps || rps > 1e12 {
			return obs, fmt.Errorf("--load %q: want UNIT=RPS with a non-negative rate, like us-east-1=12000", l)
		}
		u = strings.TrimSpace(u)
		if prev, ok := obs.LoadRPS[u]; ok {
			return obs, fmt.Errorf("--load: unit %q is given twice (%g and %g rps); give it once", u, prev, rps)
		}
		obs.LoadRPS[u] = rps
	}
	return obs, nil
}

// sameFile reports whether the paths a and b name the same file: by
// os.SameFile when both exist (through any link or spelling), else by their
// cleaned absolute paths.
func sameFile(a, b string) (bool, error) {
	ai, aerr := os.Stat(a)
	bi, berr := os.Stat(b)
	if aerr == nil && berr == nil {
		return os.SameFile(ai, bi), nil
	}
	aa, err := filepath.Abs(a)
	if err != nil {
		return false, err
	}
	ba, err := filepath.Abs(b)
	if err != nil {
		return false, err
	}
	return aa == ba, nil
}
