package routing

import (
	"fmt"
	"strings"
)

// Text renders the plan for a dry run: what it moves, wave by wave, and the
// safety rules it passes or breaks.
func (p *Plan) Text() string {
	var b strings.Builder
	fmt.Fprintf(&b, "plan: %s %s (topology version %d)\n", p.Kind, p.Target, p.Version)
	if p.AddUnit != nil {
		fmt.Fprintf(&b, "adds unit %s (%s, region %s, %.0f rps)\n", p.AddUnit.Name, p.AddUnit.Kind, p.AddUnit.Region, p.AddUnit.CapacityRPS)
	}
	if p.RemoveUnit != "" {
		fmt.Fprintf(&b, "removes unit %s\n", p.RemoveUnit)
	}
	if len(p.Lost) > 0 {
		fmt.Fprintf(&b, "lost: %s\n", strings.Join(p.Lost, ", "))
	}
	if len(p.Evacuated) > 0 {
		fmt.Fprintf(&b, "evacuated: %s\n", strings.Join(p.Evacuated, ", "))
	}
	primaries := 0
	for i := range p.Moves {
		if p.Moves[i].PrimaryChange() {
			primaries++
		}
	}
	fmt.Fprintf(&b, "moves: %d (%d new primaries, %d standby changes) in %d waves\n", len(p.Moves), primaries, len(p.Moves)-primaries, p.Waves)
	wave := 0
	for _, mv := range p.Moves {
		if mv.Wave != wave {
			wave = mv.Wave
			fmt.Fprintf(&b, "wave %d:\n", wave)
		}
		name := ShardName(mv.Shard)
		if mv.PrimaryChange() {
			fmt.Fprintf(&b, "  %-11s %s -> %s  epoch %d -> %d  standbys [%s]", name, mv.From, mv.To, mv.FromEpoch, mv.ToEpoch, strings.Join(mv.Standbys, ", "))
			if mv.CopyFirst {
				b.WriteString("  (copy first)")
			}
		} else {
			fmt.Fprintf(&b, "  %-11s primary %s stays  standbys [%s] -> [%s]", name, mv.From, strings.Join(mv.OldStandbys, ", "), strings.Join(mv.Standbys, ", "))
		}
		b.WriteByte('\n')
	}
	b.WriteString("safety rules:\n")
	for _, r := range p.Rules {
		mark := "ok     "
		switch {
		case !r.OK:
			mark = "BROKEN "
		case r.Warning:
			mark = "WARN   "
		}
		fmt.Fprintf(&b, "  %s%-22s %s\n", mark, r.Rule, r.Detail)
	}
	warnings := 0
	for _, r := range p.Rules {
		if r.Warning {
			warnings++
		}
	}
	switch {
	case p.Refused():
		b.WriteString("result: refused; nothing was changed\n")
	case warnings > 0:
		fmt.Fprintf(&b, "result: passes the safety rules, with %d warning(s) above\n", warnings)
	default:
		b.WriteString("result: passes every safety rule\n")
	}
	return b.String()
}
