package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/cellmesh/cellmesh/controlplane"
	"github.com/cellmesh/cellmesh/controlplane/store"
)

const drillUsage = `Usage:
  cellmesh drill evacuate (--region R | --unit U) [--dry-run] [api flags]
  cellmesh drill restore  (--region R | --unit U) [--dry-run] [api flags]
  cellmesh drill list [api flags]
  cellmesh drill show ID [api flags]
  cellmesh drill abort ID [api flags]

An evacuation moves every shard whose primary is in the region (or unit)
to a standby outside it, one planned handoff after another (drain, the
standby's check, epoch+1, push); a restore moves back what the last
evacuation of the same target moved. The control plane checks the safety
rules first: a drill that breaks one is refused and changes nothing (exit
3). --dry-run prints the plan and the rules it passes or breaks. While a
drill runs, its events are printed as they happen (one line each; --json:
one JSON event per line) until it ends, then its report; Ctrl-C leaves it
running (cellmesh drill abort ID stops it after the move in progress).
Reports are kept by the control plane: drill list, drill show ID.
`

func runDrill(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || isHelp(args[0]) {
		fmt.Fprint(stderr, drillUsage)
		if len(args) == 0 {
			return exitUsage
		}
		return exitOK
	}
	sub, rest := args[0], args[1:]
	switch sub {
	case "evacuate", "restore":
		return runDrillStart(sub, rest, stdout, stderr)
	case "list":
		return runDrillList(rest, stdout, stderr)
	case "show", "abort":
		return runDrillOne(sub, rest, stdout, stderr)
	}
	return usagef(stderr, "drill", "unknown drill command %q: want evacuate, restore, list, show or abort", sub)
}

func runDrillStart(kind string, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("drill "+kind, "cellmesh drill "+kind+" (--region R | --unit U) [--dry-run]", "See cellmesh drill --help.", stderr)
	f := addAPIFlags(fs)
	region := fs.String("region", "", "the region")
	unit := fs.String("unit", "", "the unit")
	dry := fs.Bool("dry-run", false, "print the plan and the safety rules; change nothing")
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	if fs.NArg() > 0 {
		return usagef(stderr, "drill", "unexpected argument %q", fs.Arg(0))
	}
	if (*region == "") == (*unit == "") {
		return usagef(stderr, "drill", "name one target: --region or --unit")
	}
	req := controlplane.DrillRequest{Kind: kind, Region: *region, Unit: *unit, DryRun: *dry}
	if *dry {
		var plan controlplane.DrillPlan
		raw, err := f.call("POST", "/v1/drills", req, &plan)
		if err != nil {
			return apiFail(stderr, "drill", err)
		}
		if f.json {
			printJSON(stdout, raw)
		} else {
			printDrillPlan(stdout, &plan)
		}
		if plan.Refused {
			return exitRefused
		}
		return exitOK
	}
	var d store.Drill
	if _, err := f.call("POST", "/v1/drills", req, &d); err != nil {
		return apiFail(stderr, "drill", err)
	}
	return followDrill(f, d.ID, stdout, stderr)
}

func printDrillPlan(w io.Writer, p *controlplane.DrillPlan) {
	verdict := "passes every safety rule"
	if p.Refused {
		verdict = "is REFUSED: it breaks a safety rule; nothing would change"
	}
	fmt.Fprintf(w, "drill %s %s%s (dry run): %d shards to move; the plan %s\n", p.Kind, p.Region, p.Unit, len(p.Moves), verdict)
	for _, r := range p.Rules {
		mark := "ok  "
		if !r.OK {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "  %s %-24s %s\n", mark, r.Rule, r.Detail)
	}
	for _, m := range p.Moves {
		fmt.Fprintf(w, "  shard %-4d %s -> %s (epoch %d)\n", m.Shard, m.From, m.To, m.Epoch)
	}
}

