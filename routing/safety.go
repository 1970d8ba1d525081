package routing

import (
	"fmt"
	"slices"
	"strings"
)

// Safety rule names, as RuleResult.Rule reports them.
const (
	RuleVersion        = "version"
	RuleMovesValid     = "moves-valid"
	RuleOneHandoff     = "one-handoff-per-shard"
	RuleComplete       = "complete"
	RuleDataSafe       = "data-safe-target"
	RuleCapacity       = "capacity-headroom"
	RuleMinServing     = "min-serving-units"
	RuleInFlight       = "shards-in-flight"
	RuleCrossRegionSby = "cross-region-standby"
)

// RuleResult is one safety rule evaluated on a plan.
type RuleResult struct {
	Rule string `json:"rule"`
	OK   bool   `json:"ok"`
	// Warning marks a rule that holds only in part but does not refuse the
	// plan: a failover leaves shards whose every copy is lost where they are,
	// and moves the rest.
	Warning bool   `json:"warning,omitempty"`
	Detail  string `json:"detail"`
}

// after is the assignment a plan leads to, indexed like a ShardMap.
type after struct {
	units    []Unit
	index    map[string]int32
	primary  []int32 // by shard; index n is the global assignment
	standbys [][]int32
	hasGlb   bool
	lost     []bool
	evac     []bool
	removed  []bool
}

func (a *after) usable(u int32) bool { return !a.lost[u] && !a.removed[u] }

