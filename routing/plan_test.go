package routing_test

import (
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
)

var propIters = flag.Int("prop.iters", 300, "random topologies per planner property test")

// genTopology builds a random valid topology: 1-4 regions, 1-4 rzone units
// each, gzone units in some regions, czone units where a gzone exists, and
// random assignments with a cross-region standby wherever one is possible.
func genTopology(r *rand.Rand) *routing.Topology {
	t := &routing.Topology{
		Version: uint64(1 + r.IntN(50)),
		Shards:  1 + r.IntN(300),
		Safety: routing.Safety{
			MaxUtilization:    []float64{0, 0.5, 0.8, 1}[r.IntN(4)],
			MinServingUnits:   r.IntN(3),
			MaxShardsInFlight: []int{0, 1, 3, 10, 1000}[r.IntN(5)],
		},
	}
	nr := 1 + r.IntN(4)
	var rz []routing.Unit
	var gz []routing.Unit
	for i := range nr {
		region := fmt.Sprintf("r%d", i)
		t.Regions = append(t.Regions, routing.Region{Name: region})
		for j := range 1 + r.IntN(4) {
			u := routing.Unit{Name: fmt.Sprintf("%s-u%d", region, j), Region: region, Kind: routing.KindRZone, CapacityRPS: float64(1000 * (1 + r.IntN(20)))}
			rz = append(rz, u)
		}
		if r.IntN(2) == 0 {
			gz = append(gz, routing.Unit{Name: region + "-g", Region: region, Kind: routing.KindGZone, CapacityRPS: 5000})
		}
	}
	t.Units = append(append(t.Units, rz...), gz...)
	if len(gz) > 0 {
		for _, rg := range t.Regions {
			if r.IntN(2) == 0 {
				t.Units = append(t.Units, routing.Unit{Name: rg.Name + "-c", Region: rg.Name, Kind: routing.KindCZone, CapacityRPS: 9000})
			}
		}
	}
	// A third of the topologies have shards in a handoff or blocked.
	busyOdds := 1 << 30
	if r.IntN(3) == 0 {
		busyOdds = 40
	}
	pick := func(units []routing.Unit) routing.Assignment {
		p := units[r.IntN(len(units))]
		var sbs []string
		others := slices.DeleteFunc(slices.Clone(units), func(u routing.Unit) bool { return u.Name == p.Name })
		r.Shuffle(len(others), func(i, j int) { others[i], others[j] = others[j], others[i] })
		// one cross-region standby when possible, then up to 2 more
		for _, o := range others {
			if o.Region != p.Region {
				sbs = append(sbs, o.Name)
				break
			}
		}
		for _, o := range others {
			if len(sbs) >= 1+r.IntN(3) {
				break
			}
			if !slices.Contains(sbs, o.Name) {
				sbs = append(sbs, o.Name)
			}
		}
		r.Shuffle(len(sbs), func(i, j int) { sbs[i], sbs[j] = sbs[j], sbs[i] })
		state := routing.StateServing
		switch r.IntN(busyOdds) {
		case 0:
			state = routing.StateBlocked
		case 1:
			state = routing.StateDraining
		}
		return routing.Assignment{Primary: p.Name, Standbys: sbs, Epoch: uint64(1 + r.IntN(9)), State: state}
	}
	for s := range t.Shards {
		a := pick(rz)
		a.Shard = s
		t.Assignments = append(t.Assignments, a)
	}
	if len(gz) > 0 {
		a := pick(gz)
		a.Shard = routing.GlobalShard
		t.Assignments = append(t.Assignments, a)
	}
	return t
}

func genLoad(r *rand.Rand, t *routing.Topology) routing.Observed {
	obs := routing.Observed{LoadRPS: map[string]float64{}}
	if r.IntN(3) == 0 {
		return obs
	}
	for _, u := range t.Units {
		if r.IntN(5) > 0 {
			obs.LoadRPS[u.Name] = u.CapacityRPS * r.Float64() * 0.6
		}
	}
	return obs
}

type planCase struct {
	name string
	plan func(m *routing.ShardMap, obs routing.Observed) (*routing.Plan, error)
}

