package routing_test

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
)

func rule(p *routing.Plan, name string) routing.RuleResult {
	for _, r := range p.Rules {
		if r.Rule == name {
			return r
		}
	}
	return routing.RuleResult{Rule: name, OK: true, Detail: "(rule not evaluated)"}
}

// TestSafetyRules breaks each safety rule on purpose and checks that the
// plan is refused by that rule, with a detail naming what broke it.
func TestSafetyRules(t *testing.T) {
	evacEU := func(m *routing.ShardMap, obs routing.Observed) (*routing.Plan, error) {
		return routing.EvacuateRegion(m, "eu-west", obs)
	}
	tests := []struct {
		name   string
		topo   func(*routing.Topology)
		obs    routing.Observed
		plan   func(*routing.ShardMap, routing.Observed) (*routing.Plan, error)
		tamper func(*routing.Plan, *routing.ShardMap) *routing.ShardMap // may return another map to check against
		rule   string
		detail string
	}{
		{
			name: "capacity",
			// ap-south-1 takes shards 34-43 up to its limit; us-east-1, the
			// second standby, has no room either: the rest overflow ap-south-1.
			obs:  routing.Observed{LoadRPS: map[string]float64{"eu-west-1": 17000, "ap-south-1": 10000, "us-east-1": 31500}},
			plan: evacEU, rule: routing.RuleCapacity, detail: "ap-south-1 would carry 27000 rps, 108.0% of its 25000 rps capacity",
		},
		{
			name: "min_serving_units",
			topo: func(tp *routing.Topology) { tp.Safety.MinServingUnits = 5 },
			plan: evacEU, rule: routing.RuleMinServing, detail: "4 rzone units would own shards, the minimum is 5",
		},
		{
			// The planner leaves a draining shard alone, so the evacuation
			// cannot complete.
			name: "complete_when_draining",
			topo: func(tp *routing.Topology) { tp.Assignments[40].State = routing.StateDraining },
			plan: evacEU, rule: routing.RuleComplete, detail: "shard 40 stays on eu-west-1 (draining)",
		},
		{
			name: "complete_when_blocked",
			topo: func(tp *routing.Topology) { tp.Assignments[41].State = routing.StateBlocked },
			plan: evacEU, rule: routing.RuleComplete, detail: "shard 41 stays on eu-west-1 (blocked)",
		},
		{
			// A hand-made plan that moves a draining shard.
			name: "one_handoff_per_shard",
			topo: func(tp *routing.Topology) { tp.Assignments[40].State = routing.StateDraining },
			plan: func(m *routing.ShardMap, obs routing.Observed) (*routing.Plan, error) {
				return routing.EvacuateUnit(m, "eu-west-2", obs) // shard 40 is not in it
			},
			tamper: func(p *routing.Plan, m *routing.ShardMap) *routing.ShardMap {
				p.Moves = append(p.Moves, routing.Move{Shard: 40, From: "eu-west-1", To: "ap-south-1", FromEpoch: 1, ToEpoch: 2,
					Standbys: []string{"us-east-1", "eu-west-1"}, Wave: p.Waves + 1})
				return m
			},
			rule: routing.RuleOneHandoff, detail: "shard 40 (draining)",
		},
		{
			// Removing the only unit of region us-east... of a two-region
			// topology takes away every shard's standby in another region.
			name: "cross_region_standby_lost_by_remove",
			topo: func(tp *routing.Topology) {
				*tp = *twoRegionTopology()
			},
			plan: func(m *routing.ShardMap, obs routing.Observed) (*routing.Plan, error) {
				return routing.RemoveUnit(m, "b-1", obs)
			},
			rule: routing.RuleCrossRegionSby, detail: "shard 0 loses its last live standby in another region",
		},
		{
			name: "complete_when_no_standby_elsewhere",
			topo: func(tp *routing.Topology) {
				tp.Safety.AllowNoCrossRegionStandby = true
				tp.Assignments[35].Standbys = []string{"eu-west-2"}
			},
			plan: evacEU, rule: routing.RuleComplete, detail: "shard 35 stays on eu-west-1",
		},
		{
			name: "shards_in_flight",
			plan: evacEU,
			tamper: func(p *routing.Plan, m *routing.ShardMap) *routing.ShardMap {
				for i := range p.Moves {
					p.Moves[i].Wave = 1
				}
				return m
			},
			rule: routing.RuleInFlight, detail: "a wave moves 34 shards at once, the limit is 10",
		},
		{
			name: "data_safe_target",
			plan: evacEU,
			tamper: func(p *routing.Plan, m *routing.ShardMap) *routing.ShardMap {
				p.Moves[0].To = "us-east-2" // shard 34: standbys are ap-south-1, us-east-1
				p.Moves[0].Standbys = []string{"ap-south-1"}
				return m
			},
			rule: routing.RuleDataSafe, detail: "shard 34 -> us-east-2",
		},
		{
			name: "cross_region_standby",
			plan: evacEU,
			tamper: func(p *routing.Plan, m *routing.ShardMap) *routing.ShardMap {
				p.Moves[0].Standbys = []string{"ap-south-2"} // new primary ap-south-1
				return m
			},
			rule: routing.RuleCrossRegionSby, detail: "shard 34",
		},
		{
			name: "moves_valid_unknown_unit",
			plan: evacEU,
			tamper: func(p *routing.Plan, m *routing.ShardMap) *routing.ShardMap {
				p.Moves[3].To = "mars-1"
				return m
			},
			rule: routing.RuleMovesValid, detail: `target "mars-1" is not a rzone unit`,
		},
		{
			name: "moves_valid_epoch",
			plan: evacEU,
			tamper: func(p *routing.Plan, m *routing.ShardMap) *routing.ShardMap {
				p.Moves[1].ToEpoch = 7
				return m
			},
			rule: routing.RuleMovesValid, detail: "epoch 1 -> 7, want 2",
		},
		{
			name: "version",
			plan: evacEU,
			tamper: func(p *routing.Plan, m *routing.ShardMap) *routing.ShardMap {
				tp := m.Topology()
				tp.Version++
				m2, _ := routing.Compile(tp)
				return m2
			},
			rule: routing.RuleVersion, detail: "computed for topology version 1, the topology is at version 2",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			topo := exampleTopology(t)
			if tc.topo != nil {
				tc.topo(topo)
			}
			m := mustCompile(t, topo)
			p, err := tc.plan(m, tc.obs)
			if tc.tamper != nil {
				if err != nil {
					t.Fatalf("untampered plan: %v", err)
				}
				m2 := tc.tamper(p, m)
				p.Rules = routing.CheckPlan(m2, p, tc.obs)
			} else {
				var re *routing.RefusedError
				if !errors.As(err, &re) {
					t.Fatalf("want a refusal, got %v\n%s", err, p.Text())
				}
				if re.Broken[0].Rule != tc.rule && !strings.Contains(err.Error(), tc.rule) {
					t.Errorf("refused by %v, want %s", err, tc.rule)
				}
			}
			r := rule(p, tc.rule)
			if r.OK {
				t.Fatalf("rule %s holds, want it broken:\n%s", tc.rule, p.Text())
			}
			if !strings.Contains(r.Detail, tc.detail) {
				t.Errorf("rule %s detail %q does not mention %q", tc.rule, r.Detail, tc.detail)
			}
			if !p.Refused() {
				t.Error("plan with a broken rule is not Refused()")
			}
			for _, other := range p.Rules {
				if other.Rule != tc.rule && !other.OK && tc.tamper == nil {
					t.Errorf("rule %s also broke: %s", other.Rule, other.Detail)
				}
			}
		})
	}
}

