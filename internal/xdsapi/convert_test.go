package xdsapi

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"google.golang.org/protobuf/proto"
)

// A topology survives the trip through the wire form unchanged, and the
// map compiled from what arrives decides like the original.
func TestRoundTrip(t *testing.T) {
	for _, f := range []string{"../../examples/topology/three-regions.yaml", "../../examples/local/topology.yaml"} {
		t.Run(f, func(t *testing.T) {
			want, err := topofile.Load(f)
			if err != nil {
				t.Fatal(err)
			}
			wire, err := proto.Marshal(FromTopology(want))
			if err != nil {
				t.Fatal(err)
			}
			var m cellmeshv1.ShardMap
			if err := proto.Unmarshal(wire, &m); err != nil {
				t.Fatal(err)
			}
			got, err := ToTopology(&m)
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(want, got, cmpopts.EquateEmpty()); d != "" {
				t.Fatalf("topology changed on the wire (-sent +received):\n%s", d)
			}
			a, err := routing.Compile(want)
			if err != nil {
				t.Fatal(err)
			}
			b, err := routing.Compile(got)
			if err != nil {
				t.Fatal(err)
			}
			if err := a.CheckSuccessor(b); err != nil {
				t.Fatalf("the received map is not the same map: %v", err)
			}
			for _, uid := range []string{"0", "7", "2088123456789", "99"} {
				r := &routing.Request{Method: "POST", Path: "/v1/x", Header: map[string][]string{"X-Cellmesh-Uid": {uid}}, LocalUnit: want.Units[0].Name}
				da, ea := a.Decide(r)
				db, eb := b.Decide(r)
				if da != db || (ea == nil) != (eb == nil) {
					t.Errorf("uid %s: %+v %v before, %+v %v after", uid, da, ea, db, eb)
				}
			}
		})
	}
}

// A write override survives, and "no override" stays distinct from false.
func TestZoneWriteOverride(t *testing.T) {
	f := false
	in := &routing.Topology{Zones: routing.ZoneRules{Rules: []routing.ZoneRule{{PathPrefix: "/a", Zone: routing.KindCZone, Write: &f}, {PathPrefix: "/b", Zone: routing.KindGZone}}}}
	out, err := ToTopology(FromTopology(in))
	if err != nil {
		t.Fatal(err)
	}
	if w := out.Zones.Rules[0].Write; w == nil || *w {
		t.Errorf("rule /a write = %v, want false", w)
	}
	if w := out.Zones.Rules[1].Write; w != nil {
		t.Errorf("rule /b write = %v, want none", *w)
	}
}

// Whatever arrives on the wire converts without panicking, and what
// converts either compiles or is refused by Compile with an error.
func FuzzToTopology(f *testing.F) {
	for _, file := range []string{"../../examples/topology/three-regions.yaml", "../../examples/local/topology.yaml"} {
		topo, err := topofile.Load(file)
		if err != nil {
			f.Fatal(err)
		}
		wire, err := proto.Marshal(FromTopology(topo))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(wire)
	}
	f.Add([]byte{0x10, 0xff, 0xff, 0xff, 0xff, 0x0f})             // shards = 2^32-1
	f.Add([]byte{0x4a, 0x02, 0x08, 0x7f, 0x4a, 0x00, 0x4a, 0x00}) // odd assignments
	f.Add([]byte{0x10, 0x04, 0x4a, 0x04, 0x12, 0x00, 0x30, 0x04}) // a run of 4
	f.Fuzz(func(t *testing.T, wire []byte) {
		var m cellmeshv1.ShardMap
		if err := proto.Unmarshal(wire, &m); err != nil {
			return
		}
		topo, err := ToTopology(&m)
		if err != nil {
			return
		}
		if sm, err := routing.Compile(topo); err == nil && sm.Version() != m.Version {
			t.Fatalf("compiled version %d from resource version %d", sm.Version(), m.Version)
		}
	})
}

// Shards with the same owners, epoch and state travel as one run: a big
// map of ranges is small on the wire, a moved shard splits its run, and
// the expanded assignments are exactly the topology's.
func TestAssignmentRuns(t *testing.T) {
	const n = 10000
	topo := &routing.Topology{Version: 7, Shards: n,
		Regions: []routing.Region{{Name: "r1"}, {Name: "r2"}},
		Units: []routing.Unit{{Name: "a", Region: "r1", Kind: routing.KindRZone, CapacityRPS: 1},
			{Name: "b", Region: "r2", Kind: routing.KindRZone, CapacityRPS: 1}}}
	for i := range n {
		a := routing.Assignment{Shard: i, Primary: "a", Standbys: []string{"b"}, Epoch: 1, State: routing.StateServing}
		if i >= n/2 {
			a.Primary, a.Standbys = "b", []string{"a"}
		}
		topo.Assignments = append(topo.Assignments, a)
	}
	topo.Assignments[1234].Epoch = 2 // a moved shard
	topo.Assignments[1234].Primary, topo.Assignments[1234].Standbys = "b", []string{"a"}
	topo.Assignments[n-1].State = routing.StateDraining
	m := FromTopology(topo)
	var runs []string
	for _, a := range m.Assignments {
		runs = append(runs, fmt.Sprintf("%d+%d", a.Shard, max(a.Count, 1)))
	}
	want := []string{"0+1234", "1234+1", "1235+3765", "5000+4999", "9999+1"}
	if !slices.Equal(runs, want) {
		t.Fatalf("runs %v, want %v", runs, want)
	}
	wire, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if len(wire) > 300 {
		t.Errorf("a %d-shard map of five runs is %d bytes on the wire", n, len(wire))
	}
	var back cellmeshv1.ShardMap
	if err := proto.Unmarshal(wire, &back); err != nil {
		t.Fatal(err)
	}
	got, err := ToTopology(&back)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(topo, got, cmpopts.EquateEmpty()); d != "" {
		t.Fatalf("topology changed on the wire (-sent +received):\n%s", d)
	}
	if _, err := routing.Compile(got); err != nil {
		t.Fatal(err)
	}
}

// A run that cannot be expanded is refused with the reason, before any
// memory is taken for it.
func TestAssignmentRunsRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		as   []*cellmeshv1.Assignment
		want string
	}{
		{"gzone run", []*cellmeshv1.Assignment{{Shard: -1, Count: 2, Primary: "a"}}, "cannot start a run"},
		{"too many", []*cellmeshv1.Assignment{{Shard: 0, Count: routing.MaxShards, Primary: "a"}, {Shard: 0, Count: 2, Primary: "a"}}, "more than 65536 shards"},
		{"huge", []*cellmeshv1.Assignment{{Shard: 0, Count: math.MaxUint32, Primary: "a"}}, "more than 65536 shards"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ToTopology(&cellmeshv1.ShardMap{Version: 3, Shards: 4, Assignments: tc.as})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
		})
	}
	// A run past the shard count expands, and Compile refuses it.
	topo, err := ToTopology(&cellmeshv1.ShardMap{Version: 3, Shards: 4, Assignments: []*cellmeshv1.Assignment{{Shard: math.MaxInt32 - 1, Count: 4, Primary: "a"}}})
	if err != nil {
		t.Fatal(err)
	}
	if topo.Assignments[3].Shard != math.MaxInt32+2 {
		t.Fatalf("shard %d, want %d (no int32 wrap)", topo.Assignments[3].Shard, int64(math.MaxInt32)+2)
	}
	if _, err := routing.Compile(topo); err == nil {
		t.Fatal("a run past the shard count compiled")
	}
}
