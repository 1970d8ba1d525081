// Package failover owns membership (memberlist gossip), unit and region health,
// leases and the handoff protocol that moves shards to standby units without
// losing an acknowledged write.
//
// It may import routing and nothing else of cellmesh; memberlist types stay
// inside it.
package failover