// TestFailStrandedShardsWarn: when every copy of some shards is lost, the
// failover still moves the others and warns about the stranded ones.
func TestFailStrandedShardsWarn(t *testing.T) {
	m := mustCompile(t, exampleTopology(t))
	p, err := routing.FailUnits(m, []string{"us-east-1", "eu-west-1", "ap-south-1"}, routing.Observed{})
	if err != nil {
		t.Fatalf("fail plan refused: %v", err)
	}
	r := rule(p, routing.RuleComplete)
	// Shards 0-16 (us-east-1), 34-50 (eu-west-1) and 68-83 (ap-south-1) have
	// every copy on a lost unit.
	if !r.OK || !r.Warning || !strings.Contains(r.Detail, "50 shard(s) stay down") {
		t.Fatalf("complete rule = %+v, want a warning about 50 shards", r)
	}
	next, err := m.Apply(p)
	if err != nil {
		t.Fatal(err)
	}
	nm := mustCompile(t, next)
	for s := 0; s < 100; s++ {
		o, _ := nm.Lookup(s)
		stranded := s <= 16 || s >= 34 && s <= 50 || s >= 68 && s <= 83
		was, _ := m.Lookup(s)
		switch {
		case stranded && o.Unit != was.Unit:
			t.Errorf("shard %d moved to %s though no live copy existed", s, o.Unit)
		case !stranded && (o.Unit == "us-east-1" || o.Unit == "eu-west-1" || o.Unit == "ap-south-1"):
			t.Errorf("shard %d stays on lost unit %s", s, o.Unit)
		}
	}
	if !strings.Contains(p.Text(), "WARN") {
		t.Errorf("text does not show the warning:\n%s", p.Text())
	}
}

