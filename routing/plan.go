package routing

import (
	"container/heap"
	"errors"
	"fmt"
	"math"
	"slices"
)

// PlanKind names what a plan does.
type PlanKind string

// Plan kinds.
const (
	PlanEvacuateRegion PlanKind = "evacuate-region"
	PlanEvacuateUnit   PlanKind = "evacuate-unit"
	PlanFail           PlanKind = "fail"
	PlanAddUnit        PlanKind = "add-unit"
	PlanRemoveUnit     PlanKind = "remove-unit"
)

// Observed is what planners know beyond the topology.
type Observed struct {
	// LoadRPS is the measured request rate per unit. A unit without a figure
	// counts as 0 rps, and the capacity rule says so.
	LoadRPS map[string]float64
	// Lost are units known to be down: no plan makes them primary or counts
	// them as a live copy. A topology file does not record health, so a
	// later plan must be told again.
	Lost []string
}

// Move changes one shard: its primary (From -> To, epoch+1), its standbys,
// or both. A move with From == To only changes standbys.
type Move struct {
	Shard     int      `json:"shard"`
	Global    bool     `json:"global,omitempty"`
	From      string   `json:"from"`
	To        string   `json:"to"`
	FromEpoch uint64   `json:"from_epoch"`
	ToEpoch   uint64   `json:"to_epoch"`
	Standbys  []string `json:"standbys"`
	// OldStandbys are the standbys before the move.
	OldStandbys []string `json:"old_standbys"`
	// CopyFirst: To holds no copy of the shard yet. The handoff must add it
	// as a standby and wait until it is in sync before promoting it.
	CopyFirst bool `json:"copy_first,omitempty"`
	// Wave is the 1-based wave the move runs in; moves of one wave are in
	// flight at once.
	Wave int `json:"wave"`
}

// PrimaryChange reports whether the move changes the shard's primary.
func (mv *Move) PrimaryChange() bool { return mv.From != mv.To }

// Plan is a set of moves computed against one topology version. It changes
// nothing until Apply.
type Plan struct {
	Kind PlanKind `json:"kind"`
	// Target is the region or unit the plan is about.
	Target string `json:"target"`
	// Version is the topology version the plan was computed from; Apply
	// refuses any other.
	Version uint64 `json:"version"`
	Moves   []Move `json:"moves"`
	Waves   int    `json:"waves"`
	// AddUnit is the unit an add-unit plan declares, and AddRegion its
	// region when the topology has no region of that name yet.
	AddUnit   *Unit  `json:"add_unit,omitempty"`
	AddRegion string `json:"add_region,omitempty"`
	// RemoveUnit is the unit a remove-unit plan deletes.
	RemoveUnit string `json:"remove_unit,omitempty"`
	// Lost are units taken as lost (fail plans); Evacuated units keep no
	// primary but may hold standbys.
	Lost      []string `json:"lost,omitempty"`
	Evacuated []string `json:"evacuated,omitempty"`
	// Rules are the safety rules evaluated on the plan.
	Rules []RuleResult `json:"rules"`
}

// Refused reports whether a safety rule refuses the plan. Warnings do not.
func (p *Plan) Refused() bool {
	for _, r := range p.Rules {
		if !r.OK {
			return true
		}
	}
	return false
}

// RefusedError says which safety rules refuse a plan. The plan itself is
// returned beside it, for a dry run to show.
type RefusedError struct {
	Kind   PlanKind
	Target string
	Broken []RuleResult
}

func (e *RefusedError) Error() string {
	s := fmt.Sprintf("plan %s %s refused: ", e.Kind, e.Target)
	for i, r := range e.Broken {
		if i > 0 {
			s += "; "
		}
		s += r.Rule + ": " + r.Detail
	}
	return s
}

// ErrUnknown is wrapped by errors for an unknown region or unit.
var ErrUnknown = errors.New("unknown")

// PlanError is a plan request that makes no sense for the topology, such as
// an unknown region; no plan exists.
type PlanError struct {
	Msg string
	Err error
}

func (e *PlanError) Error() string { return e.Msg }
func (e *PlanError) Unwrap() error { return e.Err }

