// Package controlplane holds the raft state (topology, shard map, leases,
// operator actions), serves it over xDS, and hosts the operator API, the
// dashboard and the failover orchestrator on the raft leader.
//
// It must not import proxy or cmd; it may import routing and failover. Plans are
// computed by routing; controlplane only commits and pushes them.
package controlplane