// CheckPlan evaluates every safety rule of the map's topology on p, as it
// would leave the map, whoever built p. It changes nothing.
func CheckPlan(m *ShardMap, p *Plan, obs Observed) []RuleResult {
	safety := m.topo.Safety.withDefaults()
	n := m.n
	a := &after{units: m.units, index: make(map[string]int32, len(m.units)+1), hasGlb: m.hasGlb}
	if p.AddUnit != nil {
		a.units = append(slices.Clip(slices.Clone(m.units)), *p.AddUnit)
	}
	for i, u := range a.units {
		a.index[u.Name] = int32(i)
	}
	a.lost, a.evac, a.removed = make([]bool, len(a.units)), make([]bool, len(a.units)), make([]bool, len(a.units))
	var badUnits []string
	mark := func(set []bool, names []string) {
		for _, name := range names {
			if u, ok := a.index[name]; ok {
				set[u] = true
			} else {
				badUnits = append(badUnits, name)
			}
		}
	}
	mark(a.lost, p.Lost)
	mark(a.evac, p.Evacuated)
	if p.RemoveUnit != "" {
		mark(a.removed, []string{p.RemoveUnit})
	}
	a.primary = make([]int32, n+1)
	a.standbys = make([][]int32, n+1)
	for s := range m.slots {
		a.primary[s], a.standbys[s] = m.slots[s].primary, m.slots[s].standbys
	}
	if m.hasGlb {
		a.primary[n], a.standbys[n] = m.global.primary, m.global.standbys
	}
	at := func(shard int) int {
		if shard == GlobalShard {
			return n
		}
		return shard
	}

	var results []RuleResult
	add := func(rule string, ok bool, format string, args ...any) {
		results = append(results, RuleResult{Rule: rule, OK: ok, Detail: fmt.Sprintf(format, args...)})
	}
	if p.Version != m.version {
		add(RuleVersion, false, "plan was computed for topology version %d, the topology is at version %d; plan again", p.Version, m.version)
	} else {
		add(RuleVersion, true, "computed for the current version %d", m.version)
	}

	// moves-valid, and the after state.
	var invalid, draining, unsafe []string
	seen := make(map[int]bool, len(p.Moves))
	load := make([]float64, len(a.units))
	measured := 0
	for i, u := range a.units {
		if v, ok := obs.LoadRPS[u.Name]; ok {
			load[i] = v
			measured++
		}
	}
	before := slices.Clone(load)
	perUnit := make([]int, len(a.units))
	for _, sl := range m.slots {
		perUnit[sl.primary]++
	}
	shardLoad := func(s int, from int32) float64 {
		if s == GlobalShard {
			return before[from]
		}
		return before[from] / float64(max(perUnit[from], 1))
	}
	waveSize := map[int]int{}
	for _, mv := range p.Moves {
		name := ShardName(mv.Shard)
		sl, err := m.slot(mv.Shard)
		if err != nil {
			invalid = append(invalid, fmt.Sprintf("%s: %v", name, err))
			continue
		}
		if seen[mv.Shard] {
			invalid = append(invalid, name+": moved twice")
			continue
		}
		seen[mv.Shard] = true
		waveSize[mv.Wave]++
		if mv.Wave < 1 {
			invalid = append(invalid, fmt.Sprintf("%s: wave %d, want 1 or more", name, mv.Wave))
		}
		if sl.state != StateServing {
			draining = append(draining, fmt.Sprintf("%s (%s)", name, sl.state))
		}
		from, to := m.units[sl.primary].Name, mv.To
		if mv.From != from || mv.FromEpoch != sl.epoch {
			invalid = append(invalid, fmt.Sprintf("%s: plan says primary %s epoch %d, the topology says %s epoch %d", name, mv.From, mv.FromEpoch, from, sl.epoch))
			continue
		}
		want := KindRZone
		if mv.Shard == GlobalShard {
			want = KindGZone
		}
		ti, ok := a.index[to]
		if !ok || a.units[ti].Kind != want {
			invalid = append(invalid, fmt.Sprintf("%s: target %q is not a %s unit", name, to, want))
			continue
		}
		wantEpoch := sl.epoch
		if to != from {
			wantEpoch++
		}
		if mv.ToEpoch != wantEpoch {
			invalid = append(invalid, fmt.Sprintf("%s: epoch %d -> %d, want %d", name, mv.FromEpoch, mv.ToEpoch, wantEpoch))
		}
		var sbs []int32
		bad := false
		for _, sb := range mv.Standbys {
			si, ok := a.index[sb]
			if !ok || a.units[si].Kind != want || si == ti || slices.Contains(sbs, si) {
				invalid = append(invalid, fmt.Sprintf("%s: standby %q is unknown, of the wrong kind, the primary or listed twice", name, sb))
				bad = true
				break
			}
			sbs = append(sbs, si)
		}
		if bad {
			continue
		}
		if to != from {
			if !mv.CopyFirst && (!slices.Contains(sl.standbys, ti) || a.lost[ti]) {
				unsafe = append(unsafe, fmt.Sprintf("%s -> %s", name, to))
			}
			l := shardLoad(mv.Shard, sl.primary)
			load[sl.primary] -= l
			load[ti] += l
		}
		a.primary[at(mv.Shard)], a.standbys[at(mv.Shard)] = ti, sbs
	}
	if len(badUnits) > 0 {
		invalid = append(invalid, fmt.Sprintf("units %s are not in the topology", strings.Join(badUnits, ", ")))
	}
	if len(invalid) > 0 {
		add(RuleMovesValid, false, "%s", list(invalid))
	} else {
		add(RuleMovesValid, true, "%d moves name known shards, units and epochs", len(p.Moves))
	}
	if len(draining) > 0 {
		add(RuleOneHandoff, false, "%s: a draining shard's handoff must end first, and a blocked shard needs an operator", list(draining))
	} else {
		add(RuleOneHandoff, true, "no moved shard is draining or blocked")
	}

	// complete: no primary left on a unit that may not lead. A failover
	// moves what it can: shards whose every copy is lost, or that are
	// draining or blocked, stay with a warning; any other plan is refused.
	shardAt := func(i int) int {
		if i == n {
			return GlobalShard
		}
		return i
	}
	busy := func(i int) bool {
		sl, _ := m.slot(shardAt(i))
		return sl.state != StateServing
	}
	var stranded, waiting []string
	for i := 0; i <= n; i++ {
		if i == n && !a.hasGlb {
			break
		}
		u := a.primary[i]
		if a.lost[u] || a.evac[u] || a.removed[u] {
			name := ShardName(shardAt(i))
			switch {
			case busy(i):
				sl, _ := m.slot(shardAt(i))
				waiting = append(waiting, fmt.Sprintf("%s stays on %s (%s)", name, a.units[u].Name, sl.state))
			case a.lost[u] && !slices.ContainsFunc(m.slotStandbys(shardAt(i)), func(sb int32) bool { return a.usable(sb) }):
				waiting = append(waiting, fmt.Sprintf("%s stays on %s (every unit holding its data is lost)", name, a.units[u].Name))
			default:
				stranded = append(stranded, fmt.Sprintf("%s stays on %s (no live standby may take it)", name, a.units[u].Name))
			}
		}
		for _, sb := range a.standbys[i] {
			if a.removed[sb] {
				stranded = append(stranded, fmt.Sprintf("%s still lists removed unit %s as a standby", ShardName(shardAt(i)), a.units[sb].Name))
			}
		}
	}
	if p.Kind != PlanFail {
		stranded, waiting = append(stranded, waiting...), nil
	}
	switch {
	case len(stranded) > 0:
		add(RuleComplete, false, "%s", list(append(stranded, waiting...)))
	case len(waiting) > 0:
		results = append(results, RuleResult{Rule: RuleComplete, OK: true, Warning: true, Detail: fmt.Sprintf(
			"%d shard(s) stay down until a unit holding their data returns, their handoff ends, or an operator accepts the data loss: %s", len(waiting), list(waiting))})
	default:
		add(RuleComplete, true, "no shard is left on a lost, evacuated or removed unit")
	}

	if len(unsafe) > 0 {
		add(RuleDataSafe, false, "the new primary holds no copy of the data: %s", list(unsafe))
	} else {
		add(RuleDataSafe, true, "every new primary is a live standby of its shard, or copies first")
	}

	// capacity headroom: units whose load rises stay under the limit.
	worst, worstRatio := int32(-1), -1.0
	var over []string
	for i := range a.units {
		if load[i] <= before[i]+1e-9 || a.lost[i] {
			continue
		}
		limit := a.units[i].CapacityRPS * safety.MaxUtilization
		r := load[i] / a.units[i].CapacityRPS
		if r > worstRatio {
			worst, worstRatio = int32(i), r
		}
		if load[i] > limit+1e-9 {
			over = append(over, fmt.Sprintf("%s would carry %.0f rps, %.1f%% of its %.0f rps capacity", a.units[i].Name, load[i], 100*r, a.units[i].CapacityRPS))
		}
	}
	note := ""
	if measured < len(a.units) {
		note = fmt.Sprintf(" (%d of %d units have no measured load and count as 0 rps)", len(a.units)-measured, len(a.units))
	}
	switch {
	case len(over) > 0:
		add(RuleCapacity, false, "%s; the limit is %.0f%%%s", list(over), 100*safety.MaxUtilization, note)
	case worst >= 0:
		add(RuleCapacity, true, "busiest target %s at %.0f of %.0f rps (%.1f%% <= %.0f%%)%s", a.units[worst].Name, load[worst], a.units[worst].CapacityRPS, 100*worstRatio, 100*safety.MaxUtilization, note)
	default:
		add(RuleCapacity, true, "no unit takes on load%s", note)
	}

	owning := make([]bool, len(a.units))
	serving, servingBefore := 0, 0
	for i := 0; i < n; i++ {
		if u := a.primary[i]; !owning[u] && !a.lost[u] {
			owning[u] = true
			serving++
		}
	}
	clear(owning)
	for i := range m.slots {
		if u := m.slots[i].primary; !owning[u] && !a.lost[u] {
			owning[u] = true
			servingBefore++
		}
	}
	if serving < safety.MinServingUnits && serving < servingBefore {
		add(RuleMinServing, false, "%d rzone units would own shards, the minimum is %d", serving, safety.MinServingUnits)
	} else {
		add(RuleMinServing, true, "%d rzone units own shards (minimum %d)", serving, safety.MinServingUnits)
	}

	biggest := 0
	for _, c := range waveSize {
		biggest = max(biggest, c)
	}
	if biggest > safety.MaxShardsInFlight {
		add(RuleInFlight, false, "a wave moves %d shards at once, the limit is %d", biggest, safety.MaxShardsInFlight)
	} else {
		add(RuleInFlight, true, "at most %d shards in flight per wave (limit %d)", biggest, safety.MaxShardsInFlight)
	}

	// cross-region-standby: every shard keeps a live standby in another
	// region whenever a live unit there could hold one; and a plan never
	// takes away a shard's last live standby in another region (or its last
	// live standby) -- a failover only warns, since the loss did that.
	if safety.AllowNoCrossRegionStandby {
		add(RuleCrossRegionSby, true, "not enforced: safety.allow_no_cross_region_standby is set")
	} else {
		regions := map[Kind]map[string]bool{KindRZone: {}, KindGZone: {}}
		for i, u := range a.units {
			if a.usable(int32(i)) && regions[u.Kind] != nil {
				regions[u.Kind][u.Region] = true
			}
		}
		// live standbys of primary pu among sbs: any, and in another region
		cover := func(pu int32, sbs []int32, live func(int32) bool) (anyLive, cross bool) {
			for _, sb := range sbs {
				if live(sb) {
					anyLive = true
					cross = cross || a.units[sb].Region != a.units[pu].Region
				}
			}
			return anyLive, cross
		}
		// Before the plan (and before any loss it fails over), every
		// listed standby counted.
		aliveBefore := func(int32) bool { return true }
		aliveAfter := a.usable
		var missing, degraded []string
		declared := map[Kind]map[string]bool{KindRZone: {}, KindGZone: {}}
		for i, u := range a.units {
			if !a.removed[i] && declared[u.Kind] != nil {
				declared[u.Kind][u.Region] = true
			}
		}
		declaredElsewhere := func(pu int32) bool {
			rs := declared[a.units[pu].Kind]
			return len(rs) > 1 || len(rs) == 1 && !rs[a.units[pu].Region]
		}
		for i := 0; i <= n; i++ {
			if i == n && !a.hasGlb {
				break
			}
			pi := a.primary[i]
			if a.lost[pi] || a.evac[pi] || a.removed[pi] {
				continue // the complete rule reports it
			}
			if busy(i) && !seen[shardAt(i)] {
				// The plan cannot touch it; it must still have a standby in
				// another region wherever the topology declares a unit of its
				// kind there (a new region can take that away).
				if declaredElsewhere(pi) && !slices.ContainsFunc(a.standbys[i], func(sb int32) bool { return a.units[sb].Region != a.units[pi].Region }) {
					sl, _ := m.slot(shardAt(i))
					missing = append(missing, fmt.Sprintf("%s (%s, so the plan cannot give it one)", ShardName(shardAt(i)), sl.state))
				}
				continue
			}
			anyAfter, crossAfter := cover(pi, a.standbys[i], aliveAfter)
			if crossAfter {
				continue
			}
			name := ShardName(shardAt(i))
			rs := regions[a.units[pi].Kind]
			if len(rs) > 1 || len(rs) == 1 && !rs[a.units[pi].Region] {
				missing = append(missing, name)
				continue
			}
			anyBefore, crossBefore := cover(m.slotPrimary(shardAt(i)), m.slotStandbys(shardAt(i)), aliveBefore)
			switch {
			case crossBefore:
				degraded = append(degraded, name+" loses its last live standby in another region")
			case anyBefore && !anyAfter:
				degraded = append(degraded, name+" loses its last live standby")
			}
		}
		switch {
		case len(missing) > 0:
			add(RuleCrossRegionSby, false, "no live standby in another region for %s, though a live unit there could hold one", list(missing))
		case len(degraded) > 0 && p.Kind == PlanFail:
			results = append(results, RuleResult{Rule: RuleCrossRegionSby, OK: true, Warning: true, Detail: fmt.Sprintf(
				"no live unit is left elsewhere to hold a standby: %s", list(degraded))})
		case len(degraded) > 0:
			add(RuleCrossRegionSby, false, "%s", list(degraded))
		default:
			add(RuleCrossRegionSby, true, "every shard keeps a live standby in another region where one exists")
		}
	}
	return results
}