func planErr(err error, format string, args ...any) error {
	return &PlanError{Msg: fmt.Sprintf(format, args...), Err: err}
}

// planner holds the working state of one plan.
type planner struct {
	m     *ShardMap
	units []Unit // m.units, plus an added unit
	obs   Observed
	plan  *Plan

	lost, evac, removed []bool // by unit index

	// working assignment, copied on write
	primary  []int32
	standbys [][]int32
	gPrimary int32
	gStandby []int32

	load      []float64 // estimated current load per unit, updated by moves
	shardLoad []float64 // per shard, from the original primary
	gLoad     float64
	count     []int // primaries per unit, updated

	cursor map[Kind]int // round-robin over units for new standbys
	moved  map[int]int  // shard -> index in plan.Moves
}

func newPlanner(m *ShardMap, kind PlanKind, target string, obs Observed, extra *Unit) *planner {
	units := m.units
	if extra != nil {
		units = append(slices.Clip(slices.Clone(m.units)), *extra)
	}
	p := &planner{
		m: m, units: units, obs: obs,
		plan:    &Plan{Kind: kind, Target: target, Version: m.version, AddUnit: extra},
		lost:    make([]bool, len(units)),
		evac:    make([]bool, len(units)),
		removed: make([]bool, len(units)),
		primary: make([]int32, m.n), standbys: make([][]int32, m.n),
		load: make([]float64, len(units)), shardLoad: make([]float64, m.n),
		count:  make([]int, len(units)),
		cursor: map[Kind]int{},
		moved:  map[int]int{},
	}
	for s := range m.slots {
		p.primary[s] = m.slots[s].primary
		p.standbys[s] = m.slots[s].standbys
		p.count[m.slots[s].primary]++
	}
	if m.hasGlb {
		p.gPrimary, p.gStandby = m.global.primary, m.global.standbys
	}
	for i, u := range units {
		p.load[i] = obs.LoadRPS[u.Name]
	}
	for s := range m.slots {
		u := m.slots[s].primary
		p.shardLoad[s] = p.load[u] / float64(p.count[u])
	}
	if m.hasGlb {
		p.gLoad = p.load[m.global.primary]
	}
	return p
}

func (p *planner) get(shard int) (int32, []int32) {
	if shard == GlobalShard {
		return p.gPrimary, p.gStandby
	}
	return p.primary[shard], p.standbys[shard]
}

func (p *planner) shardLoadOf(shard int) float64 {
	if shard == GlobalShard {
		return p.gLoad
	}
	return p.shardLoad[shard]
}

func (p *planner) names(us []int32) []string {
	out := make([]string, len(us))
	for i, u := range us {
		out[i] = p.units[u].Name
	}
	return out
}

// set records the shard's new primary and standbys as a move.
func (p *planner) set(shard int, to int32, sbs []int32, copyFirst bool) {
	from, old := p.get(shard)
	if from == to && slices.Equal(old, sbs) {
		return
	}
	if shard == GlobalShard {
		p.gPrimary, p.gStandby = to, sbs
	} else {
		p.primary[shard], p.standbys[shard] = to, sbs
	}
	if from != to {
		l := p.shardLoadOf(shard)
		p.load[from] -= l
		p.load[to] += l
		if shard != GlobalShard {
			p.count[from]--
			p.count[to]++
		}
	}
	if i, ok := p.moved[shard]; ok { // a shard moves once per plan: merge
		mv := &p.plan.Moves[i]
		mv.To, mv.Standbys = p.units[to].Name, p.names(sbs)
		mv.ToEpoch = mv.FromEpoch
		if mv.From != mv.To {
			mv.ToEpoch++
		}
		mv.CopyFirst = mv.CopyFirst || copyFirst
		return
	}
	sl, _ := p.m.slot(shard)
	mv := Move{
		Shard: shard, Global: shard == GlobalShard,
		From: p.units[from].Name, To: p.units[to].Name,
		FromEpoch: sl.epoch, ToEpoch: sl.epoch,
		Standbys: p.names(sbs), OldStandbys: p.names(old),
		CopyFirst: copyFirst,
	}
	if from != to {
		mv.ToEpoch++
	}
	p.moved[shard] = len(p.plan.Moves)
	p.plan.Moves = append(p.plan.Moves, mv)
}