func randomPlans(r *rand.Rand, t *routing.Topology) []planCase {
	region := t.Regions[r.IntN(len(t.Regions))].Name
	unit := t.Units[r.IntN(len(t.Units))].Name
	unit2 := t.Units[r.IntN(len(t.Units))].Name
	newUnit := routing.Unit{Name: "added", Region: region, Kind: []routing.Kind{routing.KindRZone, routing.KindRZone, routing.KindGZone}[r.IntN(3)], CapacityRPS: float64(1000 * (1 + r.IntN(30)))}
	return []planCase{
		{"evacuate-region " + region, func(m *routing.ShardMap, o routing.Observed) (*routing.Plan, error) {
			return routing.EvacuateRegion(m, region, o)
		}},
		{"evacuate-unit " + unit, func(m *routing.ShardMap, o routing.Observed) (*routing.Plan, error) {
			return routing.EvacuateUnit(m, unit, o)
		}},
		{"fail " + unit + "," + unit2, func(m *routing.ShardMap, o routing.Observed) (*routing.Plan, error) {
			return routing.FailUnits(m, []string{unit, unit2}, o)
		}},
		{"fail-region " + region, func(m *routing.ShardMap, o routing.Observed) (*routing.Plan, error) {
			return routing.FailRegion(m, region, o)
		}},
		{"remove-unit " + unit, func(m *routing.ShardMap, o routing.Observed) (*routing.Plan, error) {
			return routing.RemoveUnit(m, unit, o)
		}},
		{"add-unit " + string(newUnit.Kind) + " in " + region, func(m *routing.ShardMap, o routing.Observed) (*routing.Plan, error) {
			return routing.AddUnit(m, newUnit, o)
		}},
	}
}

// TestPlannerProperties runs every planner on random topologies and checks,
// independently of CheckPlan, what must hold after any plan that passes.
func TestPlannerProperties(t *testing.T) {
	passed, refused := map[string]int{}, map[string]int{}
	for seed := range uint64(*propIters) {
		r := rand.New(rand.NewPCG(seed, 42))
		topo := genTopology(r)
		m, err := routing.Compile(topo)
		if err != nil {
			t.Fatalf("seed %d: generated topology is invalid: %v", seed, err)
		}
		obs := genLoad(r, topo)
		for _, pc := range randomPlans(r, topo) {
			kind := strings.Fields(pc.name)[0]
			p, err := pc.plan(m, obs)
			var pe *routing.PlanError
			if errors.As(err, &pe) {
				continue
			}
			if p == nil {
				t.Fatalf("seed %d %s: no plan and error %v", seed, pc.name, err)
			}
			// Deterministic: the same input gives the same plan.
			p2, _ := pc.plan(m, obs)
			if p.Text() != p2.Text() {
				t.Fatalf("seed %d %s: two runs gave different plans", seed, pc.name)
			}
			var re *routing.RefusedError
			if errors.As(err, &re) {
				refused[kind]++
				if !p.Refused() || len(re.Broken) == 0 {
					t.Fatalf("seed %d %s: refused without a broken rule", seed, pc.name)
				}
				continue
			}
			if err != nil {
				t.Fatalf("seed %d %s: %v", seed, pc.name, err)
			}
			passed[kind]++
			checkPlanProperties(t, fmt.Sprintf("seed %d %s", seed, pc.name), m, topo, p, obs)
		}
	}
	t.Logf("passed %v refused %v", passed, refused)
	for _, k := range []string{"evacuate-region", "evacuate-unit", "fail", "fail-region", "remove-unit", "add-unit"} {
		if passed[k] == 0 {
			t.Errorf("no %s plan passed its rules: the generator does not exercise it", k)
		}
	}
}

