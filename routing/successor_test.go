package routing_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
)

func TestCheckSuccessor(t *testing.T) {
	base := exampleTopology(t)
	base.Version = 5
	cur := mustCompile(t, base)
	next := func(f func(*routing.Topology)) *routing.ShardMap {
		n := base.Clone()
		n.Version++
		f(n)
		return mustCompile(t, n)
	}
	tests := []struct {
		name string
		next *routing.ShardMap
		want string // "" = accepted
	}{
		{"same map", cur, ""},
		{"next version, nothing moved", next(func(*routing.Topology) {}), ""},
		{"primary moves with a higher epoch", next(func(n *routing.Topology) {
			a := assignment(n, 7)
			a.Primary, a.Standbys, a.Epoch = a.Standbys[0], []string{a.Primary}, a.Epoch+1
		}), ""},
		{"older version", mustCompile(t, func() *routing.Topology { n := base.Clone(); n.Version--; return n }()), "older than the current version"},
		{"same version, other contents", mustCompile(t, func() *routing.Topology {
			n := base.Clone()
			a := assignment(n, 7)
			a.Primary, a.Standbys, a.Epoch = a.Standbys[0], []string{a.Primary}, a.Epoch+1
			return n
		}()), "bump the version"},
		{"primary moves at the same epoch", next(func(n *routing.Topology) {
			a := assignment(n, 7)
			a.Primary, a.Standbys = a.Standbys[0], []string{a.Primary}
		}), "shard 7: primary changes"},
		{"global writer moves at the same epoch", next(func(n *routing.Topology) {
			a := assignment(n, routing.GlobalShard)
			a.Primary, a.Standbys = a.Standbys[0], []string{a.Primary}
		}), "the global assignment: primary changes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := cur.CheckSuccessor(tt.next)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			var se *routing.SuccessorError
			if !errors.As(err, &se) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want a *SuccessorError containing %q", err, tt.want)
			}
		})
	}

	// An epoch that falls, from a map where it had risen.
	raised := next(func(n *routing.Topology) { assignment(n, 9).Epoch = 5 })
	lowered := func() *routing.ShardMap {
		n := base.Clone()
		n.Version += 2
		assignment(n, 9).Epoch = 4
		return mustCompile(t, n)
	}()
	if err := raised.CheckSuccessor(lowered); err == nil || !strings.Contains(err.Error(), "shard 9: epoch falls from 5 to 4") {
		t.Fatalf("epoch 5 -> 4: %v", err)
	}
}