// busy reports whether a shard is in a handoff (draining) or blocked: a plan
// leaves it alone until its handoff ends or an operator resolves it.
func (p *planner) busy(shard int) bool {
	s, _ := p.m.slot(shard)
	return s.state != StateServing
}

// usable reports whether unit u may hold a copy of data (not lost or removed).
func (p *planner) usable(u int32) bool { return !p.lost[u] && !p.removed[u] }

// canLead reports whether unit u may be a primary after the plan.
func (p *planner) canLead(u int32) bool { return p.usable(u) && !p.evac[u] }

func (p *planner) headroom(u int32, add float64) bool {
	c := p.units[u].CapacityRPS * p.m.topo.Safety.withDefaults().MaxUtilization
	return p.load[u]+add <= c
}

// pickStandby returns the standby of the shard that should take over: the
// first, in standby order, that may lead and has headroom; else the first
// that may lead; else -1.
func (p *planner) pickStandby(shard int) int32 {
	_, sbs := p.get(shard)
	first := int32(-1)
	l := p.shardLoadOf(shard)
	for _, s := range sbs {
		if !p.canLead(s) {
			continue
		}
		if p.headroom(s, l) {
			return s
		}
		if first < 0 {
			first = s
		}
	}
	return first
}

// fixStandbys returns the standby list for a shard whose primary becomes
// newPrimary: the old standbys and then keep (the old primary, which still
// holds a copy), without newPrimary and removed units; plus one live unit
// when no live standby is in another region and one could be, or when no
// live standby is left at all. Lost units are dropped, except where one is
// the shard's only copy in another region (or its only copy at all): then it
// stays last, to catch up if it returns.
func (p *planner) fixStandbys(shard int, newPrimary int32, keep int32) []int32 {
	_, old := p.get(shard)
	live := make([]int32, 0, len(old)+2)
	var lost []int32
	consider := func(s int32) {
		if s < 0 || s == newPrimary || p.removed[s] || slices.Contains(live, s) || slices.Contains(lost, s) {
			return
		}
		if p.lost[s] {
			lost = append(lost, s)
		} else {
			live = append(live, s)
		}
	}
	for _, s := range old {
		consider(s)
	}
	consider(keep)
	if !p.allowSameRegion() && !p.hasLiveCross(newPrimary, live) {
		if u := p.nextStandby(p.kindOf(shard), newPrimary, append(live, lost...), true); u >= 0 {
			live = append(live, u)
		}
	}
	if len(live) == 0 {
		if u := p.nextStandby(p.kindOf(shard), newPrimary, lost, false); u >= 0 {
			live = append(live, u)
		}
	}
	region := p.units[newPrimary].Region
	if !p.allowSameRegion() && !p.hasLiveCross(newPrimary, live) {
		for _, s := range lost {
			if p.units[s].Region != region {
				live = append(live, s)
			}
		}
	}
	if len(live) == 0 {
		live = append(live, lost...)
	}
	return live
}

func (p *planner) kindOf(shard int) Kind {
	if shard == GlobalShard {
		return KindGZone
	}
	return KindRZone
}

func (p *planner) hasLiveCross(primary int32, sbs []int32) bool {
	region := p.units[primary].Region
	for _, s := range sbs {
		if p.usable(s) && p.units[s].Region != region {
			return true
		}
	}
	return false
}

// standbysOK reports whether a shard that keeps its primary can keep its
// standbys as they are: the plan concerns them only when one is lost or
// removed. Shards the plan has nothing to do with are never rewritten.
func (p *planner) standbysOK(sbs []int32) bool {
	for _, s := range sbs {
		if p.removed[s] || p.lost[s] {
			return false // fixStandbys decides whether a lost unit stays
		}
	}
	return true
}

func (p *planner) allowSameRegion() bool { return p.m.topo.Safety.AllowNoCrossRegionStandby }

// markLost takes units known to be lost (Observed.Lost, or a failover's
// targets) out of leading and of data-safe targets.
func (p *planner) markLost(names []string) error {
	for _, name := range names {
		u, ok := p.m.unitIndex[name]
		if !ok {
			return planErr(ErrUnknown, "lost unit %q is not in the topology", name)
		}
		if !p.lost[u] {
			p.lost[u] = true
			p.plan.Lost = append(p.plan.Lost, name)
		}
	}
	return nil
}

