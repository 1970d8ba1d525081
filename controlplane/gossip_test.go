package controlplane

import (
	"context"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cellmesh/cellmesh/controlplane/store"
	"github.com/cellmesh/cellmesh/failover"
	"github.com/cellmesh/cellmesh/internal/xdsapi"
)

var gossipKey = []byte("0123456789abcdef0123456789abcdef")

// gossipSidecar is a sidecar's gossip member, as proxy.RunGossip makes it.
func gossipSidecar(t *testing.T, join, unit, region, addr string) *failover.Membership {
	t.Helper()
	ms, err := failover.Start(failover.Config{
		Meta: failover.Meta{Role: failover.RoleSidecar, Region: region, Unit: unit, Service: "echo", Address: addr, Transport: "quic"},
		Bind: "127.0.0.1:0", Join: []string{join}, Profile: failover.ProfileFast, Keys: [][]byte{gossipKey},
		Observer: failover.NewHealth(failover.HealthConfig{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = ms.Run(ctx)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return ms
}

// The leader follows gossip: a sidecar found dead leaves the endpoints it
// serves (its registration stays, marked down), its unit turns degraded
// then down, the down unit's lease is no longer renewed although its xDS
// streams stay open, and the API, the event log and the metrics say so.
func TestGossipHealthDrivesEndpointsAndLeases(t *testing.T) {
	ca := newTestCA(t)
	r := start(t, ca, Config{ID: "cp-us", Topology: localTopology(t), LeaseTTL: time.Second,
		Health: failover.HealthConfig{Grace: 300 * time.Millisecond},
		Gossip: &failover.Config{Bind: "127.0.0.1:0", Profile: failover.ProfileFast, Keys: [][]byte{gossipKey}}})
	waitFor(t, "leadership", r.store.IsLeader)
	waitFor(t, "the map", func() bool { return r.store.Map() != nil })
	seed := r.Gossip().Addr()

	addrA, addrB := "127.0.0.1:24001", "127.0.0.1:24002"
	for i, addr := range []string{addrA, addrB} {
		dialADS(t, r.Addrs().XDS, ca.store(t, "us-east", "us-east-1", "echo"), "n"+string(rune('a'+i)), map[string]string{
			xdsapi.MetaService: "echo", xdsapi.MetaUnit: "us-east-1", xdsapi.MetaRegion: "us-east", xdsapi.MetaAddress: addr, xdsapi.MetaTransport: "quic"})
	}
	a := gossipSidecar(t, seed, "us-east-1", "us-east", addrA)
	b := gossipSidecar(t, seed, "us-east-1", "us-east", addrB)
	gossipSidecar(t, seed, "eu-west-1", "eu-west", "127.0.0.1:24003")

	members := func() Members {
		var m Members
		getJSON(t, r.Addrs().API, "/v1/members", &m)
		return m
	}
	unit := func(m Members, name string) failover.UnitState {
		for _, u := range m.Gossip.Units {
			if u.Unit == name {
				return u.State
			}
		}
		return ""
	}
	downKeys := func() []string {
		var d []string
		for _, e := range r.store.State().Endpoints {
			if e.Down {
				d = append(d, e.Address)
			}
		}
		return d
	}
	waitFor(t, "us-east-1 up with two registered sidecars", func() bool {
		m := members()
		return unit(m, "us-east-1") == failover.StateUp && len(m.Endpoints) == 2 && m.Gossip.Enabled
	})

	// One sidecar crashes: its endpoint is down, the unit degraded, and
	// it keeps its lease.
	a.Kill()
	waitFor(t, "the dead sidecar's endpoint down", func() bool { return slices.Equal(downKeys(), []string{addrA}) })
	waitFor(t, "us-east-1 degraded", func() bool { return unit(members(), "us-east-1") == failover.StateDegraded })
	seq := leaseOf(members(), "us-east-1").Seq
	waitFor(t, "a renewal of the degraded unit's lease", func() bool { return leaseOf(members(), "us-east-1").Seq > seq })

	// The other crashes too (its xDS stream stays open, as over a cut
	// network): the unit is down and its lease ends.
	b.Kill()
	waitFor(t, "both endpoints down", func() bool { return len(downKeys()) == 2 })
	waitFor(t, "us-east-1 down", func() bool { return unit(members(), "us-east-1") == failover.StateDown })
	waitFor(t, "us-east-1's lease ended", func() bool {
		l := leaseOf(members(), "us-east-1")
		return l.Seq > 0 && time.Now().After(l.EndsAt)
	})
	if m := members(); len(m.Endpoints) != 2 {
		t.Fatalf("registrations %+v: the down sidecars' streams are open, they stay registered", m.Endpoints)
	}
	if unit(members(), "eu-west-1") != failover.StateUp {
		t.Fatalf("eu-west-1 is not up: %+v", members().Gossip.Units)
	}

	var ev struct {
		SeenBy string           `json:"seen_by"`
		Events []failover.Event `json:"events"`
	}
	getJSON(t, r.Addrs().API, "/v1/events", &ev)
	var deaths, unitDown int
	for _, e := range ev.Events {
		if e.Kind == "member" && e.To == "dead" {
			deaths++
		}
		if e.Kind == "unit" && e.Name == "us-east-1" && e.To == "down" {
			unitDown++
		}
	}
	if ev.SeenBy != "cp-us" || deaths != 2 || unitDown != 1 {
		t.Fatalf("events by %s: %d deaths, %d us-east-1 down, want 2 and 1: %+v", ev.SeenBy, deaths, unitDown, ev.Events)
	}
	last := ev.Events[len(ev.Events)-1].Seq
	getJSON(t, r.Addrs().API, "/v1/events?after="+strconv.FormatUint(last, 10), &ev)
	if len(ev.Events) != 0 {
		t.Fatalf("events after the last: %+v", ev.Events)
	}
	if code, body := do(t, r.Addrs().API, "GET", "/v1/events?after=x", testToken, nil); code != http.StatusBadRequest || !strings.Contains(string(body), "sequence number") {
		t.Fatalf("bad after: %d %s", code, body)
	}
	_, body := do(t, r.Addrs().API, "GET", "/metrics", "", nil)
	if !strings.Contains(string(body), `cellmesh_unit_state{region="us-east",state="down",unit="us-east-1"} 1`) {
		t.Fatalf("metrics lack us-east-1 down:\n%s", body)
	}
}

func leaseOf(m Members, unit string) LeaseView {
	for _, l := range m.Leases {
		if l.Unit == unit {
			return l
		}
	}
	return LeaseView{}
}

// downEndpoints tells a dead sidecar (served UNHEALTHY: peers close their
// connections to it) from one that left (served DRAINING: its requests in
// flight finish); a sidecar that does not gossip is neither.
func TestDownEndpointsTellsLeftFromDead(t *testing.T) {
	member := func(unit, addr string, st failover.MemberState) failover.MemberHealth {
		return failover.MemberHealth{Member: failover.Member{Name: unit + "/" + addr, State: st,
			Meta: failover.Meta{Role: failover.RoleSidecar, Unit: unit, Service: "echo", Address: addr}}, Up: st == failover.MemberAlive}
	}
	v := &failover.View{Members: []failover.MemberHealth{
		member("us-1", "127.0.0.1:1", failover.MemberAlive),
		member("us-1", "127.0.0.1:2", failover.MemberDead),
		member("us-2", "127.0.0.1:3", failover.MemberLeft),
	}}
	reg := func(unit, addr string) store.Registration {
		return store.Registration{Service: "echo", Unit: unit, Address: addr, Transport: "quic"}
	}
	down, left := downEndpoints(v, []store.Registration{reg("us-1", "127.0.0.1:1"), reg("us-1", "127.0.0.1:2"), reg("us-2", "127.0.0.1:3"), reg("eu-1", "127.0.0.1:4")})
	if !slices.Equal(down, []string{"quic://127.0.0.1:2"}) || !slices.Equal(left, []string{"quic://127.0.0.1:3"}) {
		t.Fatalf("down %v, left %v; want the dead one down and the one that left draining", down, left)
	}
}
