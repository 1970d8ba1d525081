// Package ledger is cellmesh's reference stateful service: accounts per
// user (deposit, transfer between users of any units, balance), kept per
// shard on disk (bbolt), every write replicated synchronously to the
// shard's standby units through the mesh before it is acknowledged, with
// the shard's epoch carried and stale epochs refused, idempotency keys so
// that a retried write is applied once, and the handoff contract
// (replication watermarks, promote, demote) that lets the control plane
// move a shard without losing an acknowledged write.
//
// See README.md for how a service implements the contract.
package ledger