// nextStandby picks, round robin, a usable unit of the kind that is not the
// primary nor already listed, in another region when crossRegion. Units that
// may lead are preferred over evacuated ones.
func (p *planner) nextStandby(kind Kind, primary int32, have []int32, crossRegion bool) int32 {
	region := p.units[primary].Region
	n := len(p.units)
	for pass := 0; pass < 2; pass++ {
		start := p.cursor[kind]
		for i := 0; i < n; i++ {
			u := int32((start + i) % n)
			un := &p.units[u]
			if un.Kind != kind || u == primary || !p.usable(u) || slices.Contains(have, u) {
				continue
			}
			if pass == 0 && p.evac[u] {
				continue
			}
			if crossRegion && un.Region == region {
				continue
			}
			p.cursor[kind] = int(u) + 1
			return u
		}
	}
	return -1
}

// moveAway moves every shard led by a unit that may no longer lead to one
// of its standbys, and fixes the standbys of every shard that lists a unit
// that can no longer serve as one. The old primary stays as a standby
// unless it is removed.
func (p *planner) moveAway() {
	n := p.m.n
	for shard := GlobalShard; shard < n; shard++ {
		if shard == GlobalShard && !p.m.hasGlb {
			continue
		}
		if p.busy(shard) {
			continue // the complete rule reports it when it had to move
		}
		pri, sbs := p.get(shard)
		if !p.canLead(pri) {
			to := p.pickStandby(shard)
			if to < 0 {
				continue // the completeness rule reports it
			}
			p.set(shard, to, p.fixStandbys(shard, to, pri), false)
			continue
		}
		if !p.standbysOK(sbs) {
			p.set(shard, pri, p.fixStandbys(shard, pri, -1), false)
		}
	}
}

func (m *ShardMap) unitsOf(region string) []int32 {
	var out []int32
	for i, u := range m.units {
		if u.Region == region {
			out = append(out, int32(i))
		}
	}
	return out
}

func (m *ShardMap) hasRegion(r string) bool {
	for _, x := range m.topo.Regions {
		if x.Name == r {
			return true
		}
	}
	return false
}

// EvacuateRegion plans moving every shard (and the gzone writer) whose
// primary is in region to a standby in another region. The region's units
// stay as standbys, so a restore can move shards back without a copy.
func EvacuateRegion(m *ShardMap, region string, obs Observed) (*Plan, error) {
	if !m.hasRegion(region) {
		return nil, planErr(ErrUnknown, "region %q is not in the topology", region)
	}
	p := newPlanner(m, PlanEvacuateRegion, region, obs, nil)
	if err := p.markLost(obs.Lost); err != nil {
		return nil, err
	}
	for _, u := range m.unitsOf(region) {
		p.evac[u] = true
		p.plan.Evacuated = append(p.plan.Evacuated, m.units[u].Name)
	}
	p.moveAway()
	return p.finish()
}

// EvacuateUnit plans moving every shard led by unit to one of its standbys.
// The unit stays as a standby.
func EvacuateUnit(m *ShardMap, unit string, obs Observed) (*Plan, error) {
	u, ok := m.unitIndex[unit]
	if !ok {
		return nil, planErr(ErrUnknown, "unit %q is not in the topology", unit)
	}
	if m.units[u].Kind == KindCZone {
		return nil, planErr(nil, "unit %q is a czone unit: it holds a read copy and no shards, so there is nothing to evacuate; to stop routing to it, remove it (plan remove-unit)", unit)
	}
	p := newPlanner(m, PlanEvacuateUnit, unit, obs, nil)
	if err := p.markLost(obs.Lost); err != nil {
		return nil, err
	}
	p.evac[u] = true
	p.plan.Evacuated = []string{unit}
	p.moveAway()
	return p.finish()
}

