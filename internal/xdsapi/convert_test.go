package xdsapi

import (
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