func checkPlanProperties(t *testing.T, where string, m *routing.ShardMap, before *routing.Topology, p *routing.Plan, obs routing.Observed) {
	t.Helper()
	next, err := m.Apply(p)
	if err != nil {
		t.Fatalf("%s: apply: %v\n%s", where, err, p.Text())
	}
	if next.Version != before.Version+1 {
		t.Fatalf("%s: version %d -> %d, want +1", where, before.Version, next.Version)
	}
	if _, err := routing.Compile(next); err != nil { // exactly one primary per shard, every rule of Validate
		t.Fatalf("%s: result does not compile: %v", where, err)
	}
	moved := map[int]routing.Move{}
	for _, mv := range p.Moves {
		moved[mv.Shard] = mv
	}
	old := map[int]routing.Assignment{}
	for _, a := range before.Assignments {
		old[a.Shard] = a
	}
	unitOf := map[string]routing.Unit{}
	for _, u := range next.Units {
		unitOf[u.Name] = u
	}
	beforeRegion := map[string]string{} // regions of units, the removed one too
	for _, u := range before.Units {
		beforeRegion[u.Name] = u.Region
	}
	gone := map[string]bool{} // may not lead after the plan
	dead := map[string]bool{} // lost or removed: holds no live copy
	for _, u := range p.Lost {
		gone[u], dead[u] = true, true
	}
	for _, u := range p.Evacuated {
		gone[u] = true
	}
	if p.RemoveUnit != "" {
		gone[p.RemoveUnit], dead[p.RemoveUnit] = true, true
	}
	kindRegions := map[routing.Kind]map[string]bool{}
	for _, u := range next.Units {
		if !dead[u.Name] {
			if kindRegions[u.Kind] == nil {
				kindRegions[u.Kind] = map[string]bool{}
			}
			kindRegions[u.Kind][u.Region] = true
		}
	}
	perUnit := map[string]int{}
	for _, a := range before.Assignments {
		if a.Shard != routing.GlobalShard {
			perUnit[a.Primary]++
		}
	}
	load := map[string]float64{}
	for u, v := range obs.LoadRPS {
		load[u] = v
	}
	owners := map[string]bool{}
	for _, a := range next.Assignments {
		o := old[a.Shard]
		mv, isMoved := moved[a.Shard]
		switch {
		case !isMoved:
			if a.Primary != o.Primary || a.Epoch != o.Epoch || a.State != o.State || !slices.Equal(a.Standbys, o.Standbys) {
				t.Fatalf("%s: %s is not in the plan but changed: %+v -> %+v", where, routing.ShardName(a.Shard), o, a)
			}
		case a.Primary != o.Primary:
			if a.Epoch != o.Epoch+1 {
				t.Fatalf("%s: %s changed primary but epoch %d -> %d", where, routing.ShardName(a.Shard), o.Epoch, a.Epoch)
			}
			if !mv.CopyFirst && !slices.Contains(o.Standbys, a.Primary) {
				t.Fatalf("%s: %s moved to %s, which held no copy", where, routing.ShardName(a.Shard), a.Primary)
			}
			var l float64
			if a.Shard == routing.GlobalShard {
				l = obs.LoadRPS[o.Primary]
			} else {
				l = obs.LoadRPS[o.Primary] / float64(perUnit[o.Primary])
			}
			load[o.Primary] -= l
			load[a.Primary] += l
		default:
			if a.Epoch != o.Epoch {
				t.Fatalf("%s: %s kept its primary but epoch %d -> %d", where, routing.ShardName(a.Shard), o.Epoch, a.Epoch)
			}
		}
		// A draining or blocked shard is never touched; a failover leaves
		// the shards it cannot move (every copy lost, or busy) where they are.
		busy := o.State != routing.StateServing
		if busy && isMoved {
			t.Fatalf("%s: %s is %s but the plan moves it", where, routing.ShardName(a.Shard), o.State)
		}
		stranded := p.Kind == routing.PlanFail && dead[a.Primary] && (busy || !slices.ContainsFunc(o.Standbys, func(s string) bool { return !dead[s] }))
		if gone[a.Primary] && !stranded {
			t.Fatalf("%s: %s still led by %s, which the plan takes away", where, routing.ShardName(a.Shard), a.Primary)
		}
		// A lost unit stays a standby of a touched shard only as its last
		// copy in another region (or its last copy), after every live one.
		if isMoved {
			liveCross, seenLost := false, false
			for _, sb := range a.Standbys {
				switch {
				case dead[sb]:
					seenLost = true
				case seenLost:
					t.Fatalf("%s: %s lists live %s after a lost unit: %v", where, routing.ShardName(a.Shard), sb, a.Standbys)
				case unitOf[sb].Region != unitOf[a.Primary].Region:
					liveCross = true
				}
			}
			if seenLost && liveCross {
				t.Fatalf("%s: %s keeps a lost standby beside a live one in another region: %v", where, routing.ShardName(a.Shard), a.Standbys)
			}
		}
		for _, s := range a.Standbys {
			if s == p.RemoveUnit {
				t.Fatalf("%s: %s keeps removed unit %s as a standby", where, routing.ShardName(a.Shard), s)
			}
		}
		if a.Shard != routing.GlobalShard && !dead[a.Primary] {
			owners[a.Primary] = true
		}
		if stranded || busy {
			continue
		}
		// a standby in another region whenever a live unit there could hold one
		pu := unitOf[a.Primary]
		possible := false
		for reg := range kindRegions[pu.Kind] {
			if reg != pu.Region {
				possible = true
			}
		}
		if possible && !before.Safety.AllowNoCrossRegionStandby {
			ok := false
			for _, s := range a.Standbys {
				if !dead[s] && unitOf[s].Region != pu.Region {
					ok = true
				}
			}
			if !ok {
				t.Fatalf("%s: %s (primary %s in %s) has no standby in another region: %v", where, routing.ShardName(a.Shard), a.Primary, pu.Region, a.Standbys)
			}
		}
		// A planned move never takes away the last live cross-region standby.
		if p.Kind != routing.PlanFail && !before.Safety.AllowNoCrossRegionStandby {
			crossBefore, crossAfter := false, false
			for _, sb := range o.Standbys {
				crossBefore = crossBefore || beforeRegion[sb] != beforeRegion[o.Primary]
			}
			for _, sb := range a.Standbys {
				crossAfter = crossAfter || !dead[sb] && unitOf[sb].Region != pu.Region
			}
			if crossBefore && !crossAfter {
				t.Fatalf("%s: %s lost its last standby in another region: %v -> %v", where, routing.ShardName(a.Shard), o.Standbys, a.Standbys)
			}
		}
	}
	safety := before.Safety
	if safety.MaxUtilization == 0 {
		safety.MaxUtilization = routing.DefaultMaxUtilization
	}
	if safety.MaxShardsInFlight == 0 {
		safety.MaxShardsInFlight = routing.DefaultMaxShardsInFlight
	}
	for u, l := range load {
		if l > obs.LoadRPS[u]+1e-6 && l > unitOf[u].CapacityRPS*safety.MaxUtilization+1e-6 {
			t.Fatalf("%s: %s takes load up to %.0f rps, over %.0f%% of %.0f", where, u, l, 100*safety.MaxUtilization, unitOf[u].CapacityRPS)
		}
	}
	ownersBefore := map[string]bool{}
	for _, a := range before.Assignments {
		if a.Shard != routing.GlobalShard && !dead[a.Primary] {
			ownersBefore[a.Primary] = true
		}
	}
	if len(owners) < safety.MinServingUnits && len(owners) < len(ownersBefore) {
		t.Fatalf("%s: %d units own shards (before %d), minimum %d", where, len(owners), len(ownersBefore), safety.MinServingUnits)
	}
	waves := map[int]int{}
	for _, mv := range p.Moves {
		waves[mv.Wave]++
	}
	for w, c := range waves {
		if w < 1 || w > p.Waves || c > safety.MaxShardsInFlight {
			t.Fatalf("%s: wave %d of %d moves %d shards, limit %d", where, w, p.Waves, c, safety.MaxShardsInFlight)
		}
	}
	// Applying the plan again is refused: the version moved on.
	m2, _ := routing.Compile(next)
	if _, err := m2.Apply(p); err == nil {
		t.Fatalf("%s: a plan applied twice was accepted", where)
	}
}
