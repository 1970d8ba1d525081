// Package routing is the pure model of cellmesh: the topology (regions, units,
// shard count, shard rule, assignments, zone rules, safety limits), its
// validation, the compiled ShardMap that decides where each request goes, and
// the planners that compute moves (evacuate, fail over, add or remove a unit)
// and check them against the safety rules.
//
// routing owns decisions, never effects. It must not do I/O, read the clock
// (callers pass now), log, export metrics, start goroutines, or import any other
// cellmesh package, net or os; import_test.go fails the build of the tests if it
// does. Decoding topology files lives in routing/topofile.
package routing
