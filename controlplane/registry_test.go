package controlplane

import (
	"testing"

	"github.com/cellmesh/cellmesh/controlplane/store"
)

// A registration whose deregistration follows it in the queue goes with
// it: a late pair must not replace the sidecar's newer registration made
// through another replica. Other changes keep their order.
func TestCompactDropsRegistrationPairs(t *testing.T) {
	reg := func(session string, dereg bool) store.EndpointChange {
		return store.EndpointChange{Deregister: dereg, Registration: store.Registration{Address: "127.0.0.1:1", Transport: "quic", Session: session}}
	}
	purge := store.EndpointChange{Purge: true, Registration: store.Registration{Via: "cp-1", Session: "cp-1/b/"}}
	q := []store.EndpointChange{purge, reg("a/1", false), reg("b/1", false), reg("a/1", true), reg("a/2", false), reg("b/1", true), reg("c/1", true)}
	got := compact(q)
	want := []store.EndpointChange{purge, reg("a/2", false), reg("c/1", true)}
	if len(got) != len(want) {
		t.Fatalf("compact: %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("compact[%d] = %+v, want %+v", i, got[i], want[i])
		}
	}
}