// FailUnits plans the failover of lost units: every shard they lead moves to
// its first live standby with headroom, and they are dropped from standby
// lists (with a new standby where a shard would keep none in another region)
// unless a lost unit is a shard's only copy elsewhere. Shards with no live
// copy, or draining or blocked, stay where they are with a warning.
func FailUnits(m *ShardMap, lost []string, obs Observed) (*Plan, error) {
	if len(lost) == 0 {
		return nil, planErr(nil, "no lost unit given")
	}
	target := lost[0]
	if len(lost) > 1 {
		target = fmt.Sprintf("%s (+%d more)", lost[0], len(lost)-1)
	}
	p := newPlanner(m, PlanFail, target, obs, nil)
	for _, name := range lost {
		if _, ok := m.unitIndex[name]; !ok {
			return nil, planErr(ErrUnknown, "unit %q is not in the topology", name)
		}
	}
	if err := p.markLost(append(slices.Clone(lost), obs.Lost...)); err != nil {
		return nil, err
	}
	p.moveAway()
	return p.finish()
}

// FailRegion plans the failover of every unit of a lost region.
func FailRegion(m *ShardMap, region string, obs Observed) (*Plan, error) {
	if !m.hasRegion(region) {
		return nil, planErr(ErrUnknown, "region %q is not in the topology", region)
	}
	var names []string
	for _, u := range m.unitsOf(region) {
		names = append(names, m.units[u].Name)
	}
	p, err := FailUnits(m, names, obs)
	if p != nil {
		p.Target = region
	}
	var re *RefusedError
	if errors.As(err, &re) {
		re.Target = region
	}
	return p, err
}

// RemoveUnit plans deleting unit from the topology: every shard it leads
// moves to one of its standbys, and standby lists that name it get another
// unit where a shard would keep no standby in another region.
func RemoveUnit(m *ShardMap, unit string, obs Observed) (*Plan, error) {
	u, ok := m.unitIndex[unit]
	if !ok {
		return nil, planErr(ErrUnknown, "unit %q is not in the topology", unit)
	}
	p := newPlanner(m, PlanRemoveUnit, unit, obs, nil)
	if err := p.markLost(obs.Lost); err != nil {
		return nil, err
	}
	p.removed[u] = true
	p.plan.RemoveUnit = unit
	p.moveAway()
	return p.finish()
}

// AddUnit plans declaring a new unit (and its region, when the topology
// has none of that name) and, for an rzone unit, a rebalance with the fewest
// moves: it moves to the new unit its capacity-weighted share of the shards,
// each taken from the unit most above its own share. Shards that can now
// keep a standby in another region, and could not before, get the new unit
// as one. Moves to and standbys on the new unit copy first: it holds no data
// yet. Shards in a handoff or blocked are left alone.
func AddUnit(m *ShardMap, u Unit, obs Observed) (*Plan, error) {
	if u.Kind == "" {
		u.Kind = KindRZone
	}
	var ps problems
	regions := make(map[string]bool, len(m.topo.Regions)+1)
	for _, r := range m.topo.Regions {
		regions[r.Name] = true
	}
	newRegion := ""
	if u.Region != "" && !regions[u.Region] {
		if !ValidName(u.Region) {
			ps.add(regionSubject(u.Region), "invalid name: use 1-63 lowercase letters, digits and '-', starting with a letter")
		}
		if _, clash := m.unitIndex[u.Region]; clash || u.Region == u.Name {
			ps.add(regionSubject(u.Region), "has the name of a unit; give regions their own names")
		}
		newRegion = u.Region
		regions[u.Region] = true
	}
	_, dup := m.unitIndex[u.Name]
	validateUnit(u, regions, dup, &ps)
	switch {
	case u.Kind == KindCZone && !m.hasGlb:
		ps.add(unitSubject(u.Name), "a czone unit is a read copy of gzone data, and the topology has no gzone writer")
	case u.Kind == KindGZone && !m.hasGlb:
		ps.add(unitSubject(u.Name), "the topology has no global assignment: declare the first gzone unit and its global assignment in the topology file")
	}
	if len(ps) > 0 {
		err := &ValidationError{Problems: ps}
		return nil, planErr(err, "cannot add unit %q: %v", u.Name, err)
	}
	p := newPlanner(m, PlanAddUnit, u.Name, obs, &u)
	p.plan.AddRegion = newRegion
	if err := p.markLost(obs.Lost); err != nil {
		return nil, err
	}
	if u.Kind == KindRZone {
		p.rebalanceTo(int32(len(p.units) - 1))
	}
	// The new unit becomes the standby in another region of shards that
	// have none: a valid topology lacks one only where no region could
	// hold it, which the new unit has changed.
	nu := int32(len(p.units) - 1)
	for shard := GlobalShard; shard < m.n && !p.allowSameRegion(); shard++ {
		if shard == GlobalShard && !m.hasGlb || p.busy(shard) || p.kindOf(shard) != u.Kind {
			continue
		}
		if pri, sbs := p.get(shard); !p.hasLiveCross(pri, sbs) && p.units[pri].Region != u.Region {
			p.set(shard, pri, append(slices.Clone(sbs), nu), false)
		}
	}
	return p.finish()
}

