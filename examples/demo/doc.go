// Package demo runs cellmesh's multi-region demo on one machine, on
// loopback, as real processes of one cellmesh binary: three control-plane
// replicas (one per region, raft on disk, gossip, the ledger as handoff
// service), and in each of the six units of the ledger topology (three
// regions of two) a ledger behind a sidecar. A load generator of users
// deposits, transfers and reads through every unit's sidecar. `cellmesh
// demo` is its command line; the demo owns the processes it starts, their
// ports, certificates, data and logs, and stops them all when it ends.
package demo