// list joins up to 5 items and counts the rest.
func list(items []string) string {
	if len(items) <= 5 {
		return strings.Join(items, "; ")
	}
	return fmt.Sprintf("%s; and %d more", strings.Join(items[:5], "; "), len(items)-5)
}

// Apply returns the topology that plan p leads to: moves applied (epoch+1 on
// a primary change), an added unit declared, a removed unit deleted (with its
// region when it was the last unit there), and the version bumped. It refuses
// a plan computed for another version, and checks the result with Validate.
// Apply does not evaluate the safety rules: callers run only plans that
// passed them.
func (m *ShardMap) Apply(p *Plan) (*Topology, error) {
	if p.Version != m.version {
		return nil, fmt.Errorf("plan was computed for topology version %d, the topology is at version %d", p.Version, m.version)
	}
	t := m.topo.Clone()
	if p.AddRegion != "" {
		t.Regions = append(t.Regions, Region{Name: p.AddRegion})
	}
	if p.AddUnit != nil {
		t.Units = append(t.Units, *p.AddUnit)
	}
	pos := make(map[int]int, len(t.Assignments))
	for i, a := range t.Assignments {
		pos[a.Shard] = i
	}
	for _, mv := range p.Moves {
		i, ok := pos[mv.Shard]
		if !ok {
			return nil, fmt.Errorf("apply: %s is not assigned", ShardName(mv.Shard))
		}
		a := &t.Assignments[i]
		if a.Primary != mv.From || a.Epoch != mv.FromEpoch {
			return nil, fmt.Errorf("apply: %s: plan says primary %s epoch %d, the topology says %s epoch %d", ShardName(mv.Shard), mv.From, mv.FromEpoch, a.Primary, a.Epoch)
		}
		if mv.To != a.Primary {
			a.Epoch++
		}
		a.Primary = mv.To
		a.Standbys = slices.Clone(mv.Standbys)
	}
	if p.RemoveUnit != "" {
		region := ""
		t.Units = slices.DeleteFunc(t.Units, func(u Unit) bool {
			if u.Name == p.RemoveUnit {
				region = u.Region
				return true
			}
			return false
		})
		if !slices.ContainsFunc(t.Units, func(u Unit) bool { return u.Region == region }) {
			t.Regions = slices.DeleteFunc(t.Regions, func(r Region) bool { return r.Name == region })
		}
	}
	t.Version++
	if err := t.Validate(); err != nil {
		return nil, fmt.Errorf("apply: the plan leads to an invalid topology: %w", err)
	}
	return t, nil
}
