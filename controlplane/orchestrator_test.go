package controlplane

import (
	"context"
	"testing"
	"time"

	"github.com/cellmesh/cellmesh/controlplane/store"
	"github.com/cellmesh/cellmesh/routing"
)

// A shard left draining with no handoff running (its leader was lost
// between the drain and the move) serves again from its primary: the
// leader's orchestrator puts it back, and the move that never happened
// changes nothing else.
func TestLeaderPutsBackShardsLeftDraining(t *testing.T) {
	ca := newTestCA(t)
	r := start(t, ca, Config{ID: "cp-us", Topology: localTopology(t), HandoffServices: []string{"echo"}})
	waitFor(t, "the map", func() bool { return r.store.Map() != nil })
	before, _ := r.store.Map().Lookup(7)
	if _, err := r.store.Apply(context.Background(), store.Command{Op: store.OpState, Shard: 7, Epoch: before.Epoch, State: routing.StateDraining, Who: "a lost leader", At: time.Now().UTC()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "shard 7 serving again", func() bool {
		o, _ := r.store.Map().Lookup(7)
		return o.State == routing.StateServing
	})
	if after, _ := r.store.Map().Lookup(7); after.Unit != before.Unit || after.Epoch != before.Epoch {
		t.Fatalf("shard 7 was %+v, is %+v: only its state may change", before, after)
	}
}