// TestEvacuateKeepsOldPrimaryAsStandby: evacuated units stay standbys, so a
// restore is a move back without a copy; the epoch rises by one.
func TestEvacuateKeepsOldPrimaryAsStandby(t *testing.T) {
	m := mustCompile(t, exampleTopology(t))
	p, err := routing.EvacuateUnit(m, "eu-west-1", routing.Observed{})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Moves) != 17 {
		t.Fatalf("%d moves, want 17 (shards 34-50)", len(p.Moves))
	}
	for _, mv := range p.Moves {
		if mv.To != "ap-south-1" || mv.ToEpoch != mv.FromEpoch+1 || mv.Standbys[len(mv.Standbys)-1] != "eu-west-1" {
			t.Errorf("move %+v: want to ap-south-1 (first standby), epoch+1, eu-west-1 last standby", mv)
		}
	}
}

// TestAddUnitFewestMoves: the new unit gets its capacity share and every
// move goes to it.
func TestAddUnitFewestMoves(t *testing.T) {
	m := mustCompile(t, exampleTopology(t))
	p, err := routing.AddUnit(m, routing.Unit{Name: "us-east-3", Region: "us-east", Kind: routing.KindRZone, CapacityRPS: 40000}, routing.Observed{})
	if err != nil {
		t.Fatal(err)
	}
	// rzone capacity 190k + 40k: share = 100*40/230 = 17.4 -> 17 shards
	if len(p.Moves) != 17 {
		t.Fatalf("%d moves, want 17", len(p.Moves))
	}
	for _, mv := range p.Moves {
		if mv.To != "us-east-3" || !mv.CopyFirst {
			t.Errorf("move %+v: want to us-east-3, copy first", mv)
		}
	}
	// After the plan every rzone unit holds its capacity share, within one shard.
	next, err := m.Apply(p)
	if err != nil {
		t.Fatal(err)
	}
	count := map[string]int{}
	for _, a := range next.Assignments {
		if a.Shard != routing.GlobalShard {
			count[a.Primary]++
		}
	}
	var total float64
	for _, u := range next.Units {
		if u.Kind == routing.KindRZone {
			total += u.CapacityRPS
		}
	}
	for _, u := range next.Units {
		if u.Kind != routing.KindRZone {
			continue
		}
		share := 100 * u.CapacityRPS / total
		if d := float64(count[u.Name]) - share; d > 1 || d < -1 {
			t.Errorf("%s holds %d shards, its share is %.1f", u.Name, count[u.Name], share)
		}
	}
	for _, bad := range []routing.Unit{
		{Name: "us-east-1", Region: "us-east", CapacityRPS: 1},
		{Name: "new", Region: "Moon_1", CapacityRPS: 1},
		{Name: "Bad_Name", Region: "us-east", CapacityRPS: 1},
		{Name: "new", Region: "us-east", CapacityRPS: 0},
		{Name: "new", Region: "us-east", Kind: "qzone", CapacityRPS: 1},
	} {
		var pe *routing.PlanError
		if _, err := routing.AddUnit(m, bad, routing.Observed{}); !errors.As(err, &pe) {
			t.Errorf("AddUnit(%+v) = %v, want a PlanError", bad, err)
		}
	}
}

func TestPlanUnknownTargets(t *testing.T) {
	m := mustCompile(t, exampleTopology(t))
	for name, f := range map[string]func() (*routing.Plan, error){
		"evacuate region": func() (*routing.Plan, error) { return routing.EvacuateRegion(m, "moon", routing.Observed{}) },
		"evacuate unit":   func() (*routing.Plan, error) { return routing.EvacuateUnit(m, "moon-1", routing.Observed{}) },
		"fail unit":       func() (*routing.Plan, error) { return routing.FailUnits(m, []string{"moon-1"}, routing.Observed{}) },
		"fail region":     func() (*routing.Plan, error) { return routing.FailRegion(m, "moon", routing.Observed{}) },
		"remove unit":     func() (*routing.Plan, error) { return routing.RemoveUnit(m, "moon-1", routing.Observed{}) },
	} {
		p, err := f()
		if p != nil || !errors.Is(err, routing.ErrUnknown) || !strings.Contains(err.Error(), "moon") {
			t.Errorf("%s: got plan %v, error %v; want an ErrUnknown naming moon", name, p != nil, err)
		}
	}
}

