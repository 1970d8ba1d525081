package routing_test

import (
	"fmt"
	"net/http"
	"strconv"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
)

// bigTopology builds n shards over units rzone units spread over 10 regions
// (or fewer when there are fewer units), each shard with two standbys in the
// next two regions, and a gzone writer with a standby.
func bigTopology(n, units int) *routing.Topology {
	regions := min(10, units)
	t := &routing.Topology{Version: 1, Shards: n, Safety: routing.Safety{MaxShardsInFlight: 64, MinServingUnits: 1}}
	for r := range regions {
		t.Regions = append(t.Regions, routing.Region{Name: fmt.Sprintf("region-%d", r)})
		t.Units = append(t.Units, routing.Unit{Name: fmt.Sprintf("g-%d", r), Region: fmt.Sprintf("region-%d", r), Kind: routing.KindGZone, CapacityRPS: 1e6})
	}
	name := func(i int) string { return fmt.Sprintf("u-%d-%d", i%regions, i/regions) }
	for i := range units {
		t.Units = append(t.Units, routing.Unit{Name: name(i), Region: fmt.Sprintf("region-%d", i%regions), Kind: routing.KindRZone, CapacityRPS: 1e6})
	}
	for s := range n {
		p := s % units
		t.Assignments = append(t.Assignments, routing.Assignment{
			Shard: s, Primary: name(p), Standbys: []string{name((p + 1) % units), name((p + 2) % units)}, Epoch: 1, State: routing.StateServing,
		})
	}
	t.Assignments = append(t.Assignments, routing.Assignment{Shard: routing.GlobalShard, Primary: "g-0", Standbys: []string{"g-1"}, Epoch: 1, State: routing.StateServing})
	return t
}

func loadFor(t *routing.Topology) routing.Observed {
	obs := routing.Observed{LoadRPS: map[string]float64{}}
	for _, u := range t.Units {
		obs.LoadRPS[u.Name] = u.CapacityRPS / 4
	}
	return obs
}

// BenchmarkDecideHeader is the sidecar's per-request decision for a user id
// in the x-cellmesh-uid header, with the example topology's zone rules.
func BenchmarkDecideHeader(b *testing.B) {
	m := mustCompile(b, exampleTopology(b))
	h := http.Header{}
	h.Set("X-Cellmesh-Uid", "2088123456789")
	req := &routing.Request{Method: "POST", Path: "/v1/transfers", Header: h}
	b.ReportAllocs()
	for b.Loop() {
		d, err := m.Decide(req)
		if err != nil || d.Unit == "" {
			b.Fatal(d, err)
		}
	}
}

// BenchmarkBaselineHeaderGet is the floor any proxy pays to route on a
// header: http.Header.Get of the uid and strconv.ParseUint mod 100. The
// decision's figures are read as ratios against it, from the same run.
func BenchmarkBaselineHeaderGet(b *testing.B) {
	h := http.Header{}
	h.Set("X-Cellmesh-Uid", "2088123456789")
	b.ReportAllocs()
	var sink uint64
	for b.Loop() {
		v, err := strconv.ParseUint(h.Get("X-Cellmesh-Uid"), 10, 64)
		if err != nil {
			b.Fatal(err)
		}
		sink += v % 100
	}
	_ = sink
}

// BenchmarkDecideRules compares the shard rules on the same header key.
func BenchmarkDecideRules(b *testing.B) {
	for _, rule := range []routing.ShardRule{{Kind: routing.RuleMod}, {Kind: routing.RuleDigits, Digits: []int{3, 2}}, {Kind: routing.RuleHash}} {
		b.Run(string(rule.Kind), func(b *testing.B) {
			tp := exampleTopology(b)
			tp.Rule = rule
			m := mustCompile(b, tp)
			h := http.Header{}
			h.Set("X-Cellmesh-Uid", "2088123456789")
			req := &routing.Request{Method: "GET", Path: "/v1/balance", Header: h}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := m.Decide(req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkLookup65536 looks shards up in a map of 65,536 shards.
func BenchmarkLookup65536(b *testing.B) {
	m := mustCompile(b, bigTopology(routing.MaxShards, 1000))
	h := http.Header{}
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = strconv.Itoa(i * 7919)
	}
	req := &routing.Request{Method: "GET", Path: "/", Header: h}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		h["X-Cellmesh-Uid"] = keys[i&1023 : i&1023+1]
		i++
		if _, err := m.Decide(req); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPlan65536x1000 runs each planner on 65,536 shards and 1,000 units.
func BenchmarkPlan65536x1000(b *testing.B) {
	tp := bigTopology(routing.MaxShards, 1000)
	m := mustCompile(b, tp)
	obs := loadFor(tp)
	newUnit := routing.Unit{Name: "u-new", Region: "region-3", Kind: routing.KindRZone, CapacityRPS: 1e6}
	for _, c := range []struct {
		name string
		plan func() (*routing.Plan, error)
	}{
		{"evacuate-region", func() (*routing.Plan, error) { return routing.EvacuateRegion(m, "region-3", obs) }},
		{"evacuate-unit", func() (*routing.Plan, error) { return routing.EvacuateUnit(m, "u-3-7", obs) }},
		{"fail-unit", func() (*routing.Plan, error) { return routing.FailUnits(m, []string{"u-3-7"}, obs) }},
		{"fail-region", func() (*routing.Plan, error) { return routing.FailRegion(m, "region-3", obs) }},
		{"add-unit", func() (*routing.Plan, error) { return routing.AddUnit(m, newUnit, obs) }},
		{"remove-unit", func() (*routing.Plan, error) { return routing.RemoveUnit(m, "u-3-7", obs) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				p, err := c.plan()
				if err != nil {
					b.Fatal(err)
				}
				if len(p.Moves) == 0 {
					b.Fatal("no moves")
				}
			}
		})
	}
}

// BenchmarkCompile65536x1000 builds the ShardMap a sidecar swaps in.
func BenchmarkCompile65536x1000(b *testing.B) {
	tp := bigTopology(routing.MaxShards, 1000)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := routing.Compile(tp); err != nil {
			b.Fatal(err)
		}
	}
}

// TestPlannersAtScale checks the planner properties on the benchmark's
// 65,536 shards x 1,000 units, so the figures in BENCHMARKS.md are for plans
// that are right.
func TestPlannersAtScale(t *testing.T) {
	if testing.Short() {
		t.Skip("large topology")
	}
	tp := bigTopology(routing.MaxShards, 1000)
	m := mustCompile(t, tp)
	obs := loadFor(tp)
	for name, f := range map[string]func() (*routing.Plan, error){
		"evacuate-region": func() (*routing.Plan, error) { return routing.EvacuateRegion(m, "region-3", obs) },
		"fail-region":     func() (*routing.Plan, error) { return routing.FailRegion(m, "region-3", obs) },
		"add-unit": func() (*routing.Plan, error) {
			return routing.AddUnit(m, routing.Unit{Name: "u-new", Region: "region-3", Kind: routing.KindRZone, CapacityRPS: 1e6}, obs)
		},
		"remove-unit": func() (*routing.Plan, error) { return routing.RemoveUnit(m, "u-3-7", obs) },
	} {
		p, err := f()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		checkPlanProperties(t, name, m, tp, p, obs)
	}
}
