package store

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func topology(t *testing.T) *routing.Topology {
	t.Helper()
	topo, err := topofile.Load("../../examples/local/topology.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return topo
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func open(t *testing.T, cfg Config) *Store {
	t.Helper()
	cfg.Fast = true
	s, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// withTopology opens a single replica, waits for its leadership and
// commits the local example's topology.
func withTopology(t *testing.T, cfg Config) *Store {
	t.Helper()
	s := open(t, cfg)
	waitFor(t, "leadership", s.IsLeader)
	c := cmd(OpSetTopology)
	c.Topology = topology(t)
	if _, err := s.Apply(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	return s
}

func cmd(op string) Command { return Command{Op: op, Who: "test", At: time.Unix(1700000000, 0).UTC()} }

// A single replica commits topology changes and moves, refuses a stale
// epoch without changing anything, and comes back from disk with all of it.
func TestSingleReplicaRestart(t *testing.T) {
	cfg := Config{ID: "cp-1", Dir: t.TempDir(), Bind: freeAddr(t), Bootstrap: true}
	s := withTopology(t, cfg)
	ctx := context.Background()
	mv := cmd(OpMove)
	mv.Shard, mv.To, mv.Epoch = 7, "eu-west-1", 1
	m, err := s.Apply(ctx, mv)
	if err != nil {
		t.Fatal(err)
	}
	if o, _ := m.Lookup(7); o.Unit != "eu-west-1" || o.Epoch != 2 || m.Version() != 2 {
		t.Fatalf("after the move shard 7 is %s at epoch %d, version %d", o.Unit, o.Epoch, m.Version())
	}
	// The same move again carries a stale epoch: refused, nothing changes.
	var re *RefusedError
	if _, err := s.Apply(ctx, mv); !errors.As(err, &re) || !strings.Contains(err.Error(), "epoch 2, not 1") {
		t.Fatalf("stale move: %v", err)
	}
	if s.Map().Version() != 2 {
		t.Fatalf("a refused move changed the version to %d", s.Map().Version())
	}
	// An older topology is refused too.
	old := cmd(OpSetTopology)
	old.Topology = topology(t)
	if _, err := s.Apply(ctx, old); !errors.As(err, &re) {
		t.Fatalf("older topology: %v", err)
	}
	if err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	mv2 := cmd(OpMove)
	mv2.Shard, mv2.To, mv2.Epoch = 8, "us-east-2", 1
	if _, err := s.Apply(ctx, mv2); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	cfg.Bind = freeAddr(t)
	cfg.Bootstrap = false
	r := open(t, cfg)
	waitFor(t, "the restarted replica to replay its log", func() bool { return r.Map() != nil && r.Map().Version() == 3 })
	if o, _ := r.Map().Lookup(7); o.Unit != "eu-west-1" || o.Epoch != 2 {
		t.Fatalf("after restart shard 7 is %s at epoch %d", o.Unit, o.Epoch)
	}
	if o, _ := r.Map().Lookup(8); o.Unit != "us-east-2" || o.Epoch != 2 {
		t.Fatalf("after restart shard 8 is %s at epoch %d", o.Unit, o.Epoch)
	}
	acts := r.Actions()
	if len(acts) != 3 || acts[1].Who != "test" || !strings.Contains(acts[1].What, "move shard 7 from us-east-1 to eu-west-1, epoch 2") {
		t.Fatalf("operator log after restart: %+v", acts)
	}
}

// Three replicas: writes go through the leader and reach every replica; a
// follower refuses writes naming the leader; when the leader stops, the
// others elect a new one and take writes.
func TestThreeReplicas(t *testing.T) {
	var voters []Voter
	for _, id := range []string{"cp-1", "cp-2", "cp-3"} {
		voters = append(voters, Voter{ID: id, Addr: freeAddr(t)})
	}
	var stores []*Store
	for _, v := range voters {
		stores = append(stores, open(t, Config{ID: v.ID, Dir: filepath.Join(t.TempDir(), v.ID), Bind: v.Addr, Bootstrap: true, Voters: voters}))
	}
	leader := func(among []*Store) *Store {
		for _, s := range among {
			if s.IsLeader() {
				return s
			}
		}
		return nil
	}
	waitFor(t, "a leader", func() bool { return leader(stores) != nil })
	l := leader(stores)
	ctx := context.Background()
	c := cmd(OpSetTopology)
	c.Topology = topology(t)
	if _, err := l.Apply(ctx, c); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "every replica to have the topology", func() bool {
		for _, s := range stores {
			if s.Map() == nil {
				return false
			}
		}
		return true
	})
	for _, s := range stores {
		if s == l {
			continue
		}
		var nl *ErrNotLeader
		if _, err := s.Apply(ctx, c); !errors.As(err, &nl) || nl.Leader != l.Addr() {
			t.Fatalf("write on a follower: %v, want ErrNotLeader naming %s", err, l.Addr())
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	var rest []*Store
	for _, s := range stores {
		if s != l {
			rest = append(rest, s)
		}
	}
	waitFor(t, "a new leader", func() bool { return leader(rest) != nil })
	nl := leader(rest)
	mv := cmd(OpMove)
	mv.Shard, mv.To, mv.Epoch = 60, "us-east-1", 1
	if _, err := nl.Apply(ctx, mv); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the move on both live replicas", func() bool {
		for _, s := range rest {
			if o, _ := s.Map().Lookup(60); o.Unit != "us-east-1" || o.Epoch != 2 {
				return false
			}
		}
		return true
	})
}

// Leases: every grant raises the unit's seq and records the grant's time
// and TTL; units the map lacks are skipped; the leases survive a snapshot
// and a restart; a grant without a ttl is refused.
func TestLeases(t *testing.T) {
	cfg := Config{ID: "cp-1", Dir: t.TempDir(), Bind: freeAddr(t), Bootstrap: true}
	s := withTopology(t, cfg)
	ctx := context.Background()
	g := cmd(OpGrant)
	g.Grants, g.TTL = []string{"us-east-1", "mars-1"}, 6*time.Second
	for range 2 {
		if _, err := s.Apply(ctx, g); err != nil {
			t.Fatal(err)
		}
	}
	g.Grants = []string{"eu-west-1"}
	if _, err := s.Apply(ctx, g); err != nil {
		t.Fatal(err)
	}
	want := []Lease{{Unit: "eu-west-1", Seq: 1, TTL: 6 * time.Second, GrantedAt: g.At}, {Unit: "us-east-1", Seq: 2, TTL: 6 * time.Second, GrantedAt: g.At}}
	check := func(st *State) {
		t.Helper()
		if len(st.Leases) != 2 || st.Leases[0] != want[0] || st.Leases[1] != want[1] {
			t.Fatalf("leases %+v, want %+v", st.Leases, want)
		}
	}
	check(s.State())
	bad := cmd(OpGrant)
	bad.Grants = []string{"us-east-1"}
	var re *RefusedError
	if _, err := s.Apply(ctx, bad); !errors.As(err, &re) {
		t.Fatalf("grant without a ttl: %v", err)
	}
	if err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	cfg.Bind, cfg.Bootstrap = freeAddr(t), false
	r := open(t, cfg)
	waitFor(t, "the restored state", func() bool { return len(r.State().Leases) == 2 })
	check(r.State())
	if end := r.State().Leases[1].Ends(); !end.Equal(g.At.Add(6 * time.Second)) {
		t.Fatalf("lease ends %v", end)
	}
}

// OpHealth marks endpoints down, draining (left) and up by key; the same
// health again changes nothing, and a snapshot keeps it.
func TestEndpointHealth(t *testing.T) {
	cfg := Config{ID: "cp-1", Dir: t.TempDir(), Bind: freeAddr(t), Bootstrap: true}
	s := withTopology(t, cfg)
	ctx := context.Background()
	reg := func(unit, addr string) EndpointChange {
		return EndpointChange{Registration: Registration{Service: "echo", Unit: unit, Address: addr, Transport: "quic", Via: "cp-1", Session: "s-" + addr}}
	}
	e := cmd(OpEndpoints)
	e.Endpoints = []EndpointChange{reg("us-east-1", "127.0.0.1:1001"), reg("eu-west-1", "127.0.0.1:1002"), reg("eu-west-2", "127.0.0.1:1003")}
	if _, err := s.Apply(ctx, e); err != nil {
		t.Fatal(err)
	}
	downs := func(st *State) []string {
		var d []string
		for _, r := range st.Endpoints {
			if r.Down {
				d = append(d, r.Key())
			}
		}
		return d
	}
	h := cmd(OpHealth)
	h.Down = []string{"quic://127.0.0.1:1002", "quic://127.0.0.1:9999"}
	h.Draining = []string{"quic://127.0.0.1:1003", "quic://127.0.0.1:1002"} // down wins
	if _, err := s.Apply(ctx, h); err != nil {
		t.Fatal(err)
	}
	st := s.State()
	if d := downs(st); len(d) != 1 || d[0] != "quic://127.0.0.1:1002" {
		t.Fatalf("down endpoints %v", d)
	}
	for _, r := range st.Endpoints {
		if r.Draining != (r.Key() == "quic://127.0.0.1:1003") {
			t.Fatalf("endpoint %s draining %v", r.Key(), r.Draining)
		}
	}
	if _, err := s.Apply(ctx, h); err != nil {
		t.Fatal(err)
	}
	if s.State().Index != st.Index {
		t.Fatalf("the same health again changed the state: index %d -> %d", st.Index, s.State().Index)
	}
	if err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	cfg.Bind, cfg.Bootstrap = freeAddr(t), false
	r := open(t, cfg)
	waitFor(t, "the restored state", func() bool { return len(r.State().Endpoints) == 3 })
	if d := downs(r.State()); len(d) != 1 {
		t.Fatalf("after a restart, down endpoints %v", d)
	}
	waitFor(t, "leadership", r.IsLeader)
	if _, err := r.Apply(ctx, cmd(OpHealth)); err != nil {
		t.Fatal(err)
	}
	if d := downs(r.State()); len(d) != 0 {
		t.Fatalf("health with none down left %v down", d)
	}
}

// The orchestrator's commands: a state change and a plan move are epoch
// compare-and-sets; a refused one changes nothing; handoff records are
// kept by ID.
func TestHandoffCommands(t *testing.T) {
	s := withTopology(t, Config{ID: "cp-1", Dir: t.TempDir(), Bind: freeAddr(t), Bootstrap: true})
	ctx := context.Background()
	var re *RefusedError
	st := cmd(OpState)
	st.Shard, st.Epoch, st.State = 7, 9, routing.StateDraining
	if _, err := s.Apply(ctx, st); !errors.As(err, &re) || !strings.Contains(err.Error(), "not 9") {
		t.Fatalf("draining at a stale epoch: %v", err)
	}
	st.Epoch = 1
	if _, err := s.Apply(ctx, st); err != nil {
		t.Fatal(err)
	}
	if o, _ := s.Map().Lookup(7); o.State != routing.StateDraining {
		t.Fatalf("shard 7 is %s, want draining", o.State)
	}
	mv := cmd(OpPlanMove)
	mv.Move = &routing.Move{Shard: 7, From: "us-east-1", To: "eu-west-1", FromEpoch: 2, Standbys: []string{"us-east-1"}}
	if _, err := s.Apply(ctx, mv); !errors.As(err, &re) {
		t.Fatalf("a plan move at a stale epoch: %v", err)
	}
	mv.Move.FromEpoch = 1
	if _, err := s.Apply(ctx, mv); err != nil {
		t.Fatal(err)
	}
	if o, _ := s.Map().Lookup(7); o.Unit != "eu-west-1" || o.Epoch != 2 || o.State != routing.StateServing || len(o.Standbys) != 1 || o.Standbys[0] != "us-east-1" {
		t.Fatalf("shard 7 after the move: %+v", o)
	}
	h := cmd(OpHandoff)
	h.Handoff = &Handoff{ID: "h1", Shard: 7, Kind: "planned", Phase: "draining"}
	for _, phase := range []string{"draining", "done"} {
		h.Handoff.Phase = phase
		if _, err := s.Apply(ctx, h); err != nil {
			t.Fatal(err)
		}
	}
	if hs := s.State().Handoffs; len(hs) != 1 || hs[0].Phase != "done" {
		t.Fatalf("handoffs %+v", hs)
	}
}