// twoRegionTopology: units a-1, a-2 in region a and b-1 in region b; shards
// 0-3 on a-1 with standbys b-1 then a-2.
func twoRegionTopology() *routing.Topology {
	t := &routing.Topology{Version: 1, Shards: 4,
		Regions: []routing.Region{{Name: "a"}, {Name: "b"}},
		Units: []routing.Unit{
			{Name: "a-1", Region: "a", Kind: routing.KindRZone, CapacityRPS: 100},
			{Name: "a-2", Region: "a", Kind: routing.KindRZone, CapacityRPS: 100},
			{Name: "b-1", Region: "b", Kind: routing.KindRZone, CapacityRPS: 100},
		}}
	for s := range 4 {
		t.Assignments = append(t.Assignments, routing.Assignment{Shard: s, Primary: "a-1", Standbys: []string{"b-1", "a-2"}, Epoch: 1, State: routing.StateServing})
	}
	return t
}

// TestFailWithBusyShards: a draining or blocked shard does not stop the
// failover of the others; it stays, with a warning.
func TestFailWithBusyShards(t *testing.T) {
	tp := exampleTopology(t)
	tp.Assignments[3].State = routing.StateDraining // shard 3 on us-east-1
	tp.Assignments[4].State = routing.StateBlocked  // shard 4 on us-east-1
	tp.Assignments[40].State = routing.StateDraining
	m := mustCompile(t, tp)
	p, err := routing.FailUnits(m, []string{"us-east-1"}, routing.Observed{})
	if err != nil {
		t.Fatalf("fail plan refused: %v\n%s", err, p.Text())
	}
	r := rule(p, routing.RuleComplete)
	if !r.Warning || !strings.Contains(r.Detail, "shard 3 stays on us-east-1 (draining)") || !strings.Contains(r.Detail, "shard 4 stays on us-east-1 (blocked)") {
		t.Errorf("complete = %+v, want a warning naming shards 3 and 4", r)
	}
	moved := map[int]bool{}
	for _, mv := range p.Moves {
		moved[mv.Shard] = true
	}
	for s := 0; s <= 16; s++ {
		if want := s != 3 && s != 4; moved[s] != want {
			t.Errorf("shard %d moved = %v, want %v", s, moved[s], want)
		}
	}
	if moved[40] {
		t.Error("draining shard 40 (standby us-east-1) was touched")
	}
}