// followDrill prints the drill's events as they come until it ends, then
// its report; it exits 0 when the drill is done, 1 when it failed or was
// aborted.
func followDrill(f *apiFlags, id string, stdout, stderr io.Writer) int {
	seen := 0
	start := time.Now()
	for {
		var d store.Drill
		if _, err := f.call("GET", "/v1/drills/"+id, nil, &d); err != nil {
			// A leader change or a slow answer: the drill goes on; ask again.
			if time.Since(start) > 10*time.Minute {
				return apiFail(stderr, "drill", err)
			}
			time.Sleep(500 * time.Millisecond)
			continue
		}
		for _, e := range d.Events[min(seen, len(d.Events)):] {
			if f.json {
				line, _ := json.Marshal(map[string]any{"drill": d.ID, "at": e.At, "event": e.Msg})
				fmt.Fprintln(stdout, string(line))
			} else {
				fmt.Fprintf(stdout, "%s  %s\n", e.At.Local().Format("15:04:05.000"), e.Msg)
			}
		}
		seen = len(d.Events)
		if d.Phase != "running" {
			if !f.json {
				printDrillReport(stdout, &d)
			}
			if d.Phase == "done" {
				return exitOK
			}
			return exitError
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func printDrillReport(w io.Writer, d *store.Drill) {
	took := d.Ended.Sub(d.Started).Round(time.Millisecond)
	fmt.Fprintf(w, "drill %s: %s %s%s by %s, %s: %d of %d shards moved in %s, longest write pause %.0f ms\n",
		d.ID, d.Kind, d.Region, d.Unit, d.Who, d.Phase, d.Moved, d.Total, took, 1000*d.WritePauseMaxSeconds)
	if d.Reason != "" {
		fmt.Fprintf(w, "  %s\n", d.Reason)
	}
	rpo := 0
	for _, s := range d.Shards {
		if s.Phase == "done" && s.RPOOK {
			rpo++
		}
	}
	fmt.Fprintf(w, "  RPO check: %d of %d moved shards proven with every acknowledged write on the new primary\n", rpo, d.Moved)
	var rules []string
	for _, r := range d.Rules {
		rules = append(rules, r.Rule)
	}
	fmt.Fprintf(w, "  safety rules passed: %s\n", strings.Join(rules, ", "))
	fmt.Fprintf(w, "  %-6s %-8s %-8s %-8s %8s  %s\n", "SHARD", "FROM", "TO", "PHASE", "PAUSE", "NOTE")
	for _, s := range d.Shards {
		pause := ""
		if s.Phase == "done" {
			pause = fmt.Sprintf("%.0fms", 1000*s.WritePauseSeconds)
		}
		fmt.Fprintf(w, "  %-6d %-8s %-8s %-8s %8s  %s\n", s.Shard, s.From, s.To, s.Phase, pause, s.Error)
	}
}

func runDrillList(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("drill list", "cellmesh drill list", "Lists the drills the control plane keeps, oldest first.", stderr)
	f := addAPIFlags(fs)
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	var out struct{ Drills []store.Drill }
	raw, err := f.call("GET", "/v1/drills", nil, &out)
	if err != nil {
		return apiFail(stderr, "drill", err)
	}
	if f.json {
		printJSON(stdout, raw)
		return exitOK
	}
	fmt.Fprintf(stdout, "%-12s %-9s %-10s %-8s %-6s %-20s %s\n", "ID", "KIND", "TARGET", "PHASE", "MOVED", "STARTED", "TOOK")
	for _, d := range out.Drills {
		took := "-"
		if !d.Ended.IsZero() {
			took = d.Ended.Sub(d.Started).Round(time.Millisecond).String()
		}
		fmt.Fprintf(stdout, "%-12s %-9s %-10s %-8s %-6s %-20s %s\n", d.ID, d.Kind, d.Region+d.Unit, d.Phase,
			fmt.Sprintf("%d/%d", d.Moved, d.Total), d.Started.Local().Format("2006-01-02 15:04:05"), took)
	}
	return exitOK
}

func runDrillOne(sub string, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("drill "+sub, "cellmesh drill "+sub+" ID", "See cellmesh drill --help.", stderr)
	f := addAPIFlags(fs)
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	if fs.NArg() != 1 {
		return usagef(stderr, "drill", "want exactly one drill ID (cellmesh drill list)")
	}
	id := fs.Arg(0)
	if sub == "abort" {
		raw, err := f.call("POST", "/v1/drills/"+id+"/abort", nil, nil)
		if err != nil {
			return apiFail(stderr, "drill", err)
		}
		if f.json {
			printJSON(stdout, raw)
		} else {
			fmt.Fprintf(stdout, "drill %s: aborting; it stops after the move in progress\n", id)
		}
		return exitOK
	}
	var d store.Drill
	raw, err := f.call("GET", "/v1/drills/"+id, nil, &d)
	if err != nil {
		return apiFail(stderr, "drill", err)
	}
	if f.json {
		printJSON(stdout, raw)
		return exitOK
	}
	for _, e := range d.Events {
		fmt.Fprintf(stdout, "%s  %s\n", e.At.Local().Format("15:04:05.000"), e.Msg)
	}
	printDrillReport(stdout, &d)
	return exitOK
}
