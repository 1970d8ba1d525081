package routing_test

import (
	"net/http"
	"path/filepath"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

// exampleFile is the example topology the README and the CLI point at.
var exampleFile = filepath.Join("..", "examples", "topology", "three-regions.yaml")

// validTopology returns a small valid topology: two regions, one rzone unit
// in each, a gzone writer in east with its standby in west, and a czone read
// copy in east only (west has none, so czone routes from west stay local).
// Four shards: 0-1 on east-1, 2-3 on west-1. Keys come from the default
// header, then the cookie "uid". Every call returns a fresh copy.
func validTopology() *routing.Topology {
	return &routing.Topology{
		Version: 1,
		Shards:  4,
		Keys: []routing.KeySource{
			{Kind: routing.KeyHeader, Name: routing.DefaultKeyHeader},
			{Kind: routing.KeyCookie, Name: "uid"},
		},
		Zones: routing.ZoneRules{Rules: []routing.ZoneRule{
			{Methods: []string{"GET", "HEAD"}, PathPrefix: "/v1/config/", Zone: routing.KindCZone},
			{PathPrefix: "/v1/config/", Zone: routing.KindGZone},
		}},
		Regions: []routing.Region{{Name: "east"}, {Name: "west"}},
		Units: []routing.Unit{
			{Name: "east-1", Region: "east", Kind: routing.KindRZone, CapacityRPS: 1000},
			{Name: "west-1", Region: "west", Kind: routing.KindRZone, CapacityRPS: 1000},
			{Name: "east-g", Region: "east", Kind: routing.KindGZone, CapacityRPS: 500},
			{Name: "west-g", Region: "west", Kind: routing.KindGZone, CapacityRPS: 500},
			{Name: "east-c", Region: "east", Kind: routing.KindCZone, CapacityRPS: 2000},
		},
		Assignments: []routing.Assignment{
			{Shard: 0, Primary: "east-1", Standbys: []string{"west-1"}, Epoch: 1, State: routing.StateServing},
			{Shard: 1, Primary: "east-1", Standbys: []string{"west-1"}, Epoch: 1, State: routing.StateServing},
			{Shard: 2, Primary: "west-1", Standbys: []string{"east-1"}, Epoch: 3, State: routing.StateServing},
			{Shard: 3, Primary: "west-1", Standbys: []string{"east-1"}, Epoch: 1, State: routing.StateDraining},
			{Shard: routing.GlobalShard, Primary: "east-g", Standbys: []string{"west-g"}, Epoch: 2, State: routing.StateServing},
		},
	}
}

// mustCompile compiles t or fails the test.
func mustCompile(tb testing.TB, t *routing.Topology) *routing.ShardMap {
	tb.Helper()
	m, err := routing.Compile(t)
	if err != nil {
		tb.Fatalf("Compile: %v", err)
	}
	return m
}

// exampleTopology loads examples/topology/three-regions.yaml.
func exampleTopology(tb testing.TB) *routing.Topology {
	tb.Helper()
	t, err := topofile.Load(exampleFile)
	if err != nil {
		tb.Fatalf("load example: %v", err)
	}
	return t
}

// unit returns the named unit of t; it panics when there is none, which
// is a mistake in the test.
func unit(t *routing.Topology, name string) *routing.Unit {
	for i := range t.Units {
		if t.Units[i].Name == name {
			return &t.Units[i]
		}
	}
	panic("no unit " + name)
}

// assignment returns the shard's assignment in t; it panics when there is
// none, which is a mistake in the test.
func assignment(t *routing.Topology, shard int) *routing.Assignment {
	for i := range t.Assignments {
		if t.Assignments[i].Shard == shard {
			return &t.Assignments[i]
		}
	}
	panic("no assignment for " + routing.ShardName(shard))
}

// header builds an http.Header from name, value pairs; Add keeps repeats.
func header(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}