// TestFailDropsLostStandbys: after a failover, a lost unit is no longer
// listed first (or at all) where a live standby in another region remains.
func TestFailDropsLostStandbys(t *testing.T) {
	m := mustCompile(t, exampleTopology(t))
	p, err := routing.FailUnits(m, []string{"eu-west-1"}, routing.Observed{})
	if err != nil {
		t.Fatal(err)
	}
	next, err := m.Apply(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range next.Assignments {
		if slices.Contains(a.Standbys, "eu-west-1") {
			t.Errorf("%s keeps lost eu-west-1 as a standby: %v", routing.ShardName(a.Shard), a.Standbys)
		}
	}
}

// TestAddUnitNewRegion: a mesh grows into a new region through a plan; the
// new unit becomes the cross-region standby of shards that had none.
func TestAddUnitNewRegion(t *testing.T) {
	tp := twoRegionTopology()
	tp.Regions, tp.Units = tp.Regions[:1], tp.Units[:2]
	tp.Assignments = nil
	for s := range 4 {
		tp.Assignments = append(tp.Assignments, routing.Assignment{Shard: s, Primary: "a-1", Standbys: []string{"a-2"}, Epoch: 1, State: routing.StateServing})
	}
	m := mustCompile(t, tp)
	p, err := routing.AddUnit(m, routing.Unit{Name: "b-1", Region: "b", CapacityRPS: 100}, routing.Observed{})
	if err != nil {
		t.Fatalf("%v\n%s", err, p.Text())
	}
	if p.AddRegion != "b" {
		t.Errorf("AddRegion = %q, want b", p.AddRegion)
	}
	next, err := m.Apply(p)
	if err != nil {
		t.Fatal(err)
	}
	nm := mustCompile(t, next)
	for s := range 4 {
		o, _ := nm.Lookup(s)
		u, _ := nm.Unit(o.Unit)
		cross := false
		for _, sb := range o.Standbys {
			su, _ := nm.Unit(sb)
			cross = cross || su.Region != u.Region
		}
		if !cross {
			t.Errorf("shard %d on %s has no standby in another region: %v", s, o.Unit, o.Standbys)
		}
	}
}

// TestReviewRegressions pins planner defects a review found.
func TestReviewRegressions(t *testing.T) {
	t.Run("busy-shard-without-standby-in-new-region", func(t *testing.T) {
		tp := twoRegionTopology()
		tp.Regions, tp.Units = tp.Regions[:1], tp.Units[:2]
		for s := range 4 {
			tp.Assignments[s].Standbys = []string{"a-2"}
		}
		tp.Assignments[2].State = routing.StateDraining
		m := mustCompile(t, tp)
		p, err := routing.AddUnit(m, routing.Unit{Name: "b-1", Region: "b", CapacityRPS: 100}, routing.Observed{})
		var re *routing.RefusedError
		if !errors.As(err, &re) || !strings.Contains(rule(p, routing.RuleCrossRegionSby).Detail, "shard 2 (draining, so the plan cannot give it one)") {
			t.Fatalf("want a cross-region refusal naming draining shard 2, got %v\n%s", err, p.Text())
		}
	})
	t.Run("allow-flag-leaves-unconcerned-shards", func(t *testing.T) {
		tp := twoRegionTopology()
		tp.Safety.AllowNoCrossRegionStandby = true
		for s := range 4 {
			tp.Assignments[s].Standbys = []string{"a-2"}
		}
		m := mustCompile(t, tp)
		p, err := routing.EvacuateUnit(m, "b-1", routing.Observed{}) // b-1 leads nothing
		if err != nil || len(p.Moves) != 0 {
			t.Fatalf("evacuating a unit that leads nothing: %v, %d moves\n%s", err, len(p.Moves), p.Text())
		}
	})
	t.Run("failover-warns-survivor-without-live-standby", func(t *testing.T) {
		m := mustCompile(t, twoRegionTopology())
		p, err := routing.FailUnits(m, []string{"b-1", "a-2"}, routing.Observed{})
		if err != nil {
			t.Fatal(err)
		}
		if r := rule(p, routing.RuleCrossRegionSby); !r.Warning || !strings.Contains(r.Detail, "shard 0 loses its last live standby") {
			t.Fatalf("cross-region rule = %+v, want a warning for shard 0", r)
		}
	})
	t.Run("new-region-named-like-a-unit", func(t *testing.T) {
		m := mustCompile(t, exampleTopology(t))
		var pe *routing.PlanError
		if _, err := routing.AddUnit(m, routing.Unit{Name: "zz-1", Region: "us-east-1", CapacityRPS: 1}, routing.Observed{}); !errors.As(err, &pe) || !strings.Contains(err.Error(), "has the name of a unit") {
			t.Fatalf("got %v, want a PlanError about the region's name", err)
		}
	})
	t.Run("epoch-at-the-cap", func(t *testing.T) {
		tp := exampleTopology(t)
		tp.Assignments[0].Epoch = routing.MaxCounter
		if err := tp.Validate(); err == nil || !strings.Contains(err.Error(), "must stay below 2^62") {
			t.Fatalf("Validate = %v, want the epoch refused", err)
		}
	})
	t.Run("add-unit-keeps-old-primary-as-standby", func(t *testing.T) {
		m := mustCompile(t, exampleTopology(t))
		p, err := routing.AddUnit(m, routing.Unit{Name: "us-east-3", Region: "us-east", CapacityRPS: 40000}, routing.Observed{})
		if err != nil {
			t.Fatal(err)
		}
		for _, mv := range p.Moves {
			if !slices.Contains(mv.Standbys, mv.From) {
				t.Errorf("%s: %s -> %s dropped the old primary from its standbys %v", routing.ShardName(mv.Shard), mv.From, mv.To, mv.Standbys)
			}
		}
	})
	t.Run("lost-units-never-lead", func(t *testing.T) {
		m := mustCompile(t, exampleTopology(t))
		p, err := routing.EvacuateUnit(m, "us-east-1", routing.Observed{Lost: []string{"eu-west-1"}})
		if err != nil {
			t.Fatal(err)
		}
		for _, mv := range p.Moves {
			if mv.To == "eu-west-1" || slices.Contains(mv.Standbys[:1], "eu-west-1") {
				t.Errorf("%s: lost eu-west-1 leads or is the first standby: %+v", routing.ShardName(mv.Shard), mv)
			}
		}
	})
}