// rebalanceTo moves shards to the new unit nu until it holds its share.
func (p *planner) rebalanceTo(nu int32) {
	var total float64
	var members []int32
	for i := range p.units {
		u := int32(i)
		if p.units[i].Kind == KindRZone && p.canLead(u) {
			total += p.units[i].CapacityRPS
			members = append(members, u)
		}
	}
	n := float64(p.m.n)
	share := func(u int32) float64 { return n * p.units[u].CapacityRPS / total }
	want := int(math.Floor(share(nu) + 0.5))
	if want == 0 {
		return
	}
	// shards of each donor, highest first taken last
	owned := make([][]int, len(p.units))
	for s := 0; s < p.m.n; s++ {
		if !p.busy(s) {
			owned[p.primary[s]] = append(owned[p.primary[s]], s)
		}
	}
	h := &surplusHeap{}
	for _, u := range members {
		if u != nu && len(owned[u]) > 0 {
			*h = append(*h, donor{u: u, surplus: float64(p.count[u]) - share(u)})
		}
	}
	heap.Init(h)
	for moved := 0; moved < want && h.Len() > 0; moved++ {
		d := heap.Pop(h).(donor)
		list := owned[d.u]
		s := list[len(list)-1]
		owned[d.u] = list[:len(list)-1]
		p.set(s, nu, p.fixStandbys(s, nu, p.primary[s]), true) // the old primary holds the data: it stays a standby
		if len(owned[d.u]) > 0 {
			d.surplus--
			heap.Push(h, d)
		}
	}
}

type donor struct {
	u       int32
	surplus float64
}

type surplusHeap []donor

func (h surplusHeap) Len() int { return len(h) }
func (h surplusHeap) Less(i, j int) bool {
	if h[i].surplus != h[j].surplus {
		return h[i].surplus > h[j].surplus
	}
	return h[i].u < h[j].u
}
func (h surplusHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *surplusHeap) Push(x any)   { *h = append(*h, x.(donor)) }
func (h *surplusHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// finish orders the moves into waves, checks the safety rules, and returns
// the plan, with a *RefusedError when a rule breaks.
func (p *planner) finish() (*Plan, error) {
	plan := p.plan
	if plan.Moves == nil {
		plan.Moves = []Move{}
	}
	// primary changes first (the global writer first of all), then standby-only
	// changes; by shard within each.
	slices.SortStableFunc(plan.Moves, func(a, b Move) int {
		ap, bp := a.PrimaryChange(), b.PrimaryChange()
		if ap != bp {
			if ap {
				return -1
			}
			return 1
		}
		return a.Shard - b.Shard
	})
	limit := p.m.topo.Safety.withDefaults().MaxShardsInFlight
	for i := range plan.Moves {
		plan.Moves[i].Wave = i/limit + 1
	}
	if len(plan.Moves) > 0 {
		plan.Waves = plan.Moves[len(plan.Moves)-1].Wave
	}
	plan.Rules = CheckPlan(p.m, plan, p.obs)
	var broken []RuleResult
	for _, r := range plan.Rules {
		if !r.OK {
			broken = append(broken, r)
		}
	}
	if len(broken) > 0 {
		return plan, &RefusedError{Kind: plan.Kind, Target: plan.Target, Broken: broken}
	}
	return plan, nil
}
