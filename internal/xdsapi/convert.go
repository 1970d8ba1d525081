package xdsapi

import (
	"fmt"
	"math"
	"slices"

	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
	"github.com/cellmesh/cellmesh/routing"
)

// FromTopology returns the ShardMap resource of t. It copies; later
// changes to t do not reach the resource.
func FromTopology(t *routing.Topology) *cellmeshv1.ShardMap {
	m := &cellmeshv1.ShardMap{
		Version: t.Version,
		Shards:  uint32(t.Shards),
		Rule:    &cellmeshv1.ShardRule{Kind: string(t.Rule.Kind)},
		Zones:   &cellmeshv1.ZoneRules{DefaultZone: string(t.Zones.Default)},
		Safety: &cellmeshv1.Safety{
			MaxUtilization:            t.Safety.MaxUtilization,
			MinServingUnits:           uint32(t.Safety.MinServingUnits),
			MaxShardsInFlight:         uint32(t.Safety.MaxShardsInFlight),
			AllowNoCrossRegionStandby: t.Safety.AllowNoCrossRegionStandby,
		},
	}
	for _, d := range t.Rule.Digits {
		m.Rule.Digits = append(m.Rule.Digits, uint32(d))
	}
	for _, k := range t.Keys {
		m.Keys = append(m.Keys, &cellmeshv1.KeySource{Kind: string(k.Kind), Name: k.Name})
	}
	for _, r := range t.Zones.Rules {
		zr := &cellmeshv1.ZoneRule{Methods: append([]string(nil), r.Methods...), PathPrefix: r.PathPrefix, Path: r.Path, Zone: string(r.Zone)}
		if r.Write != nil {
			w := *r.Write
			zr.Write = &w
		}
		m.Zones.Rules = append(m.Zones.Rules, zr)
	}
	for _, r := range t.Regions {
		m.Regions = append(m.Regions, &cellmeshv1.Region{Name: r.Name})
	}
	for _, u := range t.Units {
		m.Units = append(m.Units, &cellmeshv1.Unit{Name: u.Name, Region: u.Region, Kind: string(u.Kind), CapacityRps: u.CapacityRPS})
	}
	var last *cellmeshv1.Assignment
	for _, a := range t.Assignments {
		if last != nil && continues(last, a) {
			last.Count = max(last.Count, 1) + 1
			continue
		}
		last = &cellmeshv1.Assignment{Shard: int32(a.Shard), Primary: a.Primary,
			Standbys: append([]string(nil), a.Standbys...), Epoch: a.Epoch, State: string(a.State)}
		m.Assignments = append(m.Assignments, last)
	}
	return m
}

// continues reports whether a is the next shard of run, with the same
// owners, epoch and state.
func continues(run *cellmeshv1.Assignment, a routing.Assignment) bool {
	return run.Shard >= 0 && a.Shard == int(run.Shard)+int(max(run.Count, 1)) &&
		run.Primary == a.Primary && slices.Equal(run.Standbys, a.Standbys) &&
		run.Epoch == a.Epoch && run.State == string(a.State)
}

// ToTopology returns the topology a ShardMap resource carries. It refuses
// numbers that do not fit the model; whether the topology makes sense is
// routing.Compile's to say.
func ToTopology(m *cellmeshv1.ShardMap) (*routing.Topology, error) {
	if m == nil {
		return nil, fmt.Errorf("shard map resource is empty")
	}
	if m.Shards > math.MaxInt32 {
		return nil, fmt.Errorf("shard map version %d: shard count %d is out of range", m.Version, m.Shards)
	}
	t := &routing.Topology{Version: m.Version, Shards: int(m.Shards)}
	if r := m.Rule; r != nil {
		t.Rule.Kind = routing.RuleKind(r.Kind)
		for _, d := range r.Digits {
			if d > math.MaxInt32 {
				return nil, fmt.Errorf("shard map version %d: digit position %d is out of range", m.Version, d)
			}
			t.Rule.Digits = append(t.Rule.Digits, int(d))
		}
	}
	for i, k := range m.Keys {
		if k == nil {
			return nil, fmt.Errorf("shard map version %d: key source %d is empty", m.Version, i)
		}
		t.Keys = append(t.Keys, routing.KeySource{Kind: routing.KeySourceKind(k.Kind), Name: k.Name})
	}
	if z := m.Zones; z != nil {
		t.Zones.Default = routing.Zone(z.DefaultZone)
		for i, r := range z.Rules {
			if r == nil {
				return nil, fmt.Errorf("shard map version %d: zone rule %d is empty", m.Version, i)
			}
			zr := routing.ZoneRule{Methods: append([]string(nil), r.Methods...), PathPrefix: r.PathPrefix, Path: r.Path, Zone: routing.Zone(r.Zone)}
			if r.Write != nil {
				w := *r.Write
				zr.Write = &w
			}
			t.Zones.Rules = append(t.Zones.Rules, zr)
		}
	}
	if s := m.Safety; s != nil {
		t.Safety = routing.Safety{MaxUtilization: s.MaxUtilization, MinServingUnits: int(s.MinServingUnits),
			MaxShardsInFlight: int(s.MaxShardsInFlight), AllowNoCrossRegionStandby: s.AllowNoCrossRegionStandby}
	}
	for i, r := range m.Regions {
		if r == nil {
			return nil, fmt.Errorf("shard map version %d: region %d is empty", m.Version, i)
		}
		t.Regions = append(t.Regions, routing.Region{Name: r.Name})
	}
	for i, u := range m.Units {
		if u == nil {
			return nil, fmt.Errorf("shard map version %d: unit %d is empty", m.Version, i)
		}
		t.Units = append(t.Units, routing.Unit{Name: u.Name, Region: u.Region, Kind: routing.Kind(u.Kind), CapacityRPS: u.CapacityRps})
	}
	// The runs expand to at most one assignment per shard and the gzone
	// writer's, whatever the shard count says: a small resource cannot
	// claim memory for more.
	total := 0
	for i, a := range m.Assignments {
		if a == nil {
			return nil, fmt.Errorf("shard map version %d: assignment %d is empty", m.Version, i)
		}
		n := int(max(a.Count, 1))
		if n > 1 && a.Shard < 0 {
			return nil, fmt.Errorf("shard map version %d: assignment %d: shard %d cannot start a run of %d", m.Version, i, a.Shard, n)
		}
		if total += n; total > routing.MaxShards+1 {
			return nil, fmt.Errorf("shard map version %d: the assignments cover more than %d shards", m.Version, routing.MaxShards)
		}
	}
	t.Assignments = make([]routing.Assignment, 0, total)
	for _, a := range m.Assignments {
		for k := range int(max(a.Count, 1)) {
			t.Assignments = append(t.Assignments, routing.Assignment{Shard: int(a.Shard) + k, Primary: a.Primary,
				Standbys: append([]string(nil), a.Standbys...), Epoch: a.Epoch, State: routing.State(a.State)})
		}
	}
	return t, nil
}
